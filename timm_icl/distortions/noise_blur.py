"""Image distortions of the paper: additive Gaussian noise and Gaussian blur, batched, on any device.

Both operate on float images ``[B, C, H, W]`` in [0, 1], *before* mean/std normalisation.

Units follow the paper:
- noise ``sigma`` is in 0-255 pixel units (sigma 20 adds N(0, (20/255)^2) in [0, 1] units);
- blur ``sigma`` is in pixels, with the paper's kernel size ``4*sigma - 1`` made odd by default.

Border rule of the blur: the image is extended by mirror reflection *without* repeating the edge
pixel (OpenCV's ``BORDER_REFLECT_101``, torch's ``"reflect"``), applied again and again when the
kernel is wider than the image (a 16x16 image with sigma 10 and its 39-tap kernel): the extension is
the periodic even extension with period ``2 * (n - 1)``. A 1-pixel-wide axis is constant. This is
exactly what OpenCV's ``borderInterpolate`` computes, so any image size works.

Implementation: the separable blur is two matrix products with a banded ``[n, n]`` matrix per axis
into which the reflection is folded (``out = M_h @ x @ M_w^T``). Dense GEMMs are much faster on CPU
and GPU than a depthwise convolution with a 39-tap kernel, and the result is the same convolution.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import torch
from torch import nn

from . import counter_rng

__all__ = [
    "gaussian_noise",
    "gaussian_blur",
    "gaussian_kernel1d",
    "paper_kernel_size",
    "blur_matrix",
    "GaussianNoise",
    "GaussianBlur",
    "blur_indexed",
    "values_checked",
]

# Value checks of tensor severities read the device (a sync). Conditions are checked once, when they are made
# (``Distortion``, ``DistortionSampler``); the code paths that apply them say so with :func:`values_checked`, and the
# functions skip their per-call check there. A direct call with a tensor still gets the one-line error.
_VALUES_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("timm_icl_values_checked", default=False)


@contextlib.contextmanager
def values_checked():
    """Inside this block, distortion functions trust tensor severities (checked when the conditions were made)."""
    token = _VALUES_CHECKED.set(True)
    try:
        yield
    finally:
        _VALUES_CHECKED.reset(token)


def _trusted() -> bool:
    return _VALUES_CHECKED.get()


def _as_sigma_tensor(sigma: float | torch.Tensor, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """Return sigma as a float64 tensor of shape [B] on ``device``, validated non-negative and finite.

    A Python number is checked on the host (free) and made on the device; a tensor is checked unless inside
    :func:`values_checked` (the check reads the device)."""
    if not isinstance(sigma, torch.Tensor):
        value = float(sigma)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} sigma must be finite and >= 0, got {value}")
        return torch.full((batch,), value, dtype=torch.float64, device=device)
    sigma_t = sigma.to(torch.float64)
    if sigma_t.ndim == 0:
        sigma_t = sigma_t.expand(batch)
    elif sigma_t.shape != (batch,):
        raise ValueError(
            f"{name} sigma must be a number or a tensor of shape [B]=[{batch}], got shape {tuple(sigma_t.shape)}"
        )
    if not _trusted() and (not torch.isfinite(sigma_t).all() or (sigma_t < 0).any()):
        raise ValueError(f"{name} sigma must be finite and >= 0, got {sigma_t.tolist()}")
    return sigma_t


def _check_images(images: torch.Tensor, fn: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{fn} expects a torch.Tensor of images [B, C, H, W], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{fn} expects images of shape [B, C, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(
            f"{fn} expects float images in [0, 1], got dtype {images.dtype}; convert uint8 with images.float() / 255"
        )


def gaussian_noise(
    images: torch.Tensor,
    sigma: float | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Add Gaussian noise of standard deviation ``sigma / 255``.

    Args:
        images: float images ``[B, C, H, W]`` in [0, 1].
        sigma: noise std in 0-255 pixel units; a number or a per-sample tensor ``[B]``.
        generator: optional ``torch.Generator`` on the images' device (or a
            :class:`~timm_icl.distortions.counter_rng.CounterRNG`), for reproducible noise.
        clamp: clamp the result to [0, 1], as an 8-bit camera would (the project's default; the paper
            does not say).

    Returns:
        Noisy images ``[B, C, H, W]``, same dtype and device.

    Example:
        >>> x = torch.rand(2, 3, 8, 8)
        >>> gaussian_noise(x, 20.0, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3, 8, 8])
    """
    _check_images(images, "gaussian_noise")
    sigma_t = _as_sigma_tensor(sigma, images.shape[0], images.device, "noise")
    std = (sigma_t / 255.0).to(images.dtype)
    std = (std if std.device == images.device else std.to(images.device)).view(-1, 1, 1, 1)
    noise = counter_rng.randn(images.shape, generator, device=images.device, dtype=images.dtype)
    out = images + noise * std
    return out.clamp(0.0, 1.0) if clamp else out


