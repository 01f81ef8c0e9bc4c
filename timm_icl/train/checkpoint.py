"""Atomic, rotated, content-verified training checkpoints for accelerate runs, loaded without running any code.

A checkpoint is a folder ``checkpoints/checkpoint_<i>`` holding:

- ``model.safetensors`` (each prepared model, unwrapped; ``model_<j>.safetensors`` for more), ``optimizer.pt``,
  ``scheduler.pt`` (prepared schedulers), ``custom_<j>.safetensors`` / ``custom_<j>.pt`` (the objects registered with
  ``accelerator.register_for_checkpointing``: a module such as an EMA as safetensors, anything else by its
  ``state_dict``), ``scaler.pt`` (fp16's gradient scaler), written by the main process;
- ``rng_state_<rank>.pt`` (Python's, NumPy's, torch's CPU and every device's RNG state, accelerate's step counter) and
  ``train_state_<rank>.pt`` (the recipe's own state: position in the data, distortion sampler), one per process;
- ``COMPLETE`` (JSON: format, index, world size, step, and every file with its size and SHA-256), written last.

No pickle is ever loaded: modules are safetensors, every ``.pt`` file is read with ``torch.load(weights_only=True)``
(tensors and plain types only; a planted object raises instead of running). accelerate's own ``save_state`` /
``load_state`` are not used: they write the RNG states, the scheduler and registered objects as pickles and load
``custom_checkpoint_<j>.pkl`` with ``weights_only=False``. A file in the folder that the run does not expect (such a
``.pkl``) is never opened.

Saving is atomic and verified: every rank writes into ``checkpoints/.tmp-checkpoint_<i>``; each file is serialised in
memory, hashed, written and flushed (fsync); the main process then reads every file back from the disk (its cached
pages dropped first) and compares it with the hash of what was meant to be written, writes the marker, and only then
renames the folder into place. Rotation runs after that, so the previous checkpoints are never deleted before the new
one is verified; a kill at any moment leaves them intact and at worst a ``.tmp-*`` folder, which the next save
removes. A full disk ends the save with one line (:class:`DiskFull`: the path, the bytes needed and free) and removes
the half-written folder. Only folders named exactly ``checkpoint_<i>`` as written (``checkpoint_7``, not
``checkpoint_007`` or ``checkpoint_7.bak``) are checkpoints.

Resuming (:func:`resume_checkpoint`) from ``"latest"`` tries the newest complete checkpoint first: every file it
loads is read once, its SHA-256 compared with the marker before anything is applied, and a checkpoint whose content
does not match (flipped bytes, same-size garbage), or that is incomplete or does not load, is skipped with one line
naming it; the newest good one is used. Resuming from an older checkpoint moves the newer ones aside into
``checkpoints/superseded-<timestamp>/`` (never deleted). A checkpoint written by a different number of processes is
refused: each rank's data position and the global batch size depend on it. Checkpoints of the older format 1
(accelerate's pickles) are refused with one line.

SHA-256 rather than a faster non-cryptographic hash: with the CPU's SHA extensions it runs at about 1.8 GB/s on the
machine this was measured on, faster than BLAKE2b (0.9 GB/s) and within 2.4x of CRC32, and it is the hash users can
check with ``sha256sum``. A vgg16 checkpoint (weights + momentum, 1.1 GB) costs about 1.2 s of hashing per save
(in memory + the read-back) and 0.6 s per resume; see docs/reliability.md.

Example:
    >>> path = save_checkpoint(accelerator, "runs/icl/checkpoints", {"step": 120}, step=120, keep=3)  # doctest: +SKIP
    >>> resumed = resume_checkpoint(accelerator, "runs/icl/checkpoints", "latest")  # doctest: +SKIP
    >>> resumed.path, resumed.state["step"], resumed.skipped  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.disk import DiskFull, disk_full_message, free_bytes, is_disk_full
from ..utils.errors import first_line
from ..utils.files import fsync, replace_folder

__all__ = [
    "CheckpointError",
    "WorldSizeMismatch",
    "DiskFull",
    "Resumed",
    "MARKER",
    "FORMAT",
    "checkpoint_index",
    "list_checkpoints",
    "next_checkpoint_index",
    "verify_checkpoint",
    "find_resumable",
    "newest_verified",
    "save_checkpoint",
    "load_checkpoint",
    "resume_checkpoint",
    "set_aside_newer",
    "rotate_checkpoints",
    "sha256_file",
]

_logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
FORMAT = 2
_NAME = re.compile(r"checkpoint_(0|[1-9][0-9]*)")  # as written: no leading zeros, no suffix
_TMP_PREFIX = ".tmp-checkpoint_"
_CHUNK = 8 << 20
#: Testing hook: SIGKILL this process inside its N-th :func:`save_checkpoint` call, after the files were written and
#: before the marker (simulates a kill or a power cut in the middle of a save).
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
        skipped: one line per newer checkpoint that was skipped (incomplete, damaged, not loadable), newest first.
        set_aside: the ``superseded-<timestamp>`` folder that newer checkpoints were moved into, if any.
    """

    path: Path
    state: dict
    skipped: list[str] = field(default_factory=list)
    set_aside: Path | None = None


