"""A full disk said in one line: which path, how many bytes were needed and how many are free.

Writers catch the error (``OSError`` with ``ENOSPC``/``EDQUOT``, or a library's error whose text says "No space left"),
remove what they had half-written, and raise :class:`DiskFull` with :func:`disk_full_message`.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

__all__ = ["DiskFull", "is_disk_full", "free_bytes", "disk_full_message", "human_bytes"]


class DiskFull(OSError):
    """The disk (or quota) is full; the message is one line naming the path, the bytes needed and the bytes free."""


def is_disk_full(e: BaseException) -> bool:
    """True for ``ENOSPC``/``EDQUOT`` and for errors whose text says so (safetensors, torch's zip writer)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    return "no space left" in text or "disk quota exceeded" in text


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem of ``path`` (its nearest existing parent); None when unknown."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "an unknown number of bytes"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n} bytes ({n / size:.1f} {unit})"
    return f"{n} bytes"


def disk_full_message(path: str | Path, needed: int | None, what: str = "writing") -> str:
    """``"no space left on the device of PATH while writing: N bytes needed, M free; ..."`` (one line)."""
    return (
        f"no space left on the device of {path} while {what}: {human_bytes(needed)} needed, "
        f"{human_bytes(free_bytes(path))} free; free some space and rerun (a run resumes with --resume latest)"
    )
