"""Resumable sharded streams: a streamed ``datasets`` source read shard by shard, with an exact saved position.

A resumed run continues at the next sample without reading the decoded images it already trained on again
(checked by counting decodes in tests/test_stream.py). ``datasets``' own shuffle buffer cannot do that (see
ecosystem-notes, "Resuming a stream"), so this module reads whole shards itself:

- **Ranks**: each epoch a seeded permutation of the shard list (the same on every rank); rank ``r`` reads shards
  ``order[r::world_size]`` when there are at least as many shards as processes (ImageNet-wds: 1024 train shards).
  Otherwise every rank reads every shard and keeps every ``world_size``-th sample of each (said at start).
- **Workers**: the rank's shards are dealt to ``max(1, num_workers)`` *streams* (stream ``s`` reads shards
  ``[s::streams]``); DataLoader worker ``w`` runs one stream. Each stream decodes and batches in its worker, so
  every batch comes from one stream and carries that stream's position. torch's DataLoader takes batches from
  its workers round-robin, skipping exhausted ones; the loader records which stream comes next, and a resumed
  loader hands worker 0 that stream, so the order of batches continues unchanged with workers too.
- **Shuffle**: within a shard, blocks of ``window`` consecutive samples (this rank's samples of the shard) are
  permuted with a generator seeded by ``(seed, epoch, shard, block)``. The window's content is a function of the
  position, so a resumed stream re-reads only the raw rows of the current block (bytes, no decoding) and skips
  those already trained on. Samples do not mix across shards within one stream (shards of ImageNet-wds are
  already random draws of all classes); a global batch mixes ``world_size * streams`` shards.
- **Position** (:meth:`ShardedStreamLoader.state_dict`): ``epoch``, the next stream, and per stream the shard
  index in its list and the sample offset within that shard, after the last batch the trainer consumed.
  Skipping ``offset`` samples of a shard reads their raw rows (tar members / parquet rows) but decodes none.

Every batch is ``(images, labels)`` as produced by the ``collate`` given (``timm_icl.data``'s), plus ``ids``:
stable int64 sample ids ``shard_index << 32 | offset_in_shard`` (the shard's index in the source's file list,
the row's offset within that file), for cached reference targets.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

_logger = logging.getLogger(__name__)

__all__ = ["ShardedStream", "ShardedStreamLoader", "StreamBatch", "epoch_shard_order", "rank_shards", "sample_id"]

_STATE_FORMAT = "timm-icl-stream/1"
_READ_BATCH = 64  # rows per datasets read (raw bytes, cheap); not the training batch


def sample_id(shard: int, offset: int) -> int:
    """Stable id of the row at ``offset`` in source shard ``shard``: ``shard << 32 | offset``."""
    return (int(shard) << 32) | int(offset)


def epoch_shard_order(n_shards: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """The shard order of one epoch: a permutation seeded with ``(seed, epoch)`` (identity without shuffle)."""
    if not shuffle:
        return list(range(n_shards))
    generator = torch.Generator().manual_seed(_mix(seed, epoch))
    return torch.randperm(n_shards, generator=generator).tolist()


def rank_shards(order: list[int], rank: int, world_size: int) -> tuple[list[int], int, int]:
    """This rank's shards and its sample stride/phase within each: ``(shards, stride, phase)``.

    Whole shards (stride 1) when ``len(order) >= world_size``; otherwise all shards, every ``world_size``-th
    sample from ``rank``.
    """
    if len(order) >= world_size:
        return order[rank::world_size], 1, 0
    return list(order), world_size, rank


def _mix(*values: int) -> int:
    """A 63-bit seed from several ints (stable across runs and platforms)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class StreamBatch(tuple):
    """``(images, labels)`` that also carries ``ids`` (int64 ``[B]``, see :func:`sample_id`)."""

    ids: torch.Tensor

    def __new__(cls, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor):
        batch = super().__new__(cls, (images, labels))
        batch.ids = ids
        return batch


