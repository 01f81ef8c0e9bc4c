"""Atomic, rotated training checkpoints for accelerate runs, and a resume that falls back past damaged ones.

A checkpoint is a folder ``checkpoints/checkpoint_<i>`` holding accelerate's ``save_state`` (model, optimizer,
registered objects such as the LR scheduler, each rank's RNG states), one ``train_state_<rank>.pt`` per process (the
recipe's own state: position in the data, distortion sampler; plain types and tensors only, loaded with
``weights_only=True``) and a ``COMPLETE`` marker (JSON: format, index, world size, step, every file with its size).

Saving is atomic: everything is written into ``checkpoints/.tmp-checkpoint_<i>``, flushed to disk (fsync), the
marker is written last, and only then the folder is renamed into place (by the main process, after every rank has
finished). Rotation runs after the rename, so a kill at any moment leaves the previous checkpoints intact and at worst
a ``.tmp-*`` folder, which the next save removes. Folders whose name is not ``checkpoint_<int>`` are ignored.

Resuming (:func:`resume_checkpoint`) from ``"latest"`` tries the newest complete checkpoint first and falls back to
the previous one when a file is missing, truncated or does not load, naming each one skipped. Resuming from an older
checkpoint moves the newer ones aside into ``checkpoints/superseded-<timestamp>/`` (never deleted), so the run
continues from there with fresh numbers. A checkpoint written by a different number of processes is refused: each
rank's data position and the global batch size depend on it.

Trust: accelerate stores RNG states and the scheduler as pickles, which run code when loaded. Resume only
checkpoints you wrote yourself.

Example:
    >>> path = save_checkpoint(accelerator, "runs/icl/checkpoints", {"step": 120}, step=120, keep=3)  # doctest: +SKIP
    >>> resumed = resume_checkpoint(accelerator, "runs/icl/checkpoints", "latest")  # doctest: +SKIP
    >>> resumed.path, resumed.state["step"], resumed.skipped  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils.files import replace_folder

__all__ = [
    "CheckpointError",
    "WorldSizeMismatch",
    "Resumed",
    "MARKER",
    "checkpoint_index",
    "list_checkpoints",
    "next_checkpoint_index",
    "verify_checkpoint",
    "find_resumable",
    "save_checkpoint",
    "load_checkpoint",
    "resume_checkpoint",
    "set_aside_newer",
    "rotate_checkpoints",
]

_logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
FORMAT = 1
_NAME = re.compile(r"checkpoint_(\d+)")
_TMP_PREFIX = ".tmp-checkpoint_"
#: Testing hook: SIGKILL this process inside its N-th :func:`save_checkpoint` call, after accelerate's files were
#: written and before the marker (simulates a kill or a power cut in the middle of a save).
KILL_DURING_SAVE_ENV = "TIMM_ICL_TEST_KILL_DURING_SAVE"
_saves_in_this_process = 0


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, damaged or does not load (the message is one line and names the folder)."""


class WorldSizeMismatch(CheckpointError):
    """The checkpoint was written by a different number of processes than this run has."""


@dataclass
class Resumed:
    """What :func:`resume_checkpoint` loaded.

    Attributes:
        path: the checkpoint folder that loaded.
        state: this rank's recipe state (what was passed to :func:`save_checkpoint` as ``state``).
        skipped: one line per newer checkpoint that was skipped (incomplete or damaged), newest first.
        set_aside: the ``superseded-<timestamp>`` folder that newer checkpoints were moved into, if any.
    """

    path: Path
    state: dict
    skipped: list[str] = field(default_factory=list)
    set_aside: Path | None = None


# ---------------------------------------------------------------------------------------------------------------------
# listing and verification (no accelerator needed)
# ---------------------------------------------------------------------------------------------------------------------
def checkpoint_index(path: str | Path) -> int | None:
    """``i`` for a folder named ``checkpoint_<i>``, else ``None`` (``checkpoint_3.bak``, ``.tmp-checkpoint_3``)."""
    m = _NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Every ``checkpoint_<int>`` folder under ``checkpoints_dir``, oldest (lowest index) first, complete or not."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_index(p), p) for p in root.iterdir() if p.is_dir()]
    return [p for i, p in sorted((i, p) for i, p in found if i is not None)]


def next_checkpoint_index(checkpoints_dir: str | Path) -> int:
    """One more than the highest ``checkpoint_<i>`` present (0 for none): new checkpoints sort after old ones."""
    existing = list_checkpoints(checkpoints_dir)
    return checkpoint_index(existing[-1]) + 1 if existing else 0


