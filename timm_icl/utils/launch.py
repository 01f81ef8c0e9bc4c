"""How this process was launched: ``accelerate launch --cpu --num_processes N`` starts ONE process (accelerate's
simple launcher ignores N with ``--cpu``); :func:`cpu_launch_mismatch` notices it so that the tools can say so."""

from __future__ import annotations

import os
import re

__all__ = ["cpu_launch_mismatch"]


def _parent_cmdline() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:  # not Linux, or no /proc
        return []


def cpu_launch_mismatch(cmdline: list[str] | None = None, environ: dict | None = None) -> str | None:
    """A one-line explanation when ``accelerate launch --cpu`` asked for several processes but this is the only one
    (``ACCELERATE_USE_CPU`` set, no ``WORLD_SIZE``); None otherwise. ``cmdline``: the launcher's command line
    (default: the parent process's, from ``/proc``)."""
    environ = os.environ if environ is None else environ
    if str(environ.get("ACCELERATE_USE_CPU", "")).lower() not in ("true", "1") or "WORLD_SIZE" in environ:
        return None
    words = _parent_cmdline() if cmdline is None else cmdline
    text = " ".join(words)
    if "launch" not in text:
        return None
    found = re.search(r"--num[_-]processes[ =](\d+)", text)
    if found is None or int(found.group(1)) < 2:
        return None
    n = int(found.group(1))
    return (
        f"accelerate launch --cpu starts ONE process whatever --num_processes says ({n} asked): this run has 1. For "
        f"{n} CPU processes: OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes {n} --num_machines 1 "
        "--mixed_precision no --dynamo_backend no ..."
    )
