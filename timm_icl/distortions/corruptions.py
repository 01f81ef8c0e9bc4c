"""Camera corruptions of ImageNet-C, batched and on the images' device, with per-image severity.

Every function has the registry's signature (:func:`timm_icl.distortions.register_distortion`)::

    fn(images [B, C, H, W] float in [0, 1], severity [B] float tensor, generator) -> images [B, C, H, W]

``severity`` is ImageNet-C's level, an integer 1-5 per image (``jpeg_quality`` alone takes a JPEG quality 1-100),
and the parameters of each level are those of Hendrycks & Dietterich (2019) as implemented by the
``imagecorruptions`` package (PyPI, 1.1.2), the reference the tests compare against on real photos
(tests/test_corruptions.py). Where this code and the reference differ, the function's docstring says why and
the test bounds the difference, in 0-255 levels of the reference's uint8 output (which truncates, so up to one
level of difference comes from the reference's ``np.uint8`` alone):

- contrast, brightness, defocus_blur, zoom_blur: the same arithmetic; max difference <= 1 level.
- motion_blur: the same sum of edge-clamped shifts, given the same angle (the reference draws it from numpy's
  global RNG, this code from ``generator``); max difference <= 1 level with the angle passed in.
- pixelate: PIL rounds to uint8 between its horizontal and vertical passes, this code does not; <= 1 level.
- jpeg: libjpeg through torchvision instead of through PIL; on CPU, the decoded images agree within a few levels.
- shot_noise, impulse_noise: random; the statistics (mean and spread of the change, fraction of salt and pepper)
  agree with the reference's.

Nothing here reads or writes numpy arrays or PIL images, and nothing reads the device (no sync) except the JPEG
codec, which runs on the host: one copy there and back per batch. Constant tables live per device. Random
corruptions draw from ``generator`` (on the images' device) only, so a seeded generator gives the same images on
every run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import counter_rng
from .noise_blur import _reflect101_index, _trusted

__all__ = [
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "zoom_blur",
    "contrast",
    "brightness",
    "pixelate",
    "jpeg",
    "jpeg_quality",
    "defocus_kernel",
    "IMAGENET_C_PARAMETERS",
]

#: ImageNet-C's parameter of each level 1-5 (imagecorruptions 1.1.2), by corruption.
IMAGENET_C_PARAMETERS: dict[str, tuple] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # std in [0, 1] units; the registry's "noise" x 255
    "shot_noise": (60, 25, 12, 5, 3),  # photons per unit intensity
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),  # fraction of values replaced by 0 or 1
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),  # (disk radius px, anti-alias sigma)
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),  # (kernel radius px, sigma px)
    "zoom_blur": ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)),  # arange
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to HSV value
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # factor on the deviation from the channel mean
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),  # downscale factor
    "jpeg_compression": (25, 18, 15, 10, 7),  # JPEG quality
}


def _levels(severity: torch.Tensor, name: str) -> torch.Tensor:
    """ImageNet-C levels ``[B]`` -> long indices 0-4 on the same device; a clear error for anything else.

    The value check reads the device, so it is skipped where the conditions were checked when made
    (:func:`~timm_icl.distortions.noise_blur.values_checked`: the sampler, evaluation); out-of-range levels
    are clamped there (they cannot occur)."""
    sev = severity if isinstance(severity, torch.Tensor) else torch.as_tensor(severity)
    if sev.ndim != 1:
        raise ValueError(f"{name} severity must be a tensor of shape [B], got shape {tuple(sev.shape)}")
    if not _trusted() and ((sev != sev.round()) | (sev < 1) | (sev > 5)).any():
        raise ValueError(f"{name} severity must be an ImageNet-C level 1, 2, 3, 4 or 5, got {sev.tolist()}")
    return sev.round().long().clamp(1, 5) - 1


_DEVICE_TABLES: dict[tuple, torch.Tensor] = {}


def _on_device(key: tuple, device: torch.device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A constant table made on the CPU once and kept per device (no host-to-device copy per call)."""
    full_key = (*key, str(device))
    table = _DEVICE_TABLES.get(full_key)
    if table is None:
        if len(_DEVICE_TABLES) > 512:
            _DEVICE_TABLES.clear()
        table = _DEVICE_TABLES[full_key] = build().to(device)
    return table