def verify_checkpoint(path: str | Path, world_size: int | None = None) -> dict:
    """Check that ``path`` is a complete checkpoint: marker present, every listed file there with its size.

    Args:
        path: a ``checkpoint_<i>`` folder.
        world_size: this run's number of processes; a checkpoint from another count raises
            :class:`WorldSizeMismatch`.

    Returns:
        The marker (``{"format", "index", "world_size", "step", "files": {relative path: bytes}, ...}``).

    Raises:
        CheckpointError: incomplete (no marker, written by a killed save or an older timm-icl) or damaged
            (a file missing or of the wrong size).
    """
    path = Path(path)
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"{path}: incomplete (no {MARKER} marker)")
    try:
        marker = json.loads(marker_path.read_text())
        files = dict(marker["files"])
        written_by = int(marker["world_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged {MARKER} marker ({type(e).__name__})") from None
    for name, size in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: damaged ({name} is missing)")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path}: damaged ({name} has {actual} bytes, {size} were written)")
    missing = [f"train_state_{r}.pt" for r in range(written_by) if f"train_state_{r}.pt" not in files]
    if missing:
        raise CheckpointError(f"{path}: incomplete ({missing[0]} was not written)")
    if world_size is not None and written_by != world_size:
        raise WorldSizeMismatch(
            f"{path} was written by {written_by} process(es) and this run has {world_size}: resume it with "
            f"{written_by} (each process's position in the data and the global batch size depend on the count)"
        )
    return marker


def find_resumable(checkpoints_dir: str | Path, world_size: int | None = None) -> tuple[list[Path], list[str]]:
    """The complete checkpoints under ``checkpoints_dir``, newest first, and one line per incomplete one skipped.

    Completeness is checked from the marker and file sizes only (cheap); whether a checkpoint *loads* is known only
    when :func:`load_checkpoint` tries it, which :func:`resume_checkpoint` does newest first.

    Raises:
        WorldSizeMismatch: the newest complete checkpoint was written by another number of processes.
    """
    candidates, skipped = [], []
    for path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint(path, world_size if not candidates else None)
        except WorldSizeMismatch:
            raise
        except CheckpointError as e:
            skipped.append(f"skipped {e}")
            continue
        candidates.append(path)
    return candidates, skipped


# ---------------------------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------------------------
def _all_ranks(accelerator, flag: bool) -> bool:
    """True when ``flag`` holds on every rank (one small all-reduce; none on a single process)."""
    if accelerator.num_processes == 1:
        return flag
    failed = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(failed, "sum").item() == 0)