def paper_kernel_size(sigma: float) -> int:
    """The paper's blur kernel size ``4*sigma - 1``, rounded and made odd (sigma 2 -> 7, 10 -> 39), at least 1."""
    size = max(1, int(round(4.0 * float(sigma) - 1.0)))
    return size if size % 2 == 1 else size + 1


def gaussian_kernel1d(sigma: float, kernel_size: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Exact sampled Gaussian ``exp(-x^2 / (2 sigma^2))`` on ``x = -r..r``, normalised to sum 1. Shape ``[k]``.

    ``sigma == 0`` gives the identity kernel ``[1.]``.
    """
    k = paper_kernel_size(sigma) if kernel_size is None else int(kernel_size)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"blur kernel_size must be a positive odd integer, got {kernel_size}")
    if sigma == 0:
        return torch.ones(1, dtype=dtype)
    r = k // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-(x**2) / (2.0 * float(sigma) ** 2))
    return (w / w.sum()).to(dtype)


def _reflect101_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Map any integer index onto [0, n) by repeated mirror reflection without edge repeat (period 2(n-1))."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    m = torch.remainder(idx, period)
    return torch.where(m < n, m, period - m)


@functools.lru_cache(maxsize=256)
def _blur_matrix_cpu64(n: int, sigma: float, kernel_size: int | None) -> torch.Tensor:
    w = gaussian_kernel1d(sigma, kernel_size)
    r = w.numel() // 2
    rows = torch.arange(n).view(n, 1).expand(n, w.numel())
    cols = _reflect101_index(rows + torch.arange(-r, r + 1).view(1, -1), n)
    mat = torch.zeros(n, n, dtype=torch.float64)
    # index_put_ with accumulate folds the reflected taps back onto in-image pixels
    mat.index_put_((rows.reshape(-1), cols.reshape(-1)), w.expand(n, -1).reshape(-1), accumulate=True)
    return mat


def blur_matrix(
    n: int,
    sigma: float,
    kernel_size: int | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Banded ``[n, n]`` matrix ``M`` such that ``M @ v`` is the 1-D Gaussian blur of ``v`` (length n) with
    reflect-101 borders. Rows sum to 1. Built in float64 and cached on CPU."""
    return _blur_matrix_cpu64(int(n), float(sigma), kernel_size).to(device=device, dtype=dtype)


BlurParams = tuple[tuple[float, "int | None"], ...]
_DEVICE_MATRICES: dict[tuple, torch.Tensor] = {}


def _blur_stack(n: int, params: BlurParams, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[P, n, n]`` blur matrices of ``params`` ((sigma, kernel_size) each) on ``device`` in ``dtype``: built once
    (float64 on the CPU, then one copy), then served from a per-device cache, so a step copies nothing."""
    key = (n, params, str(device), dtype)
    stack = _DEVICE_MATRICES.get(key)
    if stack is None:
        if len(_DEVICE_MATRICES) > 512:
            _DEVICE_MATRICES.clear()
        cpu = torch.stack([_blur_matrix_cpu64(n, float(s), k) for s, k in params])
        stack = _DEVICE_MATRICES[key] = cpu.to(device=device, dtype=dtype)
    return stack


def _matrix_dtype(images: torch.Tensor) -> torch.dtype:
    # matrices in the images' dtype; half precision keeps float32 matrices for accuracy, then casts back
    return images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32


def gaussian_blur(
    images: torch.Tensor,
    sigma: float | torch.Tensor,
    kernel_size: int | None = None,
) -> torch.Tensor:
    """Separable Gaussian blur with the paper's kernel and reflect-101 borders.

    Args:
        images: float images ``[B, C, H, W]`` (in [0, 1] for the paper's protocol; any range works).
        sigma: blur std in pixels; a number or a per-sample tensor ``[B]``. 0 leaves an image unchanged.
        kernel_size: odd kernel size; default the paper's ``4*sigma - 1`` made odd, per sample.

    Returns:
        Blurred images ``[B, C, H, W]``, same dtype and device. Differentiable w.r.t. ``images``.

    A number needs nothing from the device. A tensor of per-image sigmas is read once (its distinct values: one
    device sync per call); the training sampler avoids even that with :func:`blur_indexed`.

    Example:
        >>> gaussian_blur(torch.rand(2, 3, 16, 16), torch.tensor([2.0, 10.0])).shape
        torch.Size([2, 3, 16, 16])
    """
    _check_images(images, "gaussian_blur")
    if kernel_size is not None and (int(kernel_size) < 1 or int(kernel_size) % 2 == 0):
        raise ValueError(f"blur kernel_size must be a positive odd integer, got {kernel_size}")
    if not isinstance(sigma, torch.Tensor):
        _as_sigma_tensor(sigma, 1, torch.device("cpu"), "blur")  # the host check of a number
        return _blur_same_sigma(images, float(sigma), kernel_size)
    sigma_t = _as_sigma_tensor(sigma, images.shape[0], images.device, "blur")
    values = torch.unique(sigma_t).tolist()  # the one read of an ad-hoc per-image tensor
    if len(values) == 1:
        return _blur_same_sigma(images, float(values[0]), kernel_size)
    params = tuple((float(v), kernel_size) for v in values)
    index = torch.searchsorted(torch.tensor(values, dtype=torch.float64, device=sigma_t.device), sigma_t)
    return blur_indexed(images, index.to(images.device), params)


def blur_indexed(images: torch.Tensor, index: torch.Tensor, params: BlurParams) -> torch.Tensor:
    """Blur image ``b`` with ``params[index[b]]`` (``(sigma, kernel_size)`` pairs; kernel_size None: the paper's):
    each image's own pair of matrices, gathered from the per-device cache, then two batched matrix products.

    Nothing is read from the device: the training path of :class:`~timm_icl.distortions.DistortionSampler`.
    """
    _check_images(images, "blur_indexed")
    _, _, height, width = images.shape
    mat_dtype = _matrix_dtype(images)
    m_h = _blur_stack(height, params, images.device, mat_dtype)[index].unsqueeze(1)  # [B, 1, H, H]
    m_wt = _blur_stack(width, params, images.device, mat_dtype)[index].transpose(-1, -2).unsqueeze(1)  # [B, 1, W, W]
    radius = max((k if k is not None else paper_kernel_size(s)) // 2 for s, k in params)
    return _banded_products(images.to(mat_dtype), m_h, m_wt, radius).to(images.dtype)


def _banded_products(x: torch.Tensor, m_h: torch.Tensor, m_wt: torch.Tensor, radius: int) -> torch.Tensor:
    """``m_h @ x @ m_wt`` for banded matrices of half-width ``radius`` (2-D, or batched ``[B, 1, n, n]``)."""
    _, _, height, width = x.shape
    tile = 16 if radius <= 4 else 32
    if tile + 2 * radius <= min(height, width) // 2:
        # The banded matrix is mostly zeros: multiply tile by tile (an output tile of `tile` columns from its
        # input window +-radius). The same products, 1.4-1.7x faster on CPU at 224 px for sigma 2 and 10
        # (benchmarks/RESULTS.md); the reflection folded into the matrix stays inside the window.
        x = torch.cat(
            [torch.matmul(x[..., lo:hi], m_wt[..., lo:hi, s:e]) for s, e, lo, hi in _tiles(width, radius, tile)], -1
        )
        return torch.cat(
            [torch.matmul(m_h[..., s:e, lo:hi], x[..., lo:hi, :]) for s, e, lo, hi in _tiles(height, radius, tile)], -2
        )
    return torch.matmul(m_h, torch.matmul(x, m_wt))  # along W: [B, C, H, W] @ [W, W], then along H


def _blur_same_sigma(images: torch.Tensor, sigma: float, kernel_size: int | None) -> torch.Tensor:
    if sigma == 0 and kernel_size in (None, 1):
        return images.clone()
    _, _, height, width = images.shape
    mat_dtype = _matrix_dtype(images)
    params = ((float(sigma), kernel_size),)
    m_h = _blur_stack(height, params, images.device, mat_dtype)[0]
    m_wt = _blur_stack(width, params, images.device, mat_dtype)[0].t()
    radius = (kernel_size if kernel_size is not None else paper_kernel_size(sigma)) // 2
    return _banded_products(images.to(mat_dtype), m_h, m_wt, radius).to(images.dtype)


def _tiles(n: int, radius: int, tile: int) -> list[tuple[int, int, int, int]]:
    """``(start, end, window_lo, window_hi)`` of each output tile along an axis of length ``n``."""
    return [(s, min(n, s + tile), max(0, s - radius), min(n, s + tile + radius)) for s in range(0, n, tile)]


class GaussianNoise(nn.Module):
    """Module form of :func:`gaussian_noise` (sigma in 0-255 pixel units)."""

    def __init__(self, sigma: float, clamp: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        if not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"noise sigma must be finite and >= 0, got {sigma}")
        self.sigma = float(sigma)
        self.clamp = clamp
        self.generator = generator

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return gaussian_noise(images, self.sigma, generator=self.generator, clamp=self.clamp)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, clamp={self.clamp}"


class GaussianBlur(nn.Module):
    """Module form of :func:`gaussian_blur` (sigma in pixels, paper's kernel size by default)."""

    def __init__(self, sigma: float, kernel_size: int | None = None):
        super().__init__()
        if not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"blur sigma must be finite and >= 0, got {sigma}")
        self.sigma = float(sigma)
        self.kernel_size = kernel_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(images, self.sigma, self.kernel_size)

    def extra_repr(self) -> str:
        k = self.kernel_size or paper_kernel_size(self.sigma)
        return f"sigma={self.sigma}, kernel_size={k}"
