"""Atomic, durable writes: a file or a whole folder is replaced in one rename, after its bytes reached the disk.

A kill or a power cut at any moment leaves the previous version or the new one, never a mix:

- a file: :func:`atomic_write_text` writes a hidden ``.<name>.tmp`` beside it, flushes it (fsync) and renames it;
- a folder: write everything into a staging folder beside it (:func:`staging_folder`, or a name of your own), then
  :func:`replace_folder` flushes every file and the folder, puts it in place in one rename (an existing folder is
  swapped out in one step on Linux) and flushes the parent folder, so the rename itself survives a power cut.

Example:
    >>> staged = staging_folder(Path("runs/icl/model"))             # doctest: +SKIP
    >>> (staged / "config.json").write_text("{}")                    # doctest: +SKIP
    >>> replace_folder(staged, Path("runs/icl/model"))               # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

__all__ = ["fsync", "atomic_write_text", "staging_folder", "replace_folder"]


def fsync(path: str | Path) -> None:
    """Flush a file's bytes, or a folder's entries, to disk (a filesystem that cannot fsync a folder is skipped)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a hidden ``.<name>.tmp`` beside it, flushed, then renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def staging_folder(final: Path) -> Path:
    """A fresh hidden folder ``.<name>.tmp-<pid>`` beside ``final`` to write into; leftovers of a killed write
    (``.<name>.tmp-*``, ``.<name>.old-*``) are removed first.

    Raises:
        ValueError: ``final`` is a file.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ValueError(f"cannot write the folder {final}: it is a file, not a folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for leftover in final.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
    staged = final.parent / f".{final.name}.tmp-{os.getpid()}"
    staged.mkdir()
    return staged


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_folder(staged: Path, final: Path) -> None:
    """Put the complete folder ``staged`` at ``final`` in one rename, durably.

    Every file below ``staged`` and ``staged`` itself are flushed first, the parent folder after the rename. A
    missing or empty ``final`` is simply replaced; an existing one is swapped with ``staged`` in one atomic step
    (Linux) or, elsewhere, moved to ``.<name>.old-<pid>`` first (a kill between the two renames leaves it there,
    :func:`staging_folder` removes it next time); the previous folder is then deleted.
    """
    staged, final = Path(staged), Path(final)
    for path in [*staged.rglob("*"), staged]:
        if path.is_file() or path == staged:
            fsync(path)
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        os.replace(staged, final)
        old = None
    elif _exchange(staged, final):
        old = staged  # now holds the previous folder
    else:  # two renames: a kill between them leaves the previous folder in .<name>.old-<pid>
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(staged, final)
    fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
