"""Bit packing of boolean rows into bytes, big-endian within a byte (``numpy.packbits``' order), on any device.

Used by the target cache (one bit per constrained unit and image) and by the results file (one bit per image's
correctness)::

    bits [N, units] --pack_bits--> uint8 [N, ceil(units / 8)] --unpack_bits(shape)--> bool [N, *shape]

Example:
    >>> pack_bits(torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1, 1]]))  # doctest: +SKIP
    tensor([[177, 128]], dtype=torch.uint8)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["pack_bits", "unpack_bits"]

_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)  # big-endian bit order, as numpy.packbits
_SHIFTS_ON: dict[str, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    """:data:`_SHIFTS` on ``device``, copied once per device (not per call: a lookup in the training step)."""
    key = str(device)
    if key not in _SHIFTS_ON:
        _SHIFTS_ON[key] = _SHIFTS.to(device)
    return _SHIFTS_ON[key]


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack boolean rows into bytes.

    Args:
        bits: ``[N, ...]`` bool (or 0/1) tensor; everything after the first dim is flattened (units).

    Returns:
        uint8 ``[N, ceil(units / 8)]``, big-endian within a byte (``numpy.packbits`` order), zero-padded.
    """
    flat = bits.reshape(bits.shape[0], -1).to(torch.uint8)
    units = flat.shape[1]
    pad = (-units) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    weights = torch.bitwise_left_shift(torch.ones((), dtype=torch.uint8, device=flat.device), _shifts(flat.device))
    # the sum of distinct powers of two never exceeds 255, so uint8 arithmetic is exact
    return (flat.view(flat.shape[0], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[N, nbytes]`` -> bool ``[N, *shape]``."""
    units = math.prod(shape)
    if packed.shape[1] * 8 < units:
        raise ValueError(f"packed rows hold {packed.shape[1] * 8} bits, the layer shape {tuple(shape)} needs {units}")
    bits = torch.bitwise_right_shift(packed.unsqueeze(-1), _shifts(packed.device)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :units].bool().reshape(packed.shape[0], *shape)
