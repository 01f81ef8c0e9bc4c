"""The run folder's files besides checkpoints: metrics.jsonl (one JSON record per line) cut back on resume; a full
disk while writing the run folder said in one line (:func:`disk_full_is_one_line`); the recipe's exit code, which
tells a finished run from a stopped one (:class:`ExitCode`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from timm_icl.utils.disk import DiskFull, disk_full_message, is_disk_full

__all__ = ["keep_metrics", "disk_full_is_one_line", "ExitCode"]


class ExitCode(int):
    """The recipe's exit code (an ``int``: ``sys.exit(main())`` works) and whether the run ``finished``: trained to
    its end and exported its model. A run stopped by SIGTERM/SIGUSR1 after a checkpoint exits 0 so that a cluster
    scheduler requeues it, Ctrl-C 130 (the shell's convention); both have ``finished`` False, so a caller in Python
    (``reproduce_table1.py``) never takes a stopped run for a finished one."""

    finished: bool

    def __new__(cls, code: int, finished: bool = True):
        obj = super().__new__(cls, code)
        obj.finished = finished
        return obj

    def __repr__(self) -> str:
        return f"ExitCode({int(self)}, finished={self.finished})"


@contextlib.contextmanager
def disk_full_is_one_line(run_dir: str | Path, what: str, model: torch.nn.Module | None = None):
    """A full disk inside the block ends the run with one line (the path, the bytes needed: about the size of
    ``model``'s weights, and the bytes free) instead of
    chained tracebacks, after removing what was half-written in ``run_dir`` (``.model.tmp-*``/``.model-ema.tmp-*``
    export folders, ``*.jsonl.tmp``): the previous export and checkpoints stay whole, and nothing is left that
    keeps the disk full. Any other error passes through."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        run_dir = Path(run_dir)
        for leftover in [*run_dir.glob(".model.tmp-*"), *run_dir.glob(".model-ema.tmp-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in run_dir.glob("*.jsonl.tmp"):
            leftover.unlink(missing_ok=True)
        if isinstance(e, DiskFull):  # already one line with the bytes it needed
            sys.exit(f"error: {e}")
        needed = sum(t.numel() * t.element_size() for t in model.state_dict().values()) if model is not None else None
        sys.exit(f"error: {disk_full_message(run_dir, needed, what)}")


def keep_metrics(path: str | Path, records: int, step: int) -> int:
    """Cut metrics.jsonl back to its first ``records`` lines (those up to ``step`` when ``records`` is -1: a checkpoint
    that did not count them); returns the number kept. Written aside and renamed: a kill leaves the old file or the
    new one, never a torn one; a full disk raises
    :class:`~timm_icl.utils.disk.DiskFull` (one line) and leaves the old file."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
    if records >= 0:
        kept = lines[:records]
    else:
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    text = "".join(kept)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:  # a full disk: the old file stays whole, the temporary one goes
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFull(disk_full_message(path.parent, len(text.encode()), f"cutting {path.name} back")) from None
        raise
    return len(kept)