# ---------------------------------------------------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------------------------------------------------
def _sha256(data: bytes | memoryview) -> str:
    h = hashlib.sha256()
    view = memoryview(data)
    for i in range(0, len(view), _CHUNK):
        h.update(view[i : i + _CHUNK])
    return h.hexdigest()


def sha256_file(path: str | Path, from_disk: bool = False) -> str:
    """The SHA-256 of a file, read in 8 MiB chunks; ``from_disk``: drop its cached pages first (after an fsync this
    reads what the disk holds, not what the page cache remembers writing)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if from_disk and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# listing and verification (no accelerator needed)
# ---------------------------------------------------------------------------------------------------------------------
def checkpoint_index(path: str | Path) -> int | None:
    """``i`` for a folder named ``checkpoint_<i>`` exactly as written (``checkpoint_7``), else ``None``
    (``checkpoint_007``, ``checkpoint_3.bak``, ``.tmp-checkpoint_3``)."""
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


def _read_marker(path: Path) -> dict:
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"{path}: incomplete (no {MARKER} marker)")
    try:
        marker = json.loads(marker_path.read_text())
        fmt = int(marker.get("format", 1))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged {MARKER} marker ({type(e).__name__})") from None
    if fmt != FORMAT:
        raise CheckpointError(
            f"{path}: written in checkpoint format {fmt} by an older timm-icl, whose files are pickles that can run "
            "code when loaded: not resumed (start the run again)"
        )
    try:
        files = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in dict(marker["files"]).items()}
        written_by = int(marker["world_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged {MARKER} marker ({type(e).__name__})") from None
    marker["files"], marker["world_size"] = files, written_by
    return marker


def verify_checkpoint(path: str | Path, world_size: int | None = None, content: bool = False) -> dict:
    """Check that ``path`` is a complete checkpoint: marker present, every listed file there with its size, and with
    ``content`` its SHA-256 too (reads every file).

    Args:
        path: a ``checkpoint_<i>`` folder.
        world_size: this run's number of processes; a checkpoint from another count raises
            :class:`WorldSizeMismatch`.
        content: hash every file and compare it with the marker (a vgg16 checkpoint: about 0.6 s).

    Returns:
        The marker (``{"format", "index", "world_size", "step", "files": {relative path: (bytes, sha256)}, ...}``).

    Raises:
        CheckpointError: incomplete (no marker, written by a killed save), of the old pickle format, or damaged
            (a file missing, of the wrong size, or with other content).
    """
    path = Path(path)
    marker = _read_marker(path)
    files, written_by = marker["files"], marker["world_size"]
    for name, (size, digest) in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: damaged ({name} is missing)")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path}: damaged ({name} has {actual} bytes, {size} were written)")
        if content and sha256_file(file) != digest:
            raise CheckpointError(f"{path}: damaged ({name}: its content does not match the SHA-256 in {MARKER})")
    for r in range(written_by):
        for name in (f"train_state_{r}.pt", f"rng_state_{r}.pt"):
            if name not in files:
                raise CheckpointError(f"{path}: incomplete ({name} was not written)")
    if world_size is not None and written_by != world_size:
        raise WorldSizeMismatch(
            f"{path} was written by {written_by} process(es) and this run has {world_size}: resume it with "
            f"{written_by} (each process's position in the data and the global batch size depend on the count)"
        )
    return marker


def find_resumable(checkpoints_dir: str | Path, world_size: int | None = None) -> tuple[list[Path], list[str]]:
    """The complete checkpoints under ``checkpoints_dir``, newest first, and one line per incomplete one skipped.

    Completeness is checked from the marker and file sizes only (cheap); the content is checked when
    :func:`load_checkpoint` reads the files, which :func:`resume_checkpoint` does newest first.

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


def newest_verified(checkpoints_dir: str | Path) -> Path | None:
    """The newest checkpoint whose every file matches its SHA-256 (hashes them), or None."""
    for path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint(path, content=True)
        except CheckpointError:
            continue
        return path
    return None


