"""The run folder's files besides checkpoints: metrics.jsonl (one JSON record per line) cut back on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

from timm_icl.utils.disk import DiskFull, disk_full_message, is_disk_full

__all__ = ["keep_metrics"]


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
