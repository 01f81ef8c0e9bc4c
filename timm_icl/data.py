"""Image-classification data for training and evaluation: clean crops in [0, 1], sharded by rank once.

Every batch is ``(images [B, 3, H, W] float32 in [0, 1], not normalised, labels [B] int64)``: distortion and
normalisation happen on the device inside :class:`~timm_icl.task.ICLTask` / the evaluation.

Sources (``dataset_spec``):

- ``"fashion-mnist"``: the local IDX files (offline; Hub ``zalando-datasets/fashion_mnist`` when missing);
- a local folder of parquet files, or an image folder (``class_name/xxx.png``), read with ``datasets``;
- any Hub image-classification dataset id (``ILSVRC/imagenet-1k``, ``timm/imagenet-1k-wds`` streamed, ...).

Sharding across ``world_size`` processes happens here, exactly once (see ecosystem-notes: do not also pass
these loaders to ``accelerator.prepare``): map-style data through :class:`ShardedBatchSampler` (one permutation
per epoch shared by all ranks, rank ``r`` takes every ``world_size``-th index), streams through
``datasets.distributed.split_dataset_by_node``. Every sample of an epoch is seen exactly once across ranks; ranks
may end up with one batch less, which the training loop handles.

Images are decoded in the DataLoader workers (``Image(decode=False)``); an image that cannot be decoded is
skipped, logged and counted (``loader.num_skipped``), never stopping the run.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

from . import _fashion_mnist

_logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "target", "fine_label")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation"}


# ---------------------------------------------------------------------------------------------------------------------
# decoding and resizing (runs in DataLoader workers)
# ---------------------------------------------------------------------------------------------------------------------
def _to_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    return size[-2:]  # accept (3, H, W) as in timm's input_size


def resize_center_crop(image: torch.Tensor, size: tuple[int, int] | None, crop_pct: float = 1.0) -> torch.Tensor:
    """Resize the shorter side to ``size / crop_pct`` (antialiased bilinear), then center-crop to ``size``.

    Args:
        image: ``[C, H, W]`` float in [0, 1].
        size: ``(H, W)`` output, or None to keep the image as is.
        crop_pct: timm's crop fraction (1.0: resize straight to the crop size).

    Returns:
        ``[C, size[0], size[1]]`` float in [0, 1].
    """
    if size is None or tuple(image.shape[-2:]) == size:
        return image
    h, w = image.shape[-2:]
    scale = max(size[0] / crop_pct / h, size[1] / crop_pct / w)
    new_h, new_w = max(size[0], round(h * scale)), max(size[1], round(w * scale))
    if (new_h, new_w) != (h, w):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new_h - size[0]) // 2, (new_w - size[1]) // 2
    return image[:, top : top + size[0], left : left + size[1]].clamp_(0.0, 1.0)


def decode_image(value: Any) -> torch.Tensor:
    """Decode an image cell (PIL image, ``{"bytes", "path"}`` dict from ``Image(decode=False)``, raw bytes, array).

    Greyscale, RGBA, CMYK and palette images are converted to RGB (RGBA drops alpha, as timm does).

    Returns:
        ``[3, H, W]`` float32 in [0, 1].
    """
    from PIL import Image

    if isinstance(value, torch.Tensor | np.ndarray):
        array = np.asarray(value)
        if array.ndim == 2:
            array = array[..., None]
        if array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
        tensor = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1)
        tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
        return tensor.expand(3, -1, -1).contiguous() if tensor.shape[0] == 1 else tensor
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("image cell has neither bytes nor path")
    if isinstance(value, bytes | bytearray):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str | os.PathLike):
        image = Image.open(value)
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise TypeError(f"cannot decode an image from {type(value).__name__}")
    image.load()  # truncated / corrupt files fail here, inside the try of the caller
    if image.mode != "RGB":
        if image.mode in ("P", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class _Decoder:
    """Picklable per-sample transform: cell -> ``([3, H, W] in [0, 1], label)`` or None when undecodable."""

    def __init__(self, image_column: str, label_column: str, size: tuple[int, int] | None, crop_pct: float):
        self.image_column, self.label_column, self.size, self.crop_pct = image_column, label_column, size, crop_pct

    def __call__(self, row: dict, index: Any = None) -> tuple[torch.Tensor, int] | None:
        try:
            image = resize_center_crop(decode_image(row[self.image_column]), self.size, self.crop_pct)
        except Exception as e:  # any decoder error: skip the sample, never stop the run
            where = row[self.image_column].get("path") if isinstance(row[self.image_column], dict) else None
            _logger.warning("skipping undecodable image %s: %s", where or index, str(e).splitlines()[0][:200])
            return None
        return image, int(row[self.label_column])


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([s[0] for s in good])
    labels = torch.tensor([s[1] for s in good], dtype=torch.long)
    return images, labels, skipped


# ---------------------------------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------------------------------
class FashionMNISTDataset(Dataset):
    """Fashion-MNIST held in memory as uint8 (47 MB for train); greyscale repeated to RGB, resized on demand."""

    def __init__(self, split: str, image_size: int | Sequence[int] | None = None):
        images, self.labels = _fashion_mnist.load_fashion_mnist(split)
        self.images = torch.from_numpy(images.copy())  # np.frombuffer is read-only
        self.size = _to_size(image_size)
        self.class_names = list(_fashion_mnist.CLASS_NAMES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255.0)[None].expand(3, -1, -1)
        return resize_center_crop(image.contiguous(), self.size), int(self.labels[index])


class HFImageDataset(Dataset):
    """A map-style ``datasets.Dataset`` whose image column is ``Image(decode=False)``; decoding in workers."""

    def __init__(self, hf_dataset: Any, decoder: _Decoder):
        self.hf_dataset, self.decoder = hf_dataset, decoder

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        return self.decoder(self.hf_dataset[int(index)], index)


class HFImageStream(IterableDataset):
    """A streamed (``datasets.IterableDataset``) source, already split by rank; workers split it further."""

    def __init__(self, hf_dataset: Any, decoder: _Decoder, num_samples: int | None = None):
        self.hf_dataset, self.decoder, self.num_samples = hf_dataset, decoder, num_samples

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.hf_dataset, "set_epoch"):
            self.hf_dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int] | None]:
        # datasets' IterableDataset notices it runs inside a DataLoader worker and yields that worker's share.
        for i, row in enumerate(self.hf_dataset):
            yield self.decoder(row, i)


def _detect_column(features: dict, names: tuple[str, ...], kind: str, wanted: str | None) -> str:
    columns = list(features)
    if wanted is not None:
        if wanted not in features:
            raise ValueError(f"no {kind} column {wanted!r}; the dataset has columns {columns}")
        return wanted
    from datasets import ClassLabel, Image

    typed = [c for c, f in features.items() if isinstance(f, Image if kind == "image" else ClassLabel)]
    if typed:
        return typed[0]
    for name in names:
        if name in features:
            return name
    flag = "--image-column" if kind == "image" else "--label-column"
    raise ValueError(f"cannot find the {kind} column among {columns}; name it with {flag}")


def _gated_message(name: str, e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    lowered = (text + type(e).__name__).lower()
    if "gated" in lowered or "401" in lowered or "403" in lowered or "authenticat" in lowered:
        return (
            f"dataset {name!r} is gated or needs a login: accept its terms at https://huggingface.co/datasets/{name} "
            f"and log in (`hf auth login` or set HF_TOKEN) ({text})"
        )
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return f"cannot load dataset {name!r} offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set, not cached): {text}"
    return f"cannot load dataset {name!r}: {text}"


def _load_hf(name_or_path: str, split: str, streaming: bool) -> Any:
    import datasets

    path = Path(name_or_path).expanduser()
    try:
        if path.is_dir():
            has_data_files = any(path.rglob("*.parquet")) or any(path.rglob("*.arrow")) or any(path.rglob("*.tar"))
            if has_data_files:
                return datasets.load_dataset(str(path), split=split, streaming=streaming)
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split, streaming=streaming)
        if path.suffix in (".parquet", ".csv", ".json", ".jsonl") or os.path.sep in name_or_path and path.exists():
            raise ValueError(f"{name_or_path!r}: pass a folder of parquet files or an image folder")
        return datasets.load_dataset(name_or_path, split=split, streaming=streaming)
    except ValueError as e:
        if "Unknown split" in str(e) or "split" in str(e).lower() and "not" in str(e).lower():
            raise ValueError(f"dataset {name_or_path!r} has no split {split!r}: {str(e).splitlines()[0]}") from None
        raise ValueError(_gated_message(name_or_path, e)) from None
    except Exception as e:  # DatasetNotFoundError, GatedRepoError, ConnectionError, ...
        raise ValueError(_gated_message(name_or_path, e)) from None


def create_dataset(
    name_or_path: str,
    split: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool | None = None,
    image_size: int | Sequence[int] | None = None,
    crop_pct: float = 1.0,
    max_samples: int | None = None,
) -> tuple[Dataset | IterableDataset, dict]:
    """Open an image-classification dataset yielding ``([3, H, W] float in [0, 1], label)`` samples.

    Args:
        name_or_path: ``"fashion-mnist"``, a local parquet/image folder, or a Hub dataset id.
        split: ``"train"``, ``"validation"`` (``"val"``), ``"test"``, ... (Fashion-MNIST: train/test;
            validation means test there).
        image_column, label_column: column names (default: detected from the features).
        streaming: stream the data (an ``IterableDataset``); default False (True is better for ImageNet).
        image_size: output ``H`` (int) or ``(H, W)`` / ``(3, H, W)``; None keeps the stored size.
        crop_pct: resize the shorter side to ``image_size / crop_pct`` before the center crop.
        max_samples: keep only the first ``max_samples`` samples (before sharding).

    Returns:
        ``(dataset, info)``: a torch Dataset (samples may be None for undecodable images) and a dict with
        ``num_classes``, ``class_names`` (list or None), ``num_samples`` (int or None), ``dataset`` (the spec),
        ``split``, ``streaming``, ``image_column``, ``label_column``.

    Example:
        >>> ds, info = create_dataset("fashion-mnist", "test", image_size=28)
        >>> image, label = ds[0]  # image [3, 28, 28] in [0, 1]
    """
    split = _SPLIT_ALIASES.get(split, split)
    size = _to_size(image_size)
    info: dict[str, Any] = {"dataset": name_or_path, "split": split, "streaming": bool(streaming)}
    if name_or_path.lower().replace("_", "-") in ("fashion-mnist", "fashionmnist"):
        local_split = "test" if split in ("validation", "test") else split
        if _fashion_mnist.local_files_available(local_split):
            dataset: Any = FashionMNISTDataset(local_split, image_size=size)
            n = len(dataset)
            if max_samples is not None:
                dataset = torch.utils.data.Subset(dataset, range(min(max_samples, n)))
                n = len(dataset)
            if streaming:
                dataset = _MapAsStream(dataset)
            names = list(_fashion_mnist.CLASS_NAMES)
            info.update(num_classes=10, class_names=names, num_samples=n, image_column="image", label_column="label")
            return dataset, info
        name_or_path, split = _fashion_mnist.HUB_ID, local_split
        _logger.warning(
            "Fashion-MNIST IDX files not found under %s; using %s", _fashion_mnist.fashion_mnist_root(), name_or_path
        )

    from datasets import ClassLabel, Image

    hf = _load_hf(name_or_path, split, bool(streaming))
    features = hf.features
    if features is None and streaming:  # some streamed sources only know their features after one row
        features = hf._resolve_features().features
    image_column = _detect_column(features, IMAGE_COLUMNS, "image", image_column)
    label_column = _detect_column(features, LABEL_COLUMNS, "label", label_column)
    hf = hf.select_columns([image_column, label_column])
    if isinstance(features[image_column], Image):
        hf = hf.cast_column(image_column, Image(decode=False))  # decode in the workers, skip bad files there
    decoder = _Decoder(image_column, label_column, size, crop_pct)
    label_feature = features[label_column]
    class_names = list(label_feature.names) if isinstance(label_feature, ClassLabel) else None
    num_classes = label_feature.num_classes if isinstance(label_feature, ClassLabel) else None
    if streaming:
        num_samples = None
        split_info = (hf.info.splits or {}).get(split) if hf.info is not None else None
        if split_info is not None and split_info.num_examples:
            num_samples = int(split_info.num_examples)
        if max_samples is not None:
            hf = hf.take(max_samples)
            num_samples = min(max_samples, num_samples) if num_samples else None
        dataset = HFImageStream(hf, decoder, num_samples)
    else:
        if max_samples is not None:
            hf = hf.select(range(min(max_samples, len(hf))))
        if num_classes is None:
            labels = hf[label_column]
            num_classes = int(max(labels)) + 1 if len(labels) else 0
        num_samples = len(hf)
        dataset = HFImageDataset(hf, decoder)
    info.update(
        num_classes=num_classes,
        class_names=class_names,
        num_samples=num_samples,
        image_column=image_column,
        label_column=label_column,
        dataset=info["dataset"],
    )
    return dataset, info


class _MapAsStream(IterableDataset):
    """A map-style dataset read in order as a stream (streaming=True on in-memory data, e.g. for tests)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.rank, self.world_size = 0, 1

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        wid, nw = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for i in range(self.rank, self.num_samples, self.world_size)[wid::nw]:
            yield self.dataset[i]


