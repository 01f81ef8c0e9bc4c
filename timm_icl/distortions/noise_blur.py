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

import functools
import math

import torch
from torch import nn

__all__ = [
    "gaussian_noise",
    "gaussian_blur",
    "gaussian_kernel1d",
    "paper_kernel_size",
    "blur_matrix",
    "GaussianNoise",
    "GaussianBlur",
]


def _as_sigma_tensor(sigma: float | torch.Tensor, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """Return sigma as a float64 CPU-or-device tensor of shape [B], validated non-negative and finite."""
    sigma_t = torch.as_tensor(sigma, dtype=torch.float64)
    if sigma_t.ndim == 0:
        sigma_t = sigma_t.expand(batch)
    elif sigma_t.shape != (batch,):
        raise ValueError(
            f"{name} sigma must be a number or a tensor of shape [B]=[{batch}], got shape {tuple(sigma_t.shape)}"
        )
    if not torch.isfinite(sigma_t).all() or (sigma_t < 0).any():
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
        generator: optional ``torch.Generator`` on the images' device, for reproducible noise.
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
    std = (sigma_t / 255.0).to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
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

    Example:
        >>> gaussian_blur(torch.rand(2, 3, 16, 16), torch.tensor([2.0, 10.0])).shape
        torch.Size([2, 3, 16, 16])
    """
    _check_images(images, "gaussian_blur")
    batch, _, height, width = images.shape
    sigma_t = _as_sigma_tensor(sigma, batch, images.device, "blur")
    uniq = torch.unique(sigma_t)
    if uniq.numel() == 1:
        return _blur_same_sigma(images, float(uniq[0]), kernel_size)
    # Per-sample sigmas: one pair of GEMMs per distinct sigma (training draws from a handful of values).
    out = torch.empty_like(images)
    for s in uniq.tolist():
        idx = (sigma_t == s).nonzero().view(-1).to(images.device)
        out = out.index_copy(0, idx, _blur_same_sigma(images.index_select(0, idx), s, kernel_size))
    return out


def _blur_same_sigma(images: torch.Tensor, sigma: float, kernel_size: int | None) -> torch.Tensor:
    if sigma == 0 and kernel_size in (None, 1):
        return images.clone()
    _, _, height, width = images.shape
    # Matrices in the images' dtype; half precision keeps float32 matrices for accuracy then casts back.
    mat_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    m_h = blur_matrix(height, sigma, kernel_size, device=images.device, dtype=mat_dtype)
    m_w = blur_matrix(width, sigma, kernel_size, device=images.device, dtype=mat_dtype)
    x = images.to(mat_dtype)
    radius = (kernel_size if kernel_size is not None else paper_kernel_size(sigma)) // 2
    tile = 16 if radius <= 4 else 32
    if tile + 2 * radius <= min(height, width) // 2:
        # The banded matrix is mostly zeros: multiply tile by tile (an output tile of `tile` columns from its
        # input window +-radius). The same products, 1.4-1.7x faster on CPU at 224 px for sigma 2 and 10
        # (benchmarks/RESULTS.md); the reflection folded into the matrix stays inside the window.
        m_wt = m_w.t()
        x = torch.cat(
            [torch.matmul(x[..., lo:hi], m_wt[lo:hi, s:e]) for s, e, lo, hi in _tiles(width, radius, tile)], -1
        )
        x = torch.cat(
            [torch.matmul(m_h[s:e, lo:hi], x[..., lo:hi, :]) for s, e, lo, hi in _tiles(height, radius, tile)], -2
        )
        return x.to(images.dtype)
    x = torch.matmul(x, m_w.t())  # along W: [B, C, H, W] @ [W, W]
    x = torch.matmul(m_h, x)  # along H: [H, H] @ [B, C, H, W]
    return x.to(images.dtype)


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
