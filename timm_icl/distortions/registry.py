"""Distortions by name (a registry) and conditions.

A *distortion* is a registered function (:func:`register_distortion`)::

    fn(images [B, C, H, W] float in [0, 1], severity [B] float tensor, generator) -> images [B, C, H, W]

batched, on the images' device, with one severity per image. The paper's two are ``noise`` (Gaussian, sigma in
0-255 pixel units) and ``blur`` (Gaussian, sigma in pixels); :mod:`timm_icl.distortions.corruptions` adds
ImageNet-C's camera corruptions (``shot_noise``, ``impulse_noise``, ``defocus_blur``, ``motion_blur``, ``zoom_blur``,
``brightness``, ``contrast``, ``pixelate``, ``jpeg``: severity = ImageNet-C level 1-5) and ``jpeg_quality`` (a JPEG
quality 1-100).
A function registered by the user works everywhere a built-in one does: in text sets, the training sampler
(:class:`ICLTask`, the recipe's ``--distortions``), evaluation (per-image seeded when ``random=True``) and the CLI.

A *condition* is one (kind, severity) pair, e.g. ``noise:20``, ``blur:2`` or ``jpeg:3`` (the field is called
``sigma`` for the paper's sake). A *distortion set* is an ordered list of conditions, written as text::

    "noise:20,40,60,80,100 blur:2,4,6,8,10"        # the paper's ten conditions (the default)
    "shot_noise:1,3,5 jpeg_quality:20,50"          # any registered names; a bare name takes its default severities

Evaluation runs every condition of a set (plus clean); training draws one condition per image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import corruptions as _corruptions
from .noise_blur import gaussian_blur, gaussian_noise

__all__ = [
    "Distortion",
    "DistortionSpec",
    "call_distortion",
    "check_distortion_output",
    "register_distortion",
    "unregister_distortion",
    "get_distortion",
    "distortion_names",
    "KINDS",
]

#: The paper's kinds, the first three entries of :func:`distortion_names` (index 0 is "clean": no distortion).
KINDS = ("clean", "noise", "blur")

DistortionFn = Callable[[torch.Tensor, torch.Tensor, "torch.Generator | None"], torch.Tensor]


@dataclass(frozen=True)
class DistortionSpec:
    """A registered distortion: its function and what its severities mean (see :func:`register_distortion`)."""

    name: str
    fn: DistortionFn
    severities: tuple[float, ...]
    minimum: float = 0.0
    maximum: float = math.inf
    integer: bool = False
    random: bool = False
    whole_batch: bool = False
    on_host: bool = False
    counter_rng: bool = False
    unit: str = ""
    family: str = ""
    hint: str = ""

    def check(self, severity: float) -> None:
        """Raise a one-line ``ValueError`` unless ``severity`` is a valid severity of this distortion."""
        ok = math.isfinite(severity) and self.minimum <= severity <= self.maximum
        if ok and self.integer:
            ok = float(severity).is_integer()
        if not ok:
            if self.integer:
                rule = f"an integer in [{self.minimum:g}, {self.maximum:g}]"
            elif math.isinf(self.maximum):
                rule = f"finite and >= {self.minimum:g}"
            else:
                rule = f"in [{self.minimum:g}, {self.maximum:g}]"
            unit = f" ({self.unit})" if self.unit else ""
            raise ValueError(f"{self.name} sigma must be {rule}{unit}, got {severity}{self.hint}")


_REGISTRY: dict[str, DistortionSpec] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*[a-z_]|[a-z]")


def register_distortion(
    name: str,
    fn: DistortionFn,
    *,
    severities: Sequence[float],
    minimum: float = 0.0,
    maximum: float = math.inf,
    integer: bool = False,
    random: bool = False,
    whole_batch: bool = False,
    on_host: bool = False,
    counter_rng: bool = False,
    unit: str = "",
    family: str | None = None,
    hint: str = "",
    overwrite: bool = False,
) -> DistortionSpec:
    """Make ``fn`` usable by name in distortion sets, the training sampler, evaluation and the CLI.

    Args:
        name: lowercase letters, digits and ``_``, not ending in a digit (condition names append the severity:
            ``shot_noise3``).
        fn: ``fn(images, severity, generator) -> images``: ``images [B, C, H, W]`` float in [0, 1] on any device,
            ``severity [B]`` float tensor (one per image), ``generator`` a ``torch.Generator`` on the images'
            device or ``None``; returns ``[B, C, H, W]``, same dtype and device. Draw randomness from
            ``generator`` only: that is what makes training resumable and evaluation reproducible.
        severities: default severities, used when a set names the distortion without values (``"jpeg"``).
        minimum, maximum, integer: the valid severities (checked when a condition is made).
        random: ``fn`` uses the generator. Evaluation then seeds each image on its own
            (:func:`timm_icl.eval.evaluate.noise_seed`), so results do not depend on the batch size.
        whole_batch: severity 0 is what the training sampler gives ``fn`` on the images of other kinds (which
            must be accepted; results discarded). Every kind runs on the whole batch in training (no device sync
            to find its images); without this flag the others get the set's first severity of the kind.
        on_host: ``fn`` works on the host (a codec): the training sampler gives it only its own images (one read
            of the device per batch) instead of the whole batch.
        counter_rng: ``fn`` also accepts a :class:`~timm_icl.distortions.counter_rng.CounterRNG` as ``generator``
            (it draws through :mod:`timm_icl.distortions.counter_rng`): evaluation then draws every image's
            numbers for the whole batch at once, instead of one image at a time with its own generator.
        unit: what the severity means, for messages and plots (``"sigma, pixels"``).
        family: group for plots and tables (``"noise"``, ``"blur"``, ``"weather"``, ``"digital"``); default ``name``.
        hint: appended to the error for an invalid severity.
        overwrite: replace an existing registration of ``name`` (otherwise an error).

    ``fn`` is called once per default severity at registration, on a small CPU batch, and its output checked
    (shape, dtype, device, finite, in [0, 1]); again once at its first call on another device
    (:func:`check_distortion_output`): a mistake is one line naming the kind, not a crash inside training or a
    silent 0.0 in evaluation; the training step pays nothing for it.

    Returns:
        The :class:`DistortionSpec` stored.

    Example:
        >>> def invert(images, severity, generator=None):
        ...     return torch.lerp(images, 1 - images, severity.to(images).view(-1, 1, 1, 1))
        >>> _ = register_distortion("invert", invert, severities=(0.5, 1.0), maximum=1.0)
        >>> parse_distortions("invert:0.5,1 noise:20").to_text()
        'invert:0.5,1 noise:20'
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"distortion name {name!r} must be lowercase letters, digits and '_', start with a letter and not end "
            "in a digit"
        )
    if not callable(fn):
        raise TypeError(f"distortion {name!r}: fn must be callable fn(images, severity, generator), got {fn!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"distortion {name!r} is already registered; pass overwrite=True to replace it")
    if name in KINDS and name in _REGISTRY:
        raise ValueError(f"the built-in distortion {name!r} cannot be replaced")
    spec = DistortionSpec(
        name=name,
        fn=fn,
        severities=tuple(float(s) for s in severities),
        minimum=float(minimum),
        maximum=float(maximum),
        integer=bool(integer),
        random=bool(random),
        whole_batch=bool(whole_batch),
        on_host=bool(on_host),
        counter_rng=bool(counter_rng),
        unit=unit,
        family=family or name,
        hint=hint,
    )
    for s in spec.severities:
        spec.check(s)
    if _PROBE:
        check_distortion_output(spec)
    _REGISTRY[name] = spec
    return spec


_PROBE = False  # set after the built-ins (tested on their own) are registered: users' functions are probed
_CHECKED: set[tuple[str, int, str]] = set()  # (kind, id(fn), device) whose outputs were checked


def check_distortion_output(spec: DistortionSpec, device: torch.device | str = "cpu") -> None:
    """Call a user's ``fn`` once per default severity on a small batch (2 x 3 x 64 x 64 float32 in [0, 1] on
    ``device``, a seeded generator) and check what it returns: a tensor of the input's shape, dtype and device,
    finite, in [0, 1] (clamped). A one-line ``ValueError`` naming the kind otherwise.

    Done once per kind and device: at registration for the CPU, at the first call on another device
    (:func:`call_distortion`); afterwards a call costs a set lookup, no check and no device sync. The built-ins are
    tested on their own and never probed."""
    device = torch.device(device)
    key = (spec.name, id(spec.fn), str(device))
    if key in _CHECKED or id(spec.fn) in _BUILTIN_FNS:
        return
    from ..utils.sync_debug import host_side  # the probe reads its results on purpose: once, outside the step

    with host_side():
        _probe(spec, device)
    _CHECKED.add(key)


def _probe(spec: DistortionSpec, device: torch.device) -> None:
    shape = (2, 3, 64, 64)
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    where = f" on {device}" if device.type != "cpu" else ""
    severities = list(spec.severities) + ([0.0] if spec.whole_batch else [])
    for value in severities:
        severity = torch.full((2,), float(value), dtype=torch.float64, device=device)
        try:
            generator = torch.Generator(device=device).manual_seed(0)
        except RuntimeError:  # a device without generators (meta)
            generator = None
        what = f"distortion {spec.name!r} at severity {value:g}{where}"
        try:
            out = spec.fn(images.clone(), severity, generator)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(
                f"{what} raised {type(e).__name__}{': ' + first if first else ''} on images [2, 3, 64, 64] float32 in "
                "[0, 1] (fn(images, severity [B], generator))"
            ) from None
        if not isinstance(out, torch.Tensor) or out.shape != images.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{what} returned {got} for images of shape {tuple(images.shape)}")
        if out.dtype != images.dtype or out.device != images.device:
            raise ValueError(
                f"{what} returned {out.dtype} on {out.device} for {images.dtype} images on {images.device}: return "
                "the input's dtype and device"
            )
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"{what} returned NaN or inf values")
        low, high = float(out.min()), float(out.max())
        if low < -1e-6 or high > 1 + 1e-6:
            raise ValueError(
                f"{what} returned values in [{low:.4g}, {high:.4g}]; images are in [0, 1]: clamp the output"
            )