class ShardedStream(IterableDataset):
    """This rank's share of a streamed ``datasets`` source, decoded and batched per stream (one per worker).

    Args:
        source: a ``datasets.IterableDataset`` whose rows hold undecoded images (``Image(decode=False)``).
        decoder: ``decoder(row, index) -> sample | None`` (None: unusable image, skipped and counted).
        collate: ``collate(samples) -> (images, labels, num_skipped)``.
        batch_size: samples per batch (the last batch of each stream may be smaller).
        rank, world_size: this process and the number of processes.
        num_streams: ``max(1, num_workers)`` of the DataLoader that runs it.
        shuffle: permute shards per epoch and samples within windows.
        seed: base seed (the same on every rank).
        window: shuffle block size in samples (memory: ``window`` raw rows per worker).
        drop_last: drop each stream's last, smaller batch.
        shardable: read the source shard by shard (False: one pseudo-shard, e.g. after ``take``).
    """

    def __init__(
        self,
        source: Any,
        decoder: Callable[[dict, Any], Any],
        collate: Callable[[list], tuple],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_streams: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        window: int = 1024,
        drop_last: bool = False,
        shardable: bool = True,
    ):
        if batch_size < 1 or window < 1 or num_streams < 1:
            raise ValueError(f"batch_size, window, num_streams must be >= 1, got {batch_size}, {window}, {num_streams}")
        self.source, self.decoder, self.collate = source, decoder, collate
        self.batch_size, self.rank, self.world_size, self.num_streams = batch_size, rank, world_size, num_streams
        self.shuffle, self.seed, self.window, self.drop_last = shuffle, seed, window, drop_last
        self.n_shards = int(source.n_shards) if shardable else 1
        self.shardable = shardable
        self.epoch = 0
        self.resume: dict | None = None  # a state of this epoch to continue from (set by the loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def streams(self, epoch: int | None = None) -> tuple[list[list[int]], int, int]:
        """The shard lists of the streams of this rank for ``epoch``: ``(lists, stride, phase)``."""
        order = epoch_shard_order(self.n_shards, self.epoch if epoch is None else epoch, self.seed, self.shuffle)
        shards, stride, phase = rank_shards(order, self.rank, self.world_size)
        return [shards[s :: self.num_streams] for s in range(self.num_streams)], stride, phase

    # --- reading ------------------------------------------------------------------------------------------------
    def _rows(self, shard: int, stride: int, phase: int) -> Iterator[tuple[int, dict]]:
        """``(offset_in_shard, raw row)`` of this rank's samples of ``shard`` (no image decoding)."""
        source = self.source.shard(num_shards=self.n_shards, index=shard) if self.shardable else self.source
        offset = 0
        # .iter() reads without datasets' own split across DataLoader workers (the streams are dealt here)
        for block in source.iter(batch_size=_READ_BATCH):
            columns = list(block)
            for i in range(len(block[columns[0]])):
                if offset % stride == phase:
                    yield offset, {c: block[c][i] for c in columns}
                offset += 1

    def _samples(self, shard: int, skip: int, stride: int, phase: int) -> Iterator[tuple[int, dict]]:
        """This rank's rows of ``shard`` in training order, from the ``skip``-th on (rows before: read, not
        decoded)."""
        rows = self._rows(shard, stride, phase)
        if not self.shuffle:
            for _ in zip(range(skip), rows, strict=False):
                pass
            yield from rows
            return
        block_index, first = divmod(skip, self.window)
        for _ in zip(range(block_index * self.window), rows, strict=False):
            pass
        while True:
            block = [row for _, row in zip(range(self.window), rows, strict=False)]
            if not block:
                return
            generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch, shard, block_index))
            for j in torch.randperm(len(block), generator=generator).tolist()[first:]:
                yield block[j]
            block_index, first = block_index + 1, 0

    def __iter__(self) -> Iterator[tuple]:
        worker = torch.utils.data.get_worker_info()
        num_workers = worker.num_workers if worker is not None else 0
        if max(1, num_workers) != self.num_streams:
            raise RuntimeError(f"ShardedStream built for {self.num_streams} stream(s) runs in {num_workers} workers")
        lists, stride, phase = self.streams()
        resume = self.resume if self.resume is not None and self.resume["epoch"] == self.epoch else None
        first = resume["next_stream"] if resume else 0  # worker 0 runs the stream whose batch comes next
        stream = (first + (worker.id if worker is not None else 0)) % self.num_streams
        position = dict(resume["streams"][stream]) if resume else {"shard": 0, "offset": 0}
        shards = lists[stream]
        samples, ids = [], []
        for index in range(position["shard"], len(shards)):
            shard = shards[index]
            skip = position["offset"] if index == position["shard"] else 0
            for offset_in_rank, (offset, row) in enumerate(self._samples(shard, skip, stride, phase), start=skip):
                samples.append(self.decoder(row, sample_id(shard, offset)))
                ids.append(sample_id(shard, offset) if self.shardable else offset)
                if len(samples) == self.batch_size:
                    yield self._batch(samples, ids, stream, index, offset_in_rank + 1)
                    samples, ids = [], []
            position = {"shard": index + 1, "offset": 0}
        if samples and not self.drop_last:
            yield self._batch(samples, ids, stream, len(shards), 0)

    def _batch(self, samples: list, ids: list, stream: int, shard_index: int, offset: int) -> tuple:
        images, labels, skipped = self.collate(samples)
        kept = torch.tensor([i for i, s in zip(ids, samples, strict=True) if s is not None], dtype=torch.int64)
        return images, labels, skipped, kept, {"stream": stream, "shard": shard_index, "offset": offset}


