"""Counter-based random numbers: every value a hash of (seed, condition, image index, draw, element index).

Evaluation needs noise that depends on the image, not on the batch it came in: the same image gets the same
noise at any batch size and on any number of processes. A seeded ``torch.Generator`` per image gives that only
one image at a time (a loop, and a reseed per image). :class:`CounterRNG` gives it for the whole batch at once:
the value at element ``e`` of image ``b`` in the ``d``-th draw is a function of ``(key, image_index[b], d, e)``
alone, computed with integer ops on the images' device (no loop, no sync, no state on the device).

The hash is ``lowbias32`` (Chris Wellons' 32-bit integer finaliser), applied in rounds; uniforms take its top 24 bits
(``(h >> 8 + 0.5) / 2**24``, in (0, 1)); normals come from two uniforms by Box-Muller; Poisson draws by inverting the
CDF in float64 with a fixed number of terms (no data-dependent loop). The built-in random kinds (``noise``,
``shot_noise``, ``impulse_noise``, ``motion_blur``) accept a ``CounterRNG`` wherever they accept a generator.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CounterRNG", "rand", "randn", "poisson"]

_MASK = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit values (products wrap; the low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def _mix_int(x: int) -> int:
    x &= _MASK
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


class CounterRNG:
    """Random numbers for a batch whose images have global indices ``image_index [B]`` (on the images' device).

    Args:
        seed: the evaluation seed.
        stream: a second key (evaluation passes the condition's index).
        image_index: ``[B]`` integer tensor: each image's position in the evaluation stream.

    Each call to :meth:`uniform`, :meth:`normal` or :meth:`poisson` is a new draw (the draw counter advances), so
    a function that draws twice gets two independent fields, the same ones on every run.
    """

    def __init__(self, seed: int, stream: int, image_index: torch.Tensor):
        self.key = _mix_int(_mix_int(int(seed) & _MASK) ^ _mix_int(0x632BE5AB + int(stream)))
        self.image_index = image_index.long()
        self.draws = 0

    @property
    def device(self) -> torch.device:
        return self.image_index.device

    def _bits(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform 32-bit integers (int64) of ``shape`` = ``[B, ...]``, one draw."""
        draw = _mix_int(self.key ^ _mix_int(0x9E3779B9 + self.draws))
        self.draws += 1
        batch = shape[0]
        per_image = math.prod(shape[1:])
        image_key = _mix((self.image_index.view(batch, 1) * 0x9E3779B1 + draw) & _MASK)
        element = torch.arange(per_image, device=self.device, dtype=torch.int64).view(1, per_image)
        h = _mix(_mix((image_key ^ (element * 0x85EBCA77 & _MASK)) & _MASK) ^ image_key)
        return h.view(shape)

    def uniform(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform in (0, 1): 24 random bits, centred in their interval."""
        u = ((self._bits(shape) >> 8).to(torch.float64) + 0.5) * (1.0 / (1 << 24))
        return u.to(dtype)

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal by Box-Muller from two uniform draws."""
        u1, u2 = self.uniform(shape, torch.float64), self.uniform(shape, torch.float64)
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)).to(dtype)

    def poisson(self, rate: torch.Tensor, max_rate: float) -> torch.Tensor:
        """Poisson draws of ``rate`` (any shape ``[B, ...]``, every value <= ``max_rate``), by inverting the CDF with
        a fixed number of terms (the tail beyond them has probability < 1e-15)."""
        u = self.uniform(tuple(rate.shape), torch.float64)
        lam = rate.to(torch.float64)
        terms = int(max_rate + 12.0 * math.sqrt(max_rate) + 20)
        p = torch.exp(-lam)
        cdf = p.clone()
        k = torch.zeros_like(lam)
        for i in range(1, terms + 1):
            k += (u > cdf).to(torch.float64)
            p = p * lam / i
            cdf = cdf + p
        return k.to(rate.dtype)


def rand(shape, generator, *, device, dtype) -> torch.Tensor:
    """``torch.rand`` from a ``torch.Generator`` (or None), or :meth:`CounterRNG.uniform`."""
    if isinstance(generator, CounterRNG):
        return generator.uniform(tuple(shape), dtype)
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def randn(shape, generator, *, device, dtype) -> torch.Tensor:
    """``torch.randn`` from a ``torch.Generator`` (or None), or :meth:`CounterRNG.normal`."""
    if isinstance(generator, CounterRNG):
        return generator.normal(tuple(shape), dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def poisson(rate: torch.Tensor, generator, *, max_rate: float) -> torch.Tensor:
    """``torch.poisson`` from a ``torch.Generator`` (or None), or :meth:`CounterRNG.poisson`."""
    if isinstance(generator, CounterRNG):
        return generator.poisson(rate, max_rate)
    return torch.poisson(rate, generator=generator)