def _table(name: str, levels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The parameter of each image's level as ``[B, 1, 1, 1]`` in ``like``'s dtype and device."""
    table = _on_device(
        ("param", name), like.device, lambda: torch.tensor(IMAGENET_C_PARAMETERS[name], dtype=torch.float64)
    )
    return table[_moved(levels, like.device)].to(like.dtype).view(-1, 1, 1, 1)


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


# ---------------------------------------------------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------------------------------------------------
def shot_noise(images: torch.Tensor, severity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Photon (Poisson) noise: ``clip(Poisson(x * c) / c, 0, 1)``, c = 60, 25, 12, 5, 3 photons per unit.

    Random: drawn with ``torch.poisson`` from ``generator``, so it matches the reference in distribution, not
    value by value (the test compares the mean and spread of ``out - x`` per level).
    """
    c = _table("shot_noise", _levels(severity, "shot_noise"), images)
    max_rate = max(IMAGENET_C_PARAMETERS["shot_noise"])
    return (counter_rng.poisson(images * c, generator, max_rate=max_rate) / c).clamp(0.0, 1.0)


def impulse_noise(
    images: torch.Tensor, severity: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Salt-and-pepper noise per value (each channel on its own, as skimage's ``random_noise(mode='s&p')``): a
    fraction c = 0.03, 0.06, 0.09, 0.17, 0.27 of the values becomes 0 or 1 with equal odds.

    Random: matches the reference in distribution (the test compares the fractions of 0s and 1s added).
    """
    c = _table("impulse_noise", _levels(severity, "impulse_noise"), images)
    flipped = counter_rng.rand(images.shape, generator, device=images.device, dtype=images.dtype) <= c
    salted = counter_rng.rand(images.shape, generator, device=images.device, dtype=images.dtype) <= 0.5
    out = torch.where(flipped & salted, torch.ones_like(images), images)
    return torch.where(flipped & ~salted, torch.zeros_like(images), out)


# ---------------------------------------------------------------------------------------------------------------------
# blur
# ---------------------------------------------------------------------------------------------------------------------
def _reflect_pad(images: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Reflect-101 padding (OpenCV's default border) for any pad, also wider than the image."""
    _, _, height, width = images.shape
    rows = _on_device(
        ("reflect", height, pad_h),
        images.device,
        lambda: _reflect101_index(torch.arange(-pad_h, height + pad_h), height),
    )
    cols = _on_device(
        ("reflect", width, pad_w), images.device, lambda: _reflect101_index(torch.arange(-pad_w, width + pad_w), width)
    )
    return _select(images.index_select(2, rows), 3, cols)


@functools.lru_cache(maxsize=16)
def defocus_kernel(radius: int, alias_blur: float) -> torch.Tensor:
    """ImageNet-C's defocus kernel: an aliased disk of ``radius`` px (on a grid of at least 17x17), normalised,
    then smoothed by OpenCV's ``GaussianBlur`` (3x3, or 5x5 above radius 8, sigma ``alias_blur``, reflect-101
    border). float64 ``[k, k]``, sums to 1 (up to rounding)."""
    half = 8 if radius <= 8 else radius
    ksize = 3 if radius <= 8 else 5
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((grid.view(-1, 1) ** 2 + grid.view(1, -1) ** 2) <= radius**2).to(torch.float32).double()
    disk = disk / disk.sum()
    # cv2.getGaussianKernel(ksize, sigma): exp(-(i - (k-1)/2)^2 / (2 sigma^2)), normalised
    x = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    g = torch.exp(-(x**2) / (2 * alias_blur**2))
    g = g / g.sum()
    r = ksize // 2
    padded = _reflect_pad(disk.view(1, 1, *disk.shape), r, r)[0, 0]
    smooth = F.conv2d(padded.view(1, 1, *padded.shape), (g.view(-1, 1) * g.view(1, -1)).view(1, 1, ksize, ksize))
    return smooth[0, 0]


def _fft_filter(padded: torch.Tensor, kernels: torch.Tensor, pad: int) -> torch.Tensor:
    """Convolve each padded image ``[B, C, H + 2p, W + 2p]`` with its centred kernel ``kernels [B or 1, 2p+1, 2p+1]``
    (tap ``[p + a, p + b]`` weighs the input pixel ``(y - a, x - b)``) and return the ``[B, C, H, W]`` interior.

    One FFT product per image instead of a spatial convolution: kernels of 17x17 to 81x81 taps cost the same, each
    image may have its own kernel, and it is one batched call on the GPU. Computed in the images' dtype (at least
    float32); the error is float rounding (~1e-6 of full scale in float32).
    """
    batch, channels, height_p, width_p = padded.shape
    dtype = torch.promote_types(padded.dtype, torch.float32)
    k = _moved(kernels, padded.device).to(dtype)
    size = 2 * pad + 1
    # place the kernel's centre at (0, 0), negative offsets wrapping around: a circular convolution whose wrapped
    # part falls in the padding, which is cut away
    rows = torch.remainder(torch.arange(-pad, pad + 1, device=padded.device), height_p)
    cols = torch.remainder(torch.arange(-pad, pad + 1, device=padded.device), width_p)
    full = torch.zeros(k.shape[0], height_p, width_p, dtype=dtype, device=padded.device)
    full[:, rows.view(-1, 1), cols.view(1, -1)] = k.view(-1, size, size)
    spectrum = torch.fft.rfft2(padded.to(dtype)) * torch.fft.rfft2(full).unsqueeze(1)
    out = torch.fft.irfft2(spectrum, s=(height_p, width_p))
    return out[..., pad : height_p - pad, pad : width_p - pad].to(padded.dtype)


def defocus_blur(
    images: torch.Tensor, severity: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Out-of-focus lens: a disk kernel of radius 3, 4, 6, 8, 10 px (:func:`defocus_kernel`), reflect-101 border.

    The reference's arithmetic (``cv2.filter2D`` is a correlation; the kernel is symmetric, so it equals the
    convolution done here, by FFT); differences are float rounding. ``generator`` is unused (deterministic).
    """
    levels = _moved(_levels(severity, "defocus_blur"), images.device)
    # every level's kernel centred in the largest (21 x 21): one padding, one FFT size, one batched call
    kernels = _on_device(("defocus",), images.device, _defocus_kernels)[levels]
    pad = kernels.shape[-1] // 2
    return _fft_filter(_reflect_pad(images, pad, pad), kernels, pad).clamp(0.0, 1.0)


def _defocus_kernels() -> torch.Tensor:
    """The five levels' kernels ``[5, k, k]`` (float64), each centred in the largest one's size, zero around."""
    kernels = [defocus_kernel(r, a) for r, a in IMAGENET_C_PARAMETERS["defocus_blur"]]
    size = max(k.shape[0] for k in kernels)
    return torch.stack([F.pad(k, [(size - k.shape[0]) // 2] * 4) for k in kernels])


def motion_blur(
    images: torch.Tensor,
    severity: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    angle: torch.Tensor | None = None,
) -> torch.Tensor:
    """Camera shake along a straight line at a random angle in [-45, 45) degrees per image.

    The kernel of imagecorruptions: ``2 * radius + 1`` taps with one-sided Gaussian weights ``exp(-i^2 / 2 s^2)``
    (radius, s) = (10, 3), (15, 5), (15, 8), (15, 12), (20, 15); tap ``i`` is the image shifted by
    ``round(i * (cos, sin)(angle))`` px with the border row/column repeated, and the taps stop at the first shift
    as large as the image. Done here exactly, not approximated: given the same angle the result equals the
    reference's up to float rounding. The taps are one kernel per image applied by FFT (:func:`_fft_filter`), so a
    batch with a different angle per image is one call. The original ImageNet-C rendered motion blur with
    ImageMagick; imagecorruptions replaced it by this kernel, and so does this function.

    Args:
        images, severity, generator: as every registered distortion.
        angle: ``[B]`` angles in degrees instead of the random draw (the test passes the reference's).
    """
    levels = _moved(_levels(severity, "motion_blur"), images.device)
    batch, _, height, width = images.shape
    params = _on_device(
        ("motion",), images.device, lambda: torch.tensor(IMAGENET_C_PARAMETERS["motion_blur"], dtype=torch.float64)
    )[levels]
    radius, sigma = params[:, 0], params[:, 1]
    if angle is None:
        angle = counter_rng.rand((batch,), generator, device=images.device, dtype=torch.float64) * 90.0 - 45.0
    angle = _moved(torch.as_tensor(angle), images.device).to(torch.float64).view(batch)
    # every level's taps fit in 2 * 20 + 1; the kernel and the FFT have that fixed size (no read of the draw)
    taps = int(2 * max(r for r, _ in IMAGENET_C_PARAMETERS["motion_blur"]) + 1)
    i = torch.arange(taps, dtype=torch.float64, device=images.device).view(1, -1)
    width_b = (2 * radius + 1).view(-1, 1)
    weights = torch.exp(-(i**2) / (2 * sigma.view(-1, 1) ** 2)) * (i < width_b)
    weights = weights / weights.sum(1, keepdim=True)
    rad = angle * (math.pi / 180.0)
    # the reference's point = width * (sin, cos), divided by hypot(point) = width: kept as written for equal rounding
    py, px = width_b.view(-1) * torch.sin(rad), width_b.view(-1) * torch.cos(rad)
    hypot = torch.hypot(py, px).view(-1, 1)
    dy = -torch.ceil(i * py.view(-1, 1) / hypot - 0.5).long()  # [B, taps], |dy| <= i < taps
    dx = -torch.ceil(i * px.view(-1, 1) / hypot - 0.5).long()
    inside = (dy.abs() < height) & (dx.abs() < width)
    weights = weights * torch.cumprod(inside.long(), dim=1)  # the reference stops at the first shift off the image
    # the taps as one kernel per image: weight w_i at offset (dy_i, dx_i), applied by FFT on the edge-padded batch
    pad = taps - 1
    size = 2 * pad + 1
    kernels = torch.zeros(batch, size, size, dtype=torch.float64, device=images.device)
    b_idx = torch.arange(batch, device=images.device).view(-1, 1).expand(-1, taps)
    kernels.index_put_((b_idx, dy + pad, dx + pad), weights, accumulate=True)
    out = _fft_filter(F.pad(images, (pad, pad, pad, pad), mode="replicate"), kernels, pad)
    return out.clamp(0.0, 1.0)


def _zoom_factors(level: int) -> list[float]:
    """``np.arange(start, stop, step)`` of the level, computed as numpy does (length ceil((stop-start)/step))."""
    start, stop, step = IMAGENET_C_PARAMETERS["zoom_blur"][level]
    return [start + k * step for k in range(math.ceil((stop - start) / step))]


def zoom_blur(images: torch.Tensor, severity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zooming during the exposure: the mean of the image and its centre crops enlarged by factors 1 to 1.11,
    1.16, 1.21, 1.26, 1.31 (11-16 factors per level).

    Each crop is ``ceil(n / z)`` px from ``(n - crop) // 2``, enlarged to ``round(crop * z)`` px by bilinear
    interpolation with corners aligned (scipy's ``zoom(order=1)`` is the same interpolation) and cut to the image
    size, as the reference does. ``generator`` is unused (deterministic).
    """
    levels = _moved(_levels(severity, "zoom_blur"), images.device)
    batch, _, height, width = images.shape
    crops, uses = _zoom_plan(height, width)
    uses = _on_device(("zoom", height, width), images.device, lambda: torch.tensor(uses))[levels]  # [B, crops]
    total = images.clone()
    # every distinct crop of any level once, on the whole batch, added where the image's level uses it: the sums
    # of each level in its own order (adding 0 elsewhere), so the same numbers as one level at a time
    for j, (top, left, ch, cw, size, _) in enumerate(crops):
        crop = images[..., top : top + ch, left : left + cw]
        zoomed = F.interpolate(crop, size=size, mode="bilinear", align_corners=True)[..., :height, :width]
        total = total + zoomed * uses[:, j].to(images.dtype).view(batch, 1, 1, 1)
    count = uses.sum(1).to(images.dtype).view(batch, 1, 1, 1)
    return (total / (count + 1)).clamp(0.0, 1.0)


@functools.lru_cache(maxsize=16)
def _zoom_plan(height: int, width: int) -> tuple[list[tuple], list[list[float]]]:
    """The distinct crops of the five levels' factors, in an order that keeps each level's own order, and which
    level uses which: ``([(top, left, crop_h, crop_w, (size_h, size_w), repeat)], uses [5][crops] of 0/1)``."""
    keys: list[tuple] = []
    per_level = []
    for level in range(5):
        mine = []
        for z in _zoom_factors(level):
            ch, cw = math.ceil(height / z), math.ceil(width / z)
            key = ((height - ch) // 2, (width - cw) // 2, ch, cw, (int(round(ch * z)), int(round(cw * z))))
            key = (*key, sum(k[:5] == key for k in mine))  # small images repeat a crop in a level: each is added
            if key not in keys:
                keys.append(key)
            mine.append(key)
        per_level.append(mine)
    keys.sort(key=lambda k: (-k[2], -k[3], k[4], k[5]))  # a larger factor crops less: later
    for mine in per_level:
        order = [keys.index(k) for k in mine]
        if order != sorted(order):  # cannot happen for ImageNet-C's increasing factors; guards the sums' order
            raise AssertionError("zoom_blur: a level's factors are not in increasing order")
    return keys, [[float(k in mine) for k in keys] for mine in per_level]


# ---------------------------------------------------------------------------------------------------------------------
# photometric
# ---------------------------------------------------------------------------------------------------------------------
def contrast(images: torch.Tensor, severity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Low contrast: ``(x - m) * c + m`` with ``m`` each channel's mean over the image, c = 0.4, 0.3, 0.2, 0.1, 0.05.
    The reference's arithmetic. ``generator`` is unused (deterministic)."""
    c = _table("contrast", _levels(severity, "contrast"), images)
    means = images.mean(dim=(2, 3), keepdim=True)
    return ((images - means) * c + means).clamp(0.0, 1.0)


def brightness(images: torch.Tensor, severity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brighter exposure: HSV value ``V = max(R, G, B)`` raised by c = 0.1-0.5 (clipped at 1), hue and saturation kept.

    The reference converts to HSV and back (skimage); with hue and saturation unchanged that round trip scales each
    pixel's RGB by ``V' / V`` (a black pixel becomes grey ``V'``), which is what is computed here, without the
    conversion; one-channel images become ``min(x + c, 1)``, as in the reference. ``generator`` is unused.
    """
    c = _table("brightness", _levels(severity, "brightness"), images)
    value = images.amax(dim=1, keepdim=True)
    raised = (value + c).clamp(max=1.0)
    scaled = images * (raised / value.clamp(min=torch.finfo(images.dtype).tiny))
    return torch.where(value > 0, scaled, raised.expand_as(images)).clamp(0.0, 1.0)


@functools.lru_cache(maxsize=64)
def _box_windows(n_in: int, n_out: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """PIL's BOX resampling along one axis (Pillow's ``precompute_coeffs``): output pixel ``o`` is the plain mean of
    the inputs ``lo[o] <= i < hi[o]``, those whose centres lie in ``((o + 0.5) s - s/2, (o + 0.5) s + s/2]``."""
    scale = n_in / n_out
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    lows, highs = [], []
    for o in range(n_out):
        center = (o + 0.5) * scale
        taps = [
            i
            for i in range(max(0, int(center - support + 0.5)), min(n_in, int(center + support + 0.5)))
            if -0.5 < (i - center + 0.5) / filter_scale <= 0.5
        ]
        lows.append(taps[0])
        highs.append(taps[-1] + 1)
    return tuple(lows), tuple(highs)


def _select(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, index)``; along the last dim as a ``gather`` (several times faster on the CPU)."""
    if dim % x.ndim != x.ndim - 1:
        return x.index_select(dim, index)
    return x.gather(-1, index.view([1] * (x.ndim - 1) + [-1]).expand(*x.shape[:-1], index.numel()))


@functools.lru_cache(maxsize=64)
def _nearest_positions(n_in: int, n_out: int) -> tuple[int, ...]:
    """PIL's NEAREST resize along one axis: output ``o`` reads input ``int((o + 0.5) * n_in / n_out)``, the position
    accumulated step by step in float64 as Pillow's affine transform does (a closed form differs at exact ties)."""
    step = n_in / n_out
    xx, positions = step * 0.5, []
    for _ in range(n_out):
        positions.append(min(int(xx), n_in - 1))
        xx += step
    return tuple(positions)


def _take(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` read at a per-image ``index [B, n]`` along ``dim`` (2 or 3)."""
    batch, channels, height, width = x.shape
    if dim == 2:
        return x.gather(2, index.view(batch, 1, -1, 1).expand(batch, channels, index.shape[1], width))
    return x.gather(3, index.view(batch, 1, 1, -1).expand(batch, channels, height, index.shape[1]))


def pixelate(images: torch.Tensor, severity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Low resolution: BOX-downscale by c = 0.6, 0.5, 0.4, 0.3, 0.25 (to ``int(n * c)`` px) and NEAREST-upscale back.

    PIL's windows and positions for both resizes (box means from cumulative sums, then an index); PIL rounds to
    uint8 after its horizontal pass and at the end, this code keeps floats (measured and tested: <= 1 level).
    ``generator`` is unused (deterministic).
    """
    levels = _moved(_levels(severity, "pixelate"), images.device)
    batch, _, height, width = images.shape
    x = images.to(torch.promote_types(images.dtype, torch.float32))
    # along W, then H: box means from cumulative sums, read directly at each output pixel's nearest small pixel
    for dim, n in ((3, width), (2, height)):
        lo, hi = _on_device(("pixelate", n), images.device, lambda n=n: _pixelate_axis(n))[:, levels]  # [B, n]
        sums = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.cumsum(dim)], dim)
        count = (hi - lo).to(x.dtype).view(batch, 1, -1, 1) if dim == 2 else (hi - lo).to(x.dtype).view(batch, 1, 1, -1)
        x = (_take(sums, dim, hi) - _take(sums, dim, lo)) / count
    return x.clamp(0.0, 1.0).to(images.dtype)  # sums' rounding


def _pixelate_axis(n: int) -> torch.Tensor:
    """Per level, for each output pixel along an axis of length ``n``: the BOX window ``[lo, hi)`` of the small
    pixel that PIL's NEAREST upscale reads there. ``[2, 5, n]`` long."""
    out = torch.zeros(2, 5, n, dtype=torch.long)
    for level, c in enumerate(IMAGENET_C_PARAMETERS["pixelate"]):
        small = max(1, int(n * c))
        lows, highs = _box_windows(n, small)
        nearest = _nearest_positions(small, n)
        out[0, level] = torch.tensor([lows[p] for p in nearest])
        out[1, level] = torch.tensor([highs[p] for p in nearest])
    return out


def _jpeg(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Encode each image as a JPEG of its quality and decode it (libjpeg through torchvision, on the host).

    The batch goes to the host once and comes back once, and the qualities are read once: a constant number of
    device syncs per batch, not one per image. Images of one quality are encoded and decoded as one list."""
    import warnings

    with warnings.catch_warnings():  # torchvision 0.29 announces its image codecs' move to torchcodec on import/use
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import decode_jpeg, encode_jpeg

    if images.shape[1] not in (1, 3):
        raise ValueError(f"jpeg needs images with 1 or 3 channels, got {images.shape[1]}")
    if images.shape[0] == 0:
        return images.clone()
    host = (images * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()
    qualities = quality.round().long().tolist()
    decoded: list[torch.Tensor | None] = [None] * len(qualities)
    for q in sorted(set(qualities)):
        idx = [i for i, qi in enumerate(qualities) if qi == q]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for i, d in zip(idx, decode_jpeg(encode_jpeg([host[i] for i in idx], quality=int(q))), strict=True):
                decoded[i] = d
    out = torch.stack(decoded)
    if images.device.type != "cpu":
        out = out.pin_memory().to(images.device, non_blocking=True)
    return out.to(images.dtype) / 255.0


def jpeg(images: torch.Tensor, severity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """JPEG compression at ImageNet-C's quality 25, 18, 15, 10, 7 (its ``jpeg_compression``).

    libjpeg's defaults through torchvision's ``encode_jpeg``/``decode_jpeg`` (the reference goes through PIL, also
    libjpeg with 4:2:0 chroma subsampling); images are rounded to uint8 first, as a JPEG holds 8 bits. The codec runs
    on the host for every device (the same bytes on CPU and CUDA). ``generator`` is unused.
    """
    levels = _levels(severity, "jpeg")
    return _jpeg(images, _table("jpeg_compression", levels, images.new_empty((), dtype=torch.float64)).view(-1))


def jpeg_quality(
    images: torch.Tensor, severity: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """JPEG compression at a given quality 1-100 per image (``jpeg_quality:20,50``); see :func:`jpeg`."""
    sev = torch.as_tensor(severity)
    if not _trusted() and ((sev != sev.round()) | (sev < 1) | (sev > 100)).any():
        raise ValueError(f"jpeg_quality severity must be a JPEG quality, an integer 1-100, got {sev.tolist()}")
    return _jpeg(images, sev)