# ---------------------------------------------------------------------------------------------------------------------
# what a checkpoint holds: the accelerator's objects, serialised without pickles
# ---------------------------------------------------------------------------------------------------------------------
def _objects(accelerator) -> list[tuple[str, Any]]:
    """``(file name, object)`` for everything the main process saves: prepared models (unwrapped), optimizers,
    schedulers, objects registered with ``register_for_checkpointing``, the gradient scaler."""
    objects: list[tuple[str, Any]] = []
    for i, model in enumerate(accelerator._models):
        objects.append(("model.safetensors" if i == 0 else f"model_{i}.safetensors", accelerator.unwrap_model(model)))
    for i, optimizer in enumerate(accelerator._optimizers):
        objects.append(("optimizer.pt" if i == 0 else f"optimizer_{i}.pt", optimizer))
    for i, scheduler in enumerate(accelerator._schedulers):
        objects.append(("scheduler.pt" if i == 0 else f"scheduler_{i}.pt", scheduler))
    for i, obj in enumerate(accelerator._custom_objects):
        objects.append((f"custom_{i}.safetensors" if isinstance(obj, torch.nn.Module) else f"custom_{i}.pt", obj))
    if accelerator.scaler is not None:
        objects.append(("scaler.pt", accelerator.scaler))
    return objects


def _module_bytes(module: torch.nn.Module) -> bytes:
    """The module's state dict as safetensors; a tensor shared under several names is stored once and its other
    names kept in the metadata (tied weights)."""
    from safetensors.torch import save

    tensors, aliases, seen = {}, {}, {}
    for name, value in module.state_dict().items():
        value = value.detach()
        key = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), value.shape, value.stride())
        if value.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = value.cpu().contiguous()
    return save(tensors, metadata={"aliases": json.dumps(aliases)})


def _load_module(module: torch.nn.Module, data: bytes) -> None:
    from safetensors.torch import load

    tensors = load(data)
    for name, source in json.loads(_safetensors_metadata(data).get("aliases", "{}")).items():
        tensors[name] = tensors[source]
    module.load_state_dict(tensors, strict=True)