class ShardedStreamLoader:
    """A DataLoader over a :class:`ShardedStream` that knows its exact position (``state_dict``).

    Same interface as ``timm_icl.data.ImageLoader`` (``set_epoch``, ``len``, ``num_skipped``,
    ``batch_sampler = None``); iterating yields :class:`StreamBatch` ``(images, labels)`` with ``.ids``.

    Args:
        stream: the :class:`ShardedStream` (its ``num_streams`` must be ``max(1, num_workers)``).
        num_workers: DataLoader workers (each runs one stream: decodes and batches).
        pin_memory: pin batches (CUDA).
        num_samples: this rank's samples per epoch when known (for ``len``).
    """

    batch_sampler = None
    _KEEP = 8  # positions kept for state_dict(batches=n): the loop may pull a batch or two ahead

    def __init__(self, stream: ShardedStream, *, num_workers: int = 0, pin_memory: bool = False, num_samples=None):
        self.stream, self.num_samples, self.batch_size = stream, num_samples, stream.batch_size
        extra = {"prefetch_factor": 2} if num_workers > 0 else {}
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **extra)
        self.num_skipped = 0
        self.num_decoded = 0  # samples decoded on this process (its batches), for tests and logs
        self._positions: OrderedDict[int, dict] = OrderedDict()
        self._reset(None)
        if stream.rank == 0 and stream.n_shards < stream.world_size:
            _logger.warning(
                "the stream has %d shard(s) for %d processes: every process reads all shards and keeps every "
                "%d-th sample of each",
                stream.n_shards,
                stream.world_size,
                stream.world_size,
            )
        per_rank = math.ceil(stream.n_shards / stream.world_size) if stream.n_shards >= stream.world_size else 1
        if stream.rank == 0 and per_rank < stream.num_streams:
            _logger.warning("%d shard(s) per process for %d workers: some workers stay idle", per_rank, num_workers)

    @property
    def dataset(self) -> ShardedStream:
        return self.stream

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("a streamed loader of unknown size has no len()")
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, or from the loaded position when it belongs to ``epoch``."""
        self.stream.set_epoch(epoch)
        pending = self.stream.resume
        if pending is not None and pending["epoch"] != epoch:
            self.stream.resume = None
        self._reset(self.stream.resume)

    def _reset(self, state: dict | None) -> None:
        self.epoch = self.stream.epoch
        if state is None:
            self._streams = [{"shard": 0, "offset": 0} for _ in range(self.stream.num_streams)]
            self._next, self._batches, self.last_batch_size = 0, 0, 0
        else:
            self._streams = [dict(s) for s in state["streams"]]
            self._next, self._batches = state["next_stream"], state["batches"]
            self.last_batch_size = state.get("last_batch_size", 0)
        self._positions.clear()
        self._positions[self._batches] = self._snapshot()

    def _snapshot(self) -> dict:
        s = self.stream
        return {
            "format": _STATE_FORMAT,
            "epoch": self.epoch,
            "batches": self._batches,
            "next_stream": self._next,
            "streams": [dict(p) for p in self._streams],
            "last_batch_size": self.last_batch_size,  # what a rank out of data replays (with weight 0)
            # what the position means; a resume with other values is refused
            "check": {
                "n_shards": s.n_shards,
                "rank": s.rank,
                "world_size": s.world_size,
                "num_streams": s.num_streams,
                "batch_size": s.batch_size,
                "shuffle": s.shuffle,
                "seed": s.seed,
                "window": s.window,
            },
        }

    def __iter__(self) -> Iterator[StreamBatch]:
        try:
            for images, labels, skipped, ids, where in self.loader:
                stream = where["stream"]
                self._streams[stream] = {"shard": where["shard"], "offset": where["offset"]}
                self._next = (stream + 1) % self.stream.num_streams
                self.num_skipped += skipped
                self.num_decoded += len(ids) + skipped
                if not len(labels):  # every image of the batch unusable: nothing to train on, nothing to count
                    continue
                self._batches += 1
                self.last_batch_size = len(labels)
                self._positions[self._batches] = self._snapshot()
                while len(self._positions) > self._KEEP:
                    self._positions.popitem(last=False)
                yield StreamBatch(images, labels, ids)
        finally:
            self.stream.resume = None  # a position is used once; the next iteration starts the epoch over

    def state_dict(self, batches: int | None = None) -> dict:
        """The position after the ``batches``-th batch of this epoch (default: the last one yielded).

        The training loop may pull a batch ahead of the one it trained on: it passes the count it trained on.
        """
        key = self._batches if batches is None else int(batches)
        if key not in self._positions:
            key = min(key, self._batches)  # the loop replays its last batch when this rank ran out first
        if key not in self._positions:
            raise ValueError(f"no stream position for batch {batches} (kept: {list(self._positions)})")
        return dict(self._positions[key])

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` at the next :meth:`set_epoch` of its epoch (nothing before it is decoded)."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a stream position of this version ({state.get('format')!r})")
        now = self._snapshot()["check"]
        changed = [f"{k} {v} -> {now[k]}" for k, v in state["check"].items() if now.get(k) != v]
        if changed:
            raise ValueError("the checkpoint's stream position does not fit this run: " + ", ".join(changed))
        self.stream.resume = {k: state[k] for k in ("epoch", "batches", "next_stream", "streams", "last_batch_size")}
        self.stream.set_epoch(state["epoch"])
        self._reset(self.stream.resume)
