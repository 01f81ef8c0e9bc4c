"""Loaders: batches of this rank's share, decoded in workers (``(images uint8 [B, 3, H, W], labels [B])``),
map-style data through :class:`ShardedBatchSampler` (exact resume), streams through :mod:`timm_icl.data.stream`."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from .datasets import _MapAsStream, create_dataset


def _collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([s[0] for s in good])
    labels = torch.tensor([s[1] for s in good], dtype=torch.long)
    return images, labels, skipped


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
    image_size: int | Sequence[int] | None = None,
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
    crop_pct: float | None = None,
    interpolation: str | None = None,
    crop_mode: str | None = None,
    data_config: Mapping[str, Any] | None = None,
    train_transform: str = "eval",
    train_options: Mapping[str, Any] | None = None,
    jpeg_draft: bool = False,
    pin_memory: bool = False,
    samples_per_epoch: int | None = None,
) -> tuple[ImageLoader, dict]:
    """A loader of this rank's share of ``dataset_spec``/``split`` (see :func:`create_dataset` for the sources).

    Do not pass the loader to ``accelerator.prepare``: it is already sharded (that would shard twice).

    Args:
        dataset_spec: ``"fashion-mnist"``, a local parquet/image folder, or a Hub dataset id.
        split: dataset split.
        image_size: output ``H`` or ``(H, W)`` (or timm's ``(3, H, W)``); None: ``data_config``'s.
        batch_size: per-process batch size.
        num_workers: DataLoader workers (decoding happens there).
        shuffle: reshuffle every epoch (map-style: permutation seeded with ``seed + epoch``; streams: the
            shard order per epoch and windows of 1,024 samples within a shard, see :mod:`timm_icl.data.stream`).
        seed: shuffle seed (the same on every rank).
        rank, world_size: this process's index and the number of processes.
        max_samples: use only the first ``max_samples`` samples.
        image_column, label_column: column names (default: detected).
        streaming: stream (``datasets`` IterableDataset).
        drop_last: drop the last incomplete batch.
        crop_pct, interpolation, crop_mode, data_config, train_transform, jpeg_draft: the crop, see
            :func:`create_dataset` (pass the model's data config for timm's exact eval view).
        pin_memory: pin batches (CUDA).
        samples_per_epoch: map-style only: each epoch uses N samples of its permutation (a random subset per
            epoch with ``shuffle``), sharded as usual.

    Returns:
        ``(loader, info)``; ``loader`` yields ``(images uint8 [B, 3, H, W], labels [B] int64)`` (float and
        normalisation happen on the device: :func:`timm_icl.data.preprocess.normalize`);
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
        interpolation=interpolation,
        crop_mode=crop_mode,
        data_config=data_config,
        train_transform=train_transform,
        train_options=train_options,
        jpeg_draft=jpeg_draft,
        max_samples=max_samples,
    )
    generator = torch.Generator().manual_seed(seed)  # keeps the global RNG untouched (exact resume)
    common = dict(num_workers=num_workers, collate_fn=_collate, pin_memory=pin_memory, generator=generator)
    if num_workers > 0:
        common["persistent_workers"] = False
    if isinstance(dataset, IterableDataset):
        if samples_per_epoch is not None:
            raise ValueError("samples_per_epoch needs map-style data; for a stream use max_samples")
        total = info["num_samples"]
        per_rank = len(range(rank, total, world_size)) if total is not None else None
        if isinstance(dataset, _MapAsStream):
            dataset.rank, dataset.world_size = rank, world_size
            loader = DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, **common)
            wrapped = ImageLoader(loader, None, per_rank)
        else:  # whole shards per rank and worker, an exact resumable position (timm_icl.data.stream)
            from .stream import ShardedStream, ShardedStreamLoader

            stream = ShardedStream(
                dataset.hf_dataset,
                dataset.decoder,
                _collate,
                batch_size,
                rank=rank,
                world_size=world_size,
                num_streams=max(1, num_workers),
                shuffle=shuffle,
                seed=seed,
                drop_last=drop_last,
                shardable=max_samples is None,  # after take(): one pseudo-shard, every rank keeps its share
            )
            wrapped = ShardedStreamLoader(stream, num_workers=num_workers, pin_memory=pin_memory, num_samples=per_rank)
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


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Refuse a label outside the head (a stream whose classes were not all known at start, an unlabelled split
    with -1) with one ValueError line. Pass the CPU batch: on the device the check would cost a sync."""
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"the data has label {low}: an unlabelled split? (ImageNet's test split has none)")
    if high >= num_classes:
        raise ValueError(
            f"the data has label {high} but the model predicts {num_classes} classes: "
            f"pass --num-classes {high + 1} (or more)"
        )
