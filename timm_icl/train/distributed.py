"""Collectives the training loop needs across processes: "true on any rank" and walking ranks' loaders in step.

Every function here is a collective when several processes run: every rank must call it the same number of times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["any_rank", "all_ranks", "lockstep"]


def _count_true(accelerator: Any, flag: bool) -> int:
    """How many ranks have ``flag`` set (one small all-reduce; none on a single process)."""
    if accelerator.num_processes == 1:
        return int(bool(flag))
    return int(accelerator.reduce(torch.tensor([float(bool(flag))], device=accelerator.device), "sum").item())


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True when ``flag`` is true on any process."""
    return _count_true(accelerator, flag) > 0


def all_ranks(accelerator: Any, flag: bool) -> bool:
    """True when ``flag`` is true on every process."""
    return _count_true(accelerator, flag) == accelerator.num_processes


def lockstep(loader: Iterable, accelerator: Any, stand_in: Callable[[], Any]) -> Iterator[tuple[Any, float, bool]]:
    """Yield ``(batch, weight, is_last)`` until every rank is out of data.

    Ranks can hold one batch less than others (exactly-once sharding); such a rank replays its last batch (or
    ``stand_in()`` when it had none) with weight 0, so that DDP's collectives and the random draws stay matched.
    ``is_last`` is true on the final batch of every rank (known one batch ahead).
    """
    iterator, last = iter(loader), None

    def pull():
        batch = next(iterator, None)
        return batch, any_rank(accelerator, batch is not None)

    batch, alive = pull()
    while alive:
        following, alive_next = pull()
        weight = 1.0 if batch is not None else 0.0
        last = batch if batch is not None else last if last is not None else stand_in()
        yield last, weight, not alive_next
        batch, alive = following, alive_next
