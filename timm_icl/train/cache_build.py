"""The sharded, resumable build of a target cache (:class:`~timm_icl.target_cache.TargetCache`): every process runs
the frozen reference over its shard of the training set in file order, writing a chunk file every ``chunk_batches``
batches with its stream position, so that an interrupted build continues after its last chunk without decoding the
images before it; the main process then merges all chunks into one file.

Files beside ``path`` (``targets.safetensors``): ``targets.part<rank>.json`` (progress: chunks written, position)
and ``targets.part<rank>.<chunk>.safetensors``; both are removed after the merge.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..target_cache import TargetCache, cache_fingerprint
from ..utils.errors import first_line

__all__ = ["cache_preprocessing", "build_target_cache", "verify_target_cache"]


def cache_preprocessing(data_config: Mapping[str, Any], dataset: str, split: str, max_samples: int | None) -> dict:
    """What cached bits depend on besides the weights and layers: the crops and which images (ids)."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
    return {**config, "dataset": dataset, "split": split, "max_samples": max_samples}


def _progress_file(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.part{rank}.json")


def _chunk_file(path: Path, rank: int, chunk: int) -> Path:
    return path.with_name(f"{path.stem}.part{rank}.{chunk:06d}{path.suffix}")


def build_target_cache(
    task,
    loader,
    path: str | Path,
    preprocessing: Mapping[str, Any],
    *,
    accelerator,
    chunk_batches: int = 256,
    total: int | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Build ``path`` from this process's ``loader`` (a resumable stream of this rank's shard, unshuffled, whose
    batches carry ``ids``). A collective: every process calls it; the main process merges.

    Args:
        task: the :class:`~timm_icl.ICLTask` whose frozen reference gives the bits.
        loader: a :mod:`timm_icl.data.stream` loader (``state_dict``/``load_state_dict``/``set_epoch``).
        preprocessing: :func:`cache_preprocessing` of the run: part of the cache's fingerprint.
        accelerator: accelerate's (ranks, barriers).
        total: images in the whole training set, for the progress bar (None: unknown).
    """
    from tqdm.auto import tqdm

    path = Path(path)
    rank, world = accelerator.process_index, accelerator.num_processes
    progress = _progress_file(path, rank)
    fingerprint = cache_fingerprint(task, preprocessing)
    chunks, images = 0, 0
    if progress.exists():
        saved = json.loads(progress.read_text())
        if saved["fingerprint"] == fingerprint and saved["world_size"] == world:
            loader.load_state_dict(saved["position"])
            chunks, images = saved["chunks"], saved["images"]
            say(f"reference targets: continuing after {images * world} images ({chunks} chunk(s) per process)")
    loader.set_epoch(0)
    bar = tqdm(total=total, initial=images * world, disable=not accelerator.is_main_process,
               desc="reference targets", unit="img")  # fmt: skip
    pending: list = []

    def flush() -> None:
        nonlocal chunks, images, pending
        if pending:
            with torch.no_grad():
                part = TargetCache.build(task, pending, preprocessing=preprocessing)
            part.save(_chunk_file(path, rank, chunks))
            chunks, images, pending = chunks + 1, images + len(part), []
        state = {"fingerprint": fingerprint, "world_size": world, "chunks": chunks, "images": images}
        progress.write_text(json.dumps({**state, "position": loader.state_dict()}))

    for batch in loader:
        pending.append((batch.ids, batch[0]))
        bar.update(len(batch.ids) * world)
        if len(pending) == chunk_batches:
            flush()
    flush()
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        counts = [json.loads(_progress_file(path, r).read_text())["chunks"] for r in range(world)]
        files = [_chunk_file(path, r, c) for r in range(world) for c in range(counts[r])]
        if not files:
            raise ValueError("--reference-targets: the training set yielded no images to cache")
        merged = TargetCache.concatenate([TargetCache.load(f) for f in files])
        os.replace(merged.save(path.with_name(path.name + ".tmp")), path)  # a kill leaves no half-written cache
        for f in files + [_progress_file(path, r) for r in range(world)]:
            f.unlink()
    accelerator.wait_for_everyone()


def verify_target_cache(task, cache: TargetCache, loader, *, batches: int = 4, max_flip_rate: float = 1e-3) -> tuple:
    """Compare the cache with the live reference on up to ``batches`` batches of this rank's share, starting at rows
    spread evenly over the file (its first, ..., its last: tampered rows anywhere are met, not only in the first
    batch). The stream is positioned at each (rows before it are read, not decoded).

    Args:
        loader: a fresh :mod:`timm_icl.data.stream` loader of this rank's share in file order, one stream
            (``num_workers=0``), as the cache was built from.

    Returns:
        ``(fraction of bits that differ, batches compared)``; a :class:`~timm_icl.target_cache.StaleCacheError`
        (one line) above ``max_flip_rate`` or when the data holds an image the cache does not.
    """
    from ..target_cache import StaleCacheError

    stream = loader.dataset
    lists, stride, phase = stream.streams(0)
    where = {shard: i for i, shard in enumerate(lists[0])}
    mine = []  # (index of the shard in this rank's list, this rank's offset in it) of every cached row of this rank
    if all(isinstance(i, int) for i in cache.ids):
        for image_id in cache.ids:
            shard, offset = (image_id >> 32, image_id & 0xFFFFFFFF) if stream.shardable else (0, image_id)
            if shard in where and offset % stride == phase:
                mine.append((where[shard], (offset - phase) // stride))
    mine.sort()
    picks = sorted({mine[round(j * (len(mine) - 1) / max(batches - 1, 1))] for j in range(batches)}) if mine else []
    starts = [{"shard": shard_index, "offset": offset} for shard_index, offset in picks] or [None]
    bits_per_image = sum(math.prod(shape) for shape in cache.shapes.values())
    flips = total = checked = 0
    for start in starts:
        if start is not None:
            state = loader.state_dict()
            state.update(epoch=0, batches=0, next_stream=0, streams=[start])
            loader.load_state_dict(state)
        loader.set_epoch(0)
        for batch in itertools.islice(loader, 1):
            try:
                rate = cache.verify(task, batch.ids, batch[0], max_flip_rate=1.0)
            except KeyError as e:  # an image of this data that the cache does not hold: built from other data
                what = first_line(e).strip("\"'")
                raise StaleCacheError(f"{what}; delete the cache to rebuild it") from None
            bits = bits_per_image * len(batch.ids)
            flips, total, checked = flips + rate * bits, total + bits, checked + 1
    rate = flips / max(total, 1)
    if rate > max_flip_rate:
        raise StaleCacheError(
            f"target cache disagrees with the live reference on {rate:.3%} of the bits of {checked} batches spread "
            "over it; delete it to rebuild it"
        )
    return rate, checked
