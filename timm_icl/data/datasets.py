"""Image-classification data for training and evaluation: clean uint8 crops, sharded by rank once.

Every batch is ``(images uint8 [B, 3, H, W], labels [B] int64)``: the crop is timm's own eval view of the model
(:mod:`timm_icl.data.preprocess`), and conversion to float, distortion and normalisation happen on the device inside
:class:`~timm_icl.task.ICLTask` / the evaluation (a quarter of float32's bytes through worker queues and copies).

Sources (``dataset_spec``):

- ``"fashion-mnist"``: the local IDX files (offline; Hub ``zalando-datasets/fashion_mnist`` when missing);
- a local folder of parquet files, or an image folder (``class_name/xxx.png``), read with ``datasets``;
- any Hub image-classification dataset id (``ILSVRC/imagenet-1k``, ``timm/imagenet-1k-wds`` streamed, ...).

Sharding across ``world_size`` processes happens here, exactly once (see ecosystem-notes: do not also pass
these loaders to ``accelerator.prepare``): map-style data through :class:`ShardedBatchSampler` (one permutation
per epoch shared by all ranks, rank ``r`` takes every ``world_size``-th index), streams through
:mod:`timm_icl.data.stream` (whole shards per rank, a position that resumes exactly). Every sample of an epoch is seen
exactly once across ranks; ranks may end up with one batch less (streams: a few), which the training loop handles.

Images are decoded in the DataLoader workers (``Image(decode=False)``); an image that cannot be decoded, or an
absurdly thin strip, is skipped, logged and counted (``loader.num_skipped``), never stopping the run.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from ..utils.errors import first_line
from . import fashion_mnist as _fashion_mnist
from .preprocess import ImageTransform, _scale_size, open_image, resolve_preprocessing

_logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "cls", "class", "target", "fine_label")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation"}


# ---------------------------------------------------------------------------------------------------------------------
# decoding and cropping (runs in DataLoader workers): timm's transform, uint8 out
# ---------------------------------------------------------------------------------------------------------------------
def decode_image(value: Any) -> torch.Tensor:
    """Decode an image cell (PIL image, ``{"bytes", "path"}`` dict from ``Image(decode=False)``, raw bytes, array)
    at its stored size, as timm's loaders do (see :func:`timm_icl.data.preprocess.open_image`).

    Returns:
        ``[3, H, W]`` uint8.
    """
    image = open_image(value)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def resolve_loader_preprocessing(
    data_config: Mapping[str, Any] | None = None,
    *,
    image_size: int | Sequence[int] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    crop_mode: str | None = None,
) -> dict[str, Any] | None:
    """The data config a loader crops with: ``data_config`` (a model's, from
    :func:`~timm_icl.data.preprocess.resolve_preprocessing`) with the explicit overrides; without ``data_config``,
    ``image_size`` with crop fraction 1.0 and bilinear interpolation unless given; None when neither is given
    (images keep their stored size)."""
    if data_config is None and image_size is None:
        if crop_pct is not None or interpolation is not None or crop_mode is not None:
            raise ValueError("crop_pct / interpolation / crop_mode need image_size or a data_config")
        return None
    base = dict(data_config) if data_config is not None else {"crop_pct": 1.0, "interpolation": "bilinear"}
    return resolve_preprocessing(
        pretrained_cfg=base, image_size=image_size, crop_pct=crop_pct, interpolation=interpolation, crop_mode=crop_mode
    )


class _Decoder:
    """Picklable per-sample transform: cell -> ``(uint8 [3, H, W], label)`` or None when unusable."""

    def __init__(self, image_column: str, label_column: str, transform: ImageTransform | None):
        self.image_column, self.label_column, self.transform = image_column, label_column, transform

    def __call__(self, row: dict, index: Any = None) -> tuple[torch.Tensor, int] | None:
        try:
            cell = row[self.image_column]
            image = self.transform(cell) if self.transform is not None else decode_image(cell)
        except Exception as e:  # any decoder error or a thin strip: skip the sample, never stop the run
            where = row[self.image_column].get("path") if isinstance(row[self.image_column], dict) else None
            _logger.warning("skipping unusable image %s: %s", where or index, first_line(e)[:200])
            return None
        return image, int(row[self.label_column])


# ---------------------------------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------------------------------
class FashionMNISTDataset(Dataset):
    """Fashion-MNIST held in memory as uint8 (47 MB for train); greyscale repeated to RGB, cropped on demand.

    Args:
        split: ``"train"`` or ``"test"``.
        transform: an :class:`~timm_icl.data.preprocess.ImageTransform` (None: the stored 28 px images). When it would
            leave a 28 px image unchanged (eval view, 28 px, resize to 28) the PIL round trip is skipped.
    """

    def __init__(self, split: str, transform: ImageTransform | None = None):
        images, self.labels = _fashion_mnist.load_fashion_mnist(split)
        self.images = torch.from_numpy(images.copy())  # np.frombuffer is read-only
        self.transform = transform
        self.class_names = list(_fashion_mnist.CLASS_NAMES)
        h, w = self.images.shape[-2:]
        self._identity = transform is None or (
            transform.training == "eval"
            and transform.size == (h, w)
            and transform.config.get("crop_mode", "center") in ("center", "squash", None)
            and _scale_size(transform.config) == min(h, w)
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self._identity:  # PIL's resize to the same size is a copy and the crop covers all: same pixels
            return image[None].expand(3, -1, -1).contiguous(), int(self.labels[index])
        return self.transform(image.numpy()), int(self.labels[index])  # type: ignore[misc]


class HFImageDataset(Dataset):
    """A map-style ``datasets.Dataset`` whose image column is ``Image(decode=False)``; decoding in workers."""

    def __init__(self, hf_dataset: Any, decoder: _Decoder):
        self.hf_dataset, self.decoder = hf_dataset, decoder

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        return self.decoder(self.hf_dataset[int(index)], index)


class HFImageStream(IterableDataset):
    """A streamed (``datasets.IterableDataset``) source as decoded ``(image, label)`` samples, in the source's order.

    What :func:`create_dataset` returns for ``streaming=True``; iterate it directly, or let :func:`create_loader`
    read its ``hf_dataset`` and ``decoder`` through :mod:`.stream` (whole shards per rank, an exact resume position).
    """

    def __init__(self, hf_dataset: Any, decoder: _Decoder, num_samples: int | None = None):
        self.hf_dataset, self.decoder, self.num_samples = hf_dataset, decoder, num_samples

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
    text = first_line(e)
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
            raise ValueError(f"dataset {name_or_path!r} has no split {split!r}: {first_line(e)}") from None
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
    crop_pct: float | None = None,
    interpolation: str | None = None,
    crop_mode: str | None = None,
    data_config: Mapping[str, Any] | None = None,
    train_transform: str = "eval",
    jpeg_draft: bool = False,
    max_samples: int | None = None,
    train_options: Mapping[str, Any] | None = None,
) -> tuple[Dataset | IterableDataset, dict]:
    """Open an image-classification dataset yielding ``(uint8 [3, H, W], label)`` samples.

    Args:
        name_or_path: ``"fashion-mnist"``, a local parquet/image folder, or a Hub dataset id.
        split: ``"train"``, ``"validation"`` (``"val"``), ``"test"``, ... (Fashion-MNIST: train/test;
            validation means test there).
        image_column, label_column: column names (default: detected from the features).
        streaming: stream the data (an ``IterableDataset``); default False (True is better for ImageNet).
        image_size: output ``H`` (int) or ``(H, W)`` / ``(3, H, W)``; None: ``data_config``'s, or the stored size.
        crop_pct, interpolation, crop_mode: timm's eval view (resize the shorter side to ``floor(size /
            crop_pct)``, centre crop); None: ``data_config``'s, or 1.0 / bilinear / center without one.
        data_config: the model's data config (:func:`~timm_icl.data.preprocess.resolve_preprocessing`): the crop is then
            exactly timm's ``create_transform(**data_config)`` before ``Normalize``.
        train_transform: ``"eval"`` (deterministic crop) or ``"timm"`` (timm's random resized crop + flip +
            colour jitter, without normalisation; for training splits).
        jpeg_draft: let libjpeg decode JPEGs at a reduced scale that still covers the resize (faster for large
            photos, not exactly timm's pixels).
        max_samples: keep only the first ``max_samples`` samples (before sharding).

    Returns:
        ``(dataset, info)``: a torch Dataset (samples may be None for unusable images) and a dict with
        ``num_classes``, ``class_names`` (list or None), ``num_samples`` (int or None), ``dataset`` (the spec),
        ``split``, ``streaming``, ``image_column``, ``label_column``, ``data_config`` (what the crops used, None
        for stored sizes), ``train_transform``.

    Example:
        >>> ds, info = create_dataset("fashion-mnist", "test", image_size=28)
        >>> image, label = ds[0]  # image uint8 [3, 28, 28]
    """
    split = _SPLIT_ALIASES.get(split, split)
    config = resolve_loader_preprocessing(
        data_config, image_size=image_size, crop_pct=crop_pct, interpolation=interpolation, crop_mode=crop_mode
    )
    if config is None and train_transform != "eval":
        raise ValueError(f"train_transform={train_transform!r} needs an image size or a data_config")
    transform = (
        ImageTransform(config, training=train_transform, draft=jpeg_draft, options=train_options)
        if config is not None
        else None
    )
    info: dict[str, Any] = {
        "dataset": name_or_path,
        "split": split,
        "streaming": bool(streaming),
        "data_config": config,
        "train_transform": train_transform,
    }
    if _fashion_mnist.is_fashion_mnist(name_or_path):
        local_split = "test" if split in ("validation", "test") else split
        if _fashion_mnist.local_files_available(local_split):
            dataset: Any = FashionMNISTDataset(local_split, transform)
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
    decoder = _Decoder(image_column, label_column, transform)
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


def check_dataset_access(spec: str, streaming: bool | None = None) -> bool:
    """Whether to stream ``spec`` (default: on for a Hub id, off for local data); for a Hub dataset, a ValueError
    line when it cannot be read: offline, gated without access, unknown, or the Hub unreachable. Cheap (one Hub
    request): call it before loading any model or data."""
    local = Path(spec).expanduser().exists() or _fashion_mnist.is_fashion_mnist(spec)
    if streaming is None:
        streaming = not local
    if local:
        return streaming
    what = f"log in (`hf auth login`) and accept its terms at https://huggingface.co/datasets/{spec}, or pass --dataset"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        if streaming:  # a stream reads the Hub as it goes: nothing to find in a cache
            raise ValueError(f"cannot stream {spec} offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set): {what}")
        return streaming  # map-style: datasets' cache may hold a copy; it says so itself when not
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        auth_check(spec, repo_type="dataset")
    except GatedRepoError:
        raise ValueError(f"{spec} is gated and this account has no access to it: {what}") from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"no dataset {spec!r} on the Hub (or private: log in) and no such folder: pass --dataset"
        ) from None
    except Exception as e:  # no network: the Hub client's connection errors
        raise ValueError(f"cannot reach the Hub for {spec} ({type(e).__name__}): connect and {what}") from None
    return streaming


def hub_dataset_id(dataset: str | None) -> str | None:
    """The Hub id of a dataset spec as :func:`create_dataset` reads it (``"fashion-mnist"`` ->
    ``zalando-datasets/fashion_mnist``), None for a local path or anything that is not ``owner/name`` (the model
    card's metadata names Hub datasets only)."""
    if not dataset:
        return None
    if _fashion_mnist.is_fashion_mnist(dataset):
        return _fashion_mnist.HUB_ID
    if dataset.startswith(("/", ".", "~")) or Path(dataset).expanduser().exists():
        return None
    return dataset if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", dataset) else None
