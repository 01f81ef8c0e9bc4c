"""The run folder's files besides checkpoints: metrics.jsonl (one JSON record per line) cut back on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["keep_metrics"]


def keep_metrics(path: str | Path, records: int, step: int) -> int:
    """Cut metrics.jsonl back to its first ``records`` lines (those up to ``step`` when ``records`` is -1: a checkpoint
    that did not count them); returns the number kept. Written aside and renamed: a kill leaves the old file or the
    new one, never a torn one."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
    if records >= 0:
        kept = lines[:records]
    else:
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return len(kept)