def _safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file held in memory (its JSON header)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rng_state(accelerator) -> dict:
    """Every RNG this process draws from, as tensors and plain types (no NumPy arrays: ``weights_only`` loads it)."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "step": int(getattr(accelerator, "step", 0)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(accelerator, state: dict) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(k) for k in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        if "cuda" not in state:
            raise ValueError("the checkpoint holds no CUDA RNG state (written without a GPU)")
        states = state["cuda"]
        if len(states) != torch.cuda.device_count():
            raise ValueError(f"it holds {len(states)} CUDA RNG state(s), this machine has {torch.cuda.device_count()}")
        torch.cuda.set_rng_state_all(states)
    if "mps" in state and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
    if hasattr(accelerator, "step"):
        accelerator.step = int(state.get("step", 0))


def _serialise(obj: Any, name: str) -> bytes:
    return _module_bytes(obj) if name.endswith(".safetensors") else _torch_bytes(obj.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------------------------
def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and flush it to the disk (a full disk raises ``OSError(ENOSPC)`` here)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
    """Write a checkpoint atomically, verify it on the disk, then rotate. Call on every rank (it synchronises them).

    Args:
        accelerator: the run's ``accelerate.Accelerator``: its prepared models, optimizers and schedulers, the
            objects registered with ``register_for_checkpointing`` and the gradient scaler are saved.
        checkpoints_dir: the folder that holds ``checkpoint_<i>`` (created).
        state: this rank's recipe state: plain types, lists/dicts and tensors only (loaded with
            ``weights_only=True``).
        step: the optimizer step, recorded in the marker.
        keep: newest complete checkpoints kept after this one is in place and verified (at least 1: this one).
        index: the number ``i`` (default: after the highest present).

    Returns:
        The new ``checkpoint_<i>`` folder.

    Raises:
        DiskFull: the disk filled up (one line: the path, bytes needed and free); the half-written folder is removed,
            the previous checkpoints are untouched.
        CheckpointError: a file read back from the disk differs from what was written (nothing is rotated).
    """
    global _saves_in_this_process
    _saves_in_this_process += 1
    root = Path(checkpoints_dir)
    if index is None:
        index = next_checkpoint_index(root)
    final = root / f"checkpoint_{index}"
    tmp = root / f"{_TMP_PREFIX}{index}"
    rank, main = accelerator.process_index, accelerator.is_main_process
    problem: BaseException | None = None
    if main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for leftover in root.glob(f"{_TMP_PREFIX}*"):  # a save killed earlier: never complete, never used
                shutil.rmtree(leftover, ignore_errors=True)
            if final.exists():
                raise CheckpointError(f"{final} already exists; pass another index")
            tmp.mkdir()
        except (OSError, CheckpointError) as e:
            problem = e
    if not _all_ranks(accelerator, problem is None):
        _raise_save_error(problem, tmp, None, final)
    # this rank's files, serialised and hashed in memory first (what is meant to be on the disk)
    payload: dict[str, bytes] = {}
    if main:
        for name, obj in _objects(accelerator):
            payload[name] = _serialise(obj, name)
    payload[f"rng_state_{rank}.pt"] = _torch_bytes(_rng_state(accelerator))
    payload[f"train_state_{rank}.pt"] = _torch_bytes(state)
    needed = sum(len(b) for b in payload.values())
    digests = {name: _sha256(data) for name, data in payload.items()}
    try:
        free = free_bytes(tmp)
        if free is not None and free < needed:
            raise OSError(28, "No space left on device (checked before writing)")
        for name, data in payload.items():
            _write_bytes(tmp / name, data)
    except OSError as e:
        problem = e
    del payload
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(_saves_in_this_process):
        os.kill(os.getpid(), signal.SIGKILL)
    if not _all_ranks(accelerator, problem is None):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        _raise_save_error(problem, tmp, needed, final)
    if main:
        try:
            files = {}
            for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
                name = file.relative_to(tmp).as_posix()
                fsync(file)
                on_disk = sha256_file(file, from_disk=True)
                if name in digests and on_disk != digests[name]:
                    raise CheckpointError(
                        f"{final}: {name} read back from the disk differs from what was written: the checkpoint is "
                        "not used and no older one is removed (check the disk)"
                    )
                files[name] = {"bytes": file.stat().st_size, "sha256": on_disk}
            marker = {
                "format": FORMAT,
                "index": index,
                "world_size": accelerator.num_processes,
                "step": step,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "hash": "sha256",
                "files": files,
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            replace_folder(tmp, final)  # flushes the marker and the folder, renames, flushes the parent
        except (OSError, CheckpointError) as e:
            problem = e
            shutil.rmtree(tmp, ignore_errors=True)
    if not _all_ranks(accelerator, problem is None):
        _raise_save_error(problem, tmp, needed, final)
    if main:
        rotate_checkpoints(root, keep)  # only now: the new checkpoint is in place and was verified
    accelerator.wait_for_everyone()
    return final


def _raise_save_error(problem: BaseException | None, tmp: Path, needed: int | None, final: Path):
    if problem is None:  # another rank failed; it says why
        raise CheckpointError(f"{final}: not written (another process failed to write its part)")
    if is_disk_full(problem):
        raise DiskFull(disk_full_message(tmp.parent, needed, f"writing {final.name}")) from None
    if isinstance(problem, CheckpointError):
        raise problem
    raise CheckpointError(f"{final}: not written ({first_line(problem, with_type=True)})") from None


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
def load_checkpoint(accelerator, path: str | Path) -> dict:
    """Load a checkpoint into the accelerator's objects and return this rank's recipe state.

    Every file this rank needs is read once and its SHA-256 compared with the marker before anything is applied;
    nothing is unpickled (safetensors, ``torch.load(weights_only=True)``).

    Raises:
        CheckpointError: incomplete, damaged (content does not match), or a file does not load (one line naming the
            folder and the error).
        WorldSizeMismatch: written by another number of processes.
    """
    path = Path(path)
    marker = verify_checkpoint(path, accelerator.num_processes)
    rank = accelerator.process_index
    objects = _objects(accelerator)
    names = [name for name, _ in objects] + [f"rng_state_{rank}.pt", f"train_state_{rank}.pt"]
    data: dict[str, bytes] = {}
    for name in names:
        if name not in marker["files"]:
            raise CheckpointError(
                f"{path}: holds no {name} (written by a run with other settings, e.g. without --model-ema)"
            )
        data[name] = (path / name).read_bytes()
        if _sha256(data[name]) != marker["files"][name][1]:
            raise CheckpointError(f"{path}: damaged ({name}: its content does not match the SHA-256 in {MARKER})")
    try:
        decoded = {name: None if name.endswith(".safetensors") else _torch_load(data[name]) for name in names}
        for name, obj in objects:
            if name.endswith(".safetensors"):
                _load_module(obj, data[name])
            else:
                obj.load_state_dict(decoded[name])
        _set_rng_state(accelerator, decoded[f"rng_state_{rank}.pt"])
        return decoded[f"train_state_{rank}.pt"]
    except Exception as e:  # a file that does not parse, a planted object refused by weights_only, a shape mismatch
        raise CheckpointError(f"{path}: does not load ({first_line(e, with_type=True)})") from None


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
        which: ``"latest"``: the newest complete checkpoint whose content matches and that loads on every rank
            (damaged newer ones are skipped, one line each in :attr:`Resumed.skipped`); or a checkpoint folder,
            which must load.

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