# ---------------------------------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------------------------------
class ShardedBatchSampler:
    """Batches of this rank's share of one epoch: a seeded permutation shared by all ranks, every
    ``world_size``-th index from ``rank``. Exact resume: :meth:`set_epoch` and :meth:`skip_batches`.

    Args:
        num_samples: dataset length.
        batch_size: per-process batch size.
        rank, world_size: this process and the number of processes.
        shuffle: permute per epoch with ``torch.Generator().manual_seed(seed + epoch)`` (the same on every rank).
        seed: base seed of the permutation.
        drop_last: drop the last, smaller batch (and keep every rank at the same number of batches).
        samples_per_epoch: use only the first N indices of each epoch's permutation (a fresh random subset per
            epoch when shuffling; None: all).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        samples_per_epoch: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.dataset_size = num_samples
        if samples_per_epoch is not None:
            num_samples = min(num_samples, samples_per_epoch)
        self.num_samples, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, count: int) -> None:
        """Skip the first ``count`` batches of the next iteration only (resume in the middle of an epoch)."""
        self._skip = count

    def indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        return order[: self.num_samples][self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        if self.drop_last:
            return (self.num_samples // self.world_size) // self.batch_size
        return math.ceil(len(range(self.rank, self.num_samples, self.world_size)) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        indices, skip, self._skip = self.indices(), self._skip, 0
        for b in range(skip, len(self)):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size]


class ImageLoader:
    """A DataLoader that yields ``(images, labels)`` and counts the images it had to skip (``num_skipped``).

    Attributes:
        loader: the underlying ``torch.utils.data.DataLoader``.
        batch_sampler: the :class:`ShardedBatchSampler` (map-style data) or None (streams).
        num_skipped: undecodable images skipped so far on this process.
        num_samples: this process's samples per epoch when known.
    """

    def __init__(self, loader: DataLoader, batch_sampler: ShardedBatchSampler | None, num_samples: int | None):
        self.loader, self.batch_sampler, self.num_samples = loader, batch_sampler, num_samples
        self.batch_size = batch_sampler.batch_size if batch_sampler is not None else loader.batch_size
        self.num_skipped = 0

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def set_epoch(self, epoch: int) -> None:
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(epoch)
        elif hasattr(self.loader.dataset, "set_epoch"):
            self.loader.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        if self.batch_sampler is not None:
            return len(self.batch_sampler)
        if self.num_samples is None:
            raise TypeError("a streamed loader of unknown size has no len()")
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, skipped in self.loader:
            self.num_skipped += skipped
            if len(labels):
                yield images, labels


def create_loader(
    dataset_spec: str,
    split: str,
    *,
    image_size: int | Sequence[int],
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool | None = None,
    drop_last: bool = False,
    crop_pct: float = 1.0,
    pin_memory: bool = False,
    samples_per_epoch: int | None = None,
) -> tuple[ImageLoader, dict]:
    """A loader of this rank's share of ``dataset_spec``/``split`` (see :func:`create_dataset` for the sources).

    Do not pass the loader to ``accelerator.prepare``: it is already sharded (that would shard twice).

    Args:
        dataset_spec: ``"fashion-mnist"``, a local parquet/image folder, or a Hub dataset id.
        split: dataset split.
        image_size: output ``H`` or ``(H, W)`` (or timm's ``(3, H, W)``).
        batch_size: per-process batch size.
        num_workers: DataLoader workers (decoding happens there).
        shuffle: reshuffle every epoch (map-style: permutation seeded with ``seed + epoch``; streams: a
            ``datasets`` shuffle buffer of 10,000 seeded with ``seed``).
        seed: shuffle seed (the same on every rank).
        rank, world_size: this process's index and the number of processes.
        max_samples: use only the first ``max_samples`` samples.
        image_column, label_column: column names (default: detected).
        streaming: stream (``datasets`` IterableDataset).
        drop_last: drop the last incomplete batch.
        crop_pct: see :func:`resize_center_crop`.
        pin_memory: pin batches (CUDA).
        samples_per_epoch: map-style only: each epoch uses N samples of its permutation (a random subset per
            epoch with ``shuffle``), sharded as usual.

    Returns:
        ``(loader, info)``; ``loader`` yields ``(images [B, 3, H, W] float32 in [0, 1], labels [B] int64)``;
        ``info`` as in :func:`create_dataset` plus ``rank``, ``world_size``.

    Example:
        >>> loader, info = create_loader("fashion-mnist", "test", image_size=28, batch_size=256)
        >>> images, labels = next(iter(loader))
    """
    dataset, info = create_dataset(
        dataset_spec,
        split,
        image_column=image_column,
        label_column=label_column,
        streaming=streaming,
        image_size=image_size,
        crop_pct=crop_pct,
        max_samples=max_samples,
    )
    generator = torch.Generator().manual_seed(seed)  # keeps the global RNG untouched (exact resume)
    common = dict(num_workers=num_workers, collate_fn=_collate, pin_memory=pin_memory, generator=generator)
    if num_workers > 0:
        common["persistent_workers"] = False
    if isinstance(dataset, IterableDataset):
        if samples_per_epoch is not None:
            raise ValueError("samples_per_epoch needs map-style data; for a stream use max_samples")
        if isinstance(dataset, _MapAsStream):
            dataset.rank, dataset.world_size = rank, world_size
        else:
            hf = dataset.hf_dataset
            if shuffle:
                hf = hf.shuffle(seed=seed, buffer_size=10_000)
            if world_size > 1:
                from datasets.distributed import split_dataset_by_node

                hf = split_dataset_by_node(hf, rank=rank, world_size=world_size)
            dataset.hf_dataset = hf
        total = info["num_samples"]
        per_rank = len(range(rank, total, world_size)) if total is not None else None
        loader = DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, **common)
        wrapped = ImageLoader(loader, None, per_rank)
    else:
        sampler = ShardedBatchSampler(
            len(dataset),
            batch_size,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            samples_per_epoch=samples_per_epoch,
        )
        loader = DataLoader(dataset, batch_sampler=sampler, **common)
        wrapped = ImageLoader(loader, sampler, len(range(rank, sampler.num_samples, world_size)))
    info.update(rank=rank, world_size=world_size)
    return wrapped, info