def unregister_distortion(name: str) -> None:
    """Remove a user-registered distortion (built-ins stay). Kind indices of later registrations shift: make
    samplers after the registry settles."""
    if name in KINDS or name in _BUILTINS:
        raise ValueError(f"the built-in distortion {name!r} cannot be removed")
    _REGISTRY.pop(name, None)


def get_distortion(name: str) -> DistortionSpec:
    """The registered :class:`DistortionSpec` of ``name``; a one-line error listing the registered names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown distortion kind {name!r}; registered: {', '.join(_REGISTRY)} (add one with register_distortion)"
        ) from None


def distortion_names() -> tuple[str, ...]:
    """Registered names in registration order: ``("clean", "noise", "blur", ...)``; the index of a name is the
    ``kinds`` code of :func:`apply_distortions` and :class:`DistortionSampler`."""
    return tuple(_REGISTRY)


@dataclass(frozen=True)
class Distortion:
    """One condition: a registered ``kind`` and its severity ``sigma`` (0-255 units for noise, pixels for blur,
    ImageNet-C level 1-5 for the camera corruptions; the kind's ``unit``).

    ``kernel_size`` (blur only) overrides the paper's ``4*sigma - 1``.
    """

    kind: str
    sigma: float = 0.0
    kernel_size: int | None = None

    def __post_init__(self) -> None:
        spec = get_distortion(self.kind)
        if self.kind != "clean":
            spec.check(self.sigma)
        if self.kernel_size is not None and (self.kind != "blur" or self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"kernel_size applies to blur only and must be odd and >= 1, got {self.kernel_size}")

    @property
    def name(self) -> str:
        """Short name used as a column key: ``clean``, ``noise20``, ``blur2``, ``blur2.5``, ``jpeg3``."""
        if self.kind == "clean":
            return "clean"
        return f"{self.kind}{self.sigma:g}"

    @property
    def random(self) -> bool:
        """Whether the kind draws random numbers (evaluation then seeds each image on its own)."""
        return get_distortion(self.kind).random

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Apply this condition to a batch ``[B, C, H, W]`` in [0, 1]."""
        if self.kind == "clean":
            return images
        if self.kind == "blur":  # a number: the matrices come from the per-device cache, nothing is read back
            return gaussian_blur(images, self.sigma, self.kernel_size)
        severity = torch.full((images.shape[0],), float(self.sigma), dtype=torch.float64, device=images.device)
        return call_distortion(get_distortion(self.kind), images, severity, generator)


def call_distortion(
    spec: DistortionSpec, images: torch.Tensor, severity: torch.Tensor, generator, **kwargs
) -> torch.Tensor:
    """Call a registered kind on ``images [B, C, H, W]`` with ``severity [B]``; checks the output's shape (and, at
    the first call of a user's kind on a device, its dtype, device and values: :func:`check_distortion_output`)."""
    if images.device.type != "cpu":
        check_distortion_output(spec, images.device)
    out = spec.fn(images, severity, generator, **kwargs)
    if not isinstance(out, torch.Tensor) or out.shape != images.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"distortion {spec.name!r} returned {got} for images of shape {tuple(images.shape)}")
    return out