def save_checkpoint(
    accelerator,
    checkpoints_dir: str | Path,
    state: dict[str, Any],
    *,
    step: int | None = None,
    keep: int = 3,
    index: int | None = None,
) -> Path:
    """Write a checkpoint atomically, then rotate. Call on every rank (it synchronises them).

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (its prepared model/optimizer and the objects registered
            with ``register_for_checkpointing`` are saved by ``save_state``; without automatic checkpoint naming).
        checkpoints_dir: the folder that holds ``checkpoint_<i>`` (created).
        state: this rank's recipe state: plain types, lists/dicts and tensors only (loaded with
            ``weights_only=True``).
        step: the optimizer step, recorded in the marker.
        keep: newest complete checkpoints kept after this one is in place (at least 1: this one).
        index: the number ``i`` (default: after the highest present).

    Returns:
        The new ``checkpoint_<i>`` folder.
    """
    global _saves_in_this_process
    _saves_in_this_process += 1
    root = Path(checkpoints_dir)
    if index is None:
        index = next_checkpoint_index(root)
    final = root / f"checkpoint_{index}"
    tmp = root / f"{_TMP_PREFIX}{index}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(f"{_TMP_PREFIX}*"):  # a save killed earlier: never complete, never used
            shutil.rmtree(leftover, ignore_errors=True)
        if final.exists():
            raise CheckpointError(f"{final} already exists; pass another index")
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(state, tmp / f"train_state_{accelerator.process_index}.pt")
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(_saves_in_this_process):
        os.kill(os.getpid(), signal.SIGKILL)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[file.relative_to(tmp).as_posix()] = file.stat().st_size
        marker = {
            "format": FORMAT,
            "index": index,
            "world_size": accelerator.num_processes,
            "step": step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        replace_folder(tmp, final)  # flushes every file and the folder, renames, flushes the parent
        rotate_checkpoints(root, keep)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(checkpoints_dir: str | Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` (at least 1) complete checkpoints; remove every other ``checkpoint_<i>`` folder.

    Returns:
        The removed folders.
    """
    found = list_checkpoints(checkpoints_dir)
    kept: list[Path] = []
    for path in reversed(found):
        if len(kept) == max(1, keep):
            break
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        kept.append(path)
    removed = [p for p in found if p not in kept]
    if not kept:  # nothing complete: remove nothing (it may be all that is left of a run)
        return []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# ---------------------------------------------------------------------------------------------------------------------
# loading and resuming
# ---------------------------------------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Load a checkpoint into the accelerator's objects and return this rank's recipe state.

    Raises:
        CheckpointError: incomplete, damaged, or a file does not load (one line naming the folder and the error).
        WorldSizeMismatch: written by another number of processes.
    """
    path = Path(path)
    verify_checkpoint(path, accelerator.num_processes)
    try:
        accelerator.load_state(str(path))
        return torch.load(path / f"train_state_{accelerator.process_index}.pt", weights_only=True)
    except Exception as e:  # any file that does not parse: safetensors, torch zip, pickle errors
        raise CheckpointError(f"{path}: does not load ({_first_line(e)})") from None


def set_aside_newer(checkpoints_dir: str | Path, index: int) -> Path | None:
    """Move every ``checkpoint_<j>`` with ``j > index`` into ``checkpoints_dir/superseded-<timestamp>/``.

    Called on the main process when a run resumes from ``checkpoint_<index>``: the newer checkpoints belong to the
    abandoned continuation. They are kept (never deleted) but no longer resumed or rotated.

    Returns:
        The ``superseded-<timestamp>`` folder, or ``None`` when there was nothing newer.
    """
    root = Path(checkpoints_dir)
    newer = [p for p in list_checkpoints(root) if checkpoint_index(p) > index]
    if not newer:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = root / f"superseded-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = root / f"superseded-{stamp}-{n}"
    aside.mkdir()
    for path in newer:
        os.replace(path, aside / path.name)
    return aside


def resume_checkpoint(accelerator, checkpoints_dir: str | Path, which: str | Path = "latest") -> Resumed | None:
    """Load the checkpoint to resume from; call on every rank.

    Args:
        accelerator: the run's accelerator, after ``prepare`` and ``register_for_checkpointing``.
        checkpoints_dir: the run's checkpoint folder.
        which: ``"latest"``: the newest complete checkpoint that loads on every rank (damaged newer ones are
            skipped, one line each in :attr:`Resumed.skipped`); or a checkpoint folder, which must load.

    Returns:
        What was loaded, or ``None`` for ``"latest"`` when there is no checkpoint at all. Checkpoints in
        ``checkpoints_dir`` newer than the one loaded are moved aside (:func:`set_aside_newer`).

    Raises:
        CheckpointError: the named checkpoint does not load, or none of the existing ones does (the message lists
            why); :class:`WorldSizeMismatch` for another number of processes.
    """
    root = Path(checkpoints_dir)
    if str(which) == "latest":
        candidates, skipped = find_resumable(root, accelerator.num_processes)
        if not candidates and not skipped:
            return None
    else:
        path = Path(which)
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a folder")
        verify_checkpoint(path, accelerator.num_processes)
        candidates, skipped = [path], []
    for path in candidates:
        error = None
        try:
            state = load_checkpoint(accelerator, path)
        except WorldSizeMismatch:
            raise
        except CheckpointError as e:
            error = str(e)
        if not _all_ranks(accelerator, error is None):
            if str(which) != "latest":
                raise CheckpointError(error or f"{path}: does not load on another process")
            skipped.append(f"skipped {error or f'{path}: does not load on another process'}")
            continue
        aside = None
        index = checkpoint_index(path)
        same_folder = path.parent.resolve() == root.resolve()
        if accelerator.is_main_process and same_folder and index is not None:
            aside = set_aside_newer(root, index)
        accelerator.wait_for_everyone()
        return Resumed(path=path, state=state, skipped=skipped, set_aside=aside)
    reasons = "; ".join(line.removeprefix("skipped ") for line in skipped)
    raise CheckpointError(f"no checkpoint under {root} can be resumed: {reasons}")
