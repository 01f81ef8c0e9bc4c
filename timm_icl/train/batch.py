"""The global batch: the paper's 64 images per optimizer step, split over processes and accumulation steps."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BatchPlan", "split_global_batch", "plan_batch"]


def split_global_batch(global_batch: int, world: int, max_per_process: int | None = None) -> tuple[int, int]:
    """``(micro_batch, accumulation)`` per process such that ``micro_batch * accumulation * world == global_batch``.

    The fewest accumulation steps whose micro-batch fits ``max_per_process`` (None: no limit). A global batch
    that does not divide over the processes is refused (ValueError naming the nearest multiples): accumulation
    cannot fix that, and a different effective batch would not be the protocol asked for.
    """
    if global_batch < 1 or world < 1:
        raise ValueError(f"global batch {global_batch} and process count {world} must be >= 1")
    if global_batch % world:
        low, high = global_batch // world * world, (global_batch // world + 1) * world
        sizes = ", ".join(str(n) for n in range(1, global_batch + 1) if global_batch % n == 0 and n <= 64)
        raise ValueError(
            f"--global-batch-size {global_batch} does not split over {world} processes: pass "
            f"{' or '.join(str(n) for n in (low, high) if n)} or run {sizes} processes"
        )
    per_process = global_batch // world
    limit = per_process if max_per_process is None else max(1, max_per_process)
    accumulation = next(a for a in range(1, per_process + 1) if per_process % a == 0 and per_process // a <= limit)
    return per_process // accumulation, accumulation


@dataclass(frozen=True)
class BatchPlan:
    """Images per optimizer step = ``world * batch_size * grad_accum_steps`` = ``global_batch_size``."""

    global_batch_size: int
    batch_size: int  # per process and micro-batch
    grad_accum_steps: int
    world: int
    how: str

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch_size} = {self.world} process(es) x {self.batch_size} images x "
            f"{self.grad_accum_steps} accumulation step(s) ({self.how})"
        )


def plan_batch(global_batch_size: int | None, batch_size: int | None, grad_accum_steps: int, world: int) -> BatchPlan:
    """The batch for ``world`` processes: a per-process ``batch_size`` alone is taken as given (times accumulation and
    processes); otherwise ``global_batch_size`` (default: the paper's 64) is split, with ``batch_size`` as the most
    one process may hold."""
    if global_batch_size is None and batch_size is not None:
        return BatchPlan(
            batch_size * grad_accum_steps * world, batch_size, grad_accum_steps, world, "from --batch-size"
        )
    global_batch_size = global_batch_size or 64
    micro, accumulation = split_global_batch(global_batch_size, world, batch_size)
    return BatchPlan(global_batch_size, micro, accumulation, world, "split from --global-batch-size")