# built-in distortions (registered at import, before the sets below are built)
# ---------------------------------------------------------------------------------------------------------------------
def _identity(images: torch.Tensor, severity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return images


def _noise(
    images: torch.Tensor, severity: torch.Tensor, generator: torch.Generator | None = None, clamp: bool = True
) -> torch.Tensor:
    return gaussian_noise(images, severity, generator=generator, clamp=clamp)


def _blur(images: torch.Tensor, severity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return gaussian_blur(images, severity)


register_distortion("clean", _identity, severities=(0.0,), maximum=0.0, family="clean")
register_distortion(
    "noise",
    _noise,
    severities=(20, 40, 60, 80, 100),
    random=True,
    whole_batch=True,
    counter_rng=True,
    unit="0-255 pixel units",
)
register_distortion("blur", _blur, severities=(2, 4, 6, 8, 10), unit="pixels")
_LEVEL = dict(severities=(1, 2, 3, 4, 5), minimum=1, maximum=5, integer=True, unit="ImageNet-C level")
register_distortion("shot_noise", _corruptions.shot_noise, random=True, counter_rng=True, family="noise", **_LEVEL)
register_distortion(
    "impulse_noise", _corruptions.impulse_noise, random=True, counter_rng=True, family="noise", **_LEVEL
)
register_distortion("defocus_blur", _corruptions.defocus_blur, family="blur", **_LEVEL)
register_distortion("motion_blur", _corruptions.motion_blur, random=True, counter_rng=True, family="blur", **_LEVEL)
register_distortion("zoom_blur", _corruptions.zoom_blur, family="blur", **_LEVEL)
register_distortion("brightness", _corruptions.brightness, family="weather", **_LEVEL)
register_distortion("contrast", _corruptions.contrast, family="digital", **_LEVEL)
register_distortion("pixelate", _corruptions.pixelate, family="digital", **_LEVEL)
register_distortion(
    "jpeg",
    _corruptions.jpeg,
    on_host=True,
    family="digital",
    hint="; for a JPEG quality write jpeg_quality:QUALITY",
    **_LEVEL,
)
register_distortion(
    "jpeg_quality",
    _corruptions.jpeg_quality,
    severities=(25, 18, 15, 10, 7),
    minimum=1,
    maximum=100,
    integer=True,
    on_host=True,
    unit="JPEG quality",
    family="digital",
)
_BUILTINS = frozenset(_REGISTRY)
_BUILTIN_FNS = frozenset(id(spec.fn) for spec in _REGISTRY.values())
_PROBE = True
