"""The divergence guard: remembers on the device the first optimizer step whose loss (or gradient norm) was not
finite, without reading anything back per step (no host sync); the loop checks it at log, checkpoint, validation
and export boundaries."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard:
    """Remembers, on the device, the first optimizer step whose loss parts (or gradient norm) were not finite.

    ``first`` = ``[step, loss, task_loss, constraint_loss, grad_norm]`` of that step (NaN while none was seen).

    Example:
        >>> guard = NonFiniteGuard(torch.device("cpu"), step=0)
        >>> guard.observe(torch.tensor([1.0, float("nan"), 0.5])); guard.end_step()
        >>> guard.first_bad(accelerator=None)[0]
        1.0
    """

    def __init__(self, device: torch.device, step: int):
        self.step = torch.tensor(float(step), device=device)  # optimizer steps done
        self.seen = torch.zeros((), dtype=torch.bool, device=device)
        self.first = torch.full((5,), float("nan"), device=device)

    def observe(self, parts: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        """``parts``: ``[loss, task_loss, constraint_loss]`` of a micro-batch; ``grad_norm``: the step's total norm."""
        norm = grad_norm.detach().float().reshape(1) if grad_norm is not None else parts.new_full((1,), math.nan)
        values = torch.cat([(self.step + 1).reshape(1), parts.float(), norm])
        bad = ~torch.isfinite(parts).all()
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(norm).all()
        self.first = torch.where(bad & ~self.seen, values, self.first)
        self.seen = self.seen | bad

    def end_step(self) -> None:
        self.step += 1

    def first_bad(self, accelerator: Any | None) -> list[float] | None:
        """``[step, loss, task_loss, constraint_loss, grad_norm]`` of the earliest non-finite step on any rank, or
        None. Reads the device (a sync) and, with several processes, is a collective: call it at boundaries only."""
        from .distributed import any_rank

        if accelerator is None or accelerator.num_processes == 1:
            return self.first.tolist() if bool(self.seen) else None
        if not any_rank(accelerator, bool(self.seen)):
            return None
        first = accelerator.gather(self.first.reshape(1, 5))  # [processes, 5]
        first = first[~torch.isnan(first[:, 0])]
        return first[first[:, 0].argmin()].tolist()
