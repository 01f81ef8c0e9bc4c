"""The sharded, resumable build of a target cache (:class:`~timm_icl.target_cache.TargetCache`): every process runs
the frozen reference over its shard of the training set in file order, writing a chunk file every ``chunk_batches``
batches with its stream position, so that an interrupted build continues after its last chunk without decoding the
images before it; the main process then merges all chunks into one file.

Files beside ``path`` (``targets.safetensors``): ``targets.part<rank>.json`` (progress: chunks written, position)
and ``targets.part<rank>.<chunk>.safetensors``; both are removed after the merge.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..target_cache import TargetCache, cache_fingerprint

__all__ = ["cache_preprocessing", "build_target_cache"]


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
