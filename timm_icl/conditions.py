"""Distortions by name (a registry), conditions, sets of them parsed from text, and the per-image sampler.

A *distortion* is a registered function (:func:`register_distortion`)::

    fn(images [B, C, H, W] float in [0, 1], severity [B] float tensor, generator) -> images [B, C, H, W]

batched, on the images' device, with one severity per image. The paper's two are ``noise`` (Gaussian, sigma in
0-255 pixel units) and ``blur`` (Gaussian, sigma in pixels); :mod:`timm_icl.corruptions` adds ImageNet-C's camera
corruptions (``shot_noise``, ``impulse_noise``, ``defocus_blur``, ``motion_blur``, ``zoom_blur``, ``brightness``,
``contrast``, ``pixelate``, ``jpeg``: severity = ImageNet-C level 1-5) and ``jpeg_quality`` (a JPEG quality 1-100).
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from . import corruptions as _corruptions
from .distortions import gaussian_blur, gaussian_noise

__all__ = [
    "Distortion",
    "DistortionSet",
    "DistortionSampler",
    "DistortionSpec",
    "apply_distortions",
    "parse_distortions",
    "register_distortion",
    "unregister_distortion",
    "get_distortion",
    "distortion_names",
    "PAPER_DISTORTIONS",
    "IMAGENET_C_DISTORTIONS",
    "IMAGENET_C_10",
    "SMALL_IMAGE_DISTORTIONS",
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
            (:func:`timm_icl.evaluate.noise_seed`), so results do not depend on the batch size.
        whole_batch: the training sampler calls ``fn`` on the whole batch (severity 0 on images of other kinds,
            which must be accepted, results discarded) instead of on the images of this kind only, so the random
            stream does not depend on which images drew it (the paper's ``noise``).
        unit: what the severity means, for messages and plots (``"sigma, pixels"``).
        family: group for plots and tables (``"noise"``, ``"blur"``, ``"weather"``, ``"digital"``); default ``name``.
        hint: appended to the error for an invalid severity.
        overwrite: replace an existing registration of ``name`` (otherwise an error).

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
        unit=unit,
        family=family or name,
        hint=hint,
    )
    for s in spec.severities:
        spec.check(s)
    _REGISTRY[name] = spec
    return spec


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
    def severity(self) -> float:
        """The severity, in the kind's unit (the same number as ``sigma``)."""
        return self.sigma

    @property
    def random(self) -> bool:
        """Whether the kind draws random numbers (evaluation then seeds each image on its own)."""
        return get_distortion(self.kind).random

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Apply this condition to a batch ``[B, C, H, W]`` in [0, 1]."""
        if self.kind == "clean":
            return images
        if self.kind == "blur" and self.kernel_size is not None:
            return gaussian_blur(images, self.sigma, self.kernel_size)
        severity = torch.full((images.shape[0],), float(self.sigma), dtype=torch.float64, device=images.device)
        return _call(get_distortion(self.kind), images, severity, generator)


def _call(spec: DistortionSpec, images: torch.Tensor, severity: torch.Tensor, generator, **kwargs) -> torch.Tensor:
    out = spec.fn(images, severity, generator, **kwargs)
    if not isinstance(out, torch.Tensor) or out.shape != images.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"distortion {spec.name!r} returned {got} for images of shape {tuple(images.shape)}")
    return out


_NAMED_SETS_HELP = "'paper', 'imagenet-c', 'imagenet-c-10', 'small'"


def parse_distortions(text: str | Iterable[Distortion] | DistortionSet | None) -> DistortionSet:
    """Parse ``"noise:20,40 blur:2,4 jpeg:1,3"`` (space- or semicolon-separated groups ``kind:s1,s2,...`` of
    registered kinds; a bare kind takes its default severities).

    ``None`` or ``"paper"`` gives the paper's set; ``"imagenet-c"`` the ImageNet-C noise/blur set;
    ``"imagenet-c-10"`` the ten ImageNet-C corruptions implemented here, 5 levels each (:data:`IMAGENET_C_10`);
    ``"small"`` (alias ``"28px"``, ``"fashion-mnist"``) the set scaled for 28 px images.
    """
    if text is None:
        return PAPER_DISTORTIONS
    if isinstance(text, DistortionSet):
        return text
    if not isinstance(text, str):
        return DistortionSet(list(text))
    key = text.strip().lower()
    if key in ("paper", "default"):
        return PAPER_DISTORTIONS
    if key in ("imagenet-c", "imagenet_c", "imagenetc"):
        return IMAGENET_C_DISTORTIONS
    if key in ("imagenet-c-10", "imagenet_c_10"):
        return IMAGENET_C_10
    if key in ("imagenet-c-15", "imagenet_c_15", "imagenet-c-all"):
        raise ValueError(
            "imagenet-c-15 needs glass_blur, snow, frost, fog and elastic_transform, which timm-icl does not render; "
            "use 'imagenet-c-10' (the other ten of the fifteen, 5 levels each)"
        )
    if key in ("small", "28px", "fashion-mnist"):
        return SMALL_IMAGE_DISTORTIONS
    conditions: list[Distortion] = []
    for group in key.replace(";", " ").split():
        kind, sep, values = group.partition(":")
        if not sep and kind in _REGISTRY and kind != "clean":
            conditions += [Distortion(kind, s) for s in _REGISTRY[kind].severities]
            continue
        if not sep or not values:
            raise ValueError(
                f"cannot parse distortion group {group!r} in {text!r}; write groups like 'noise:20,40 blur:2,4' "
                f"or a set: {_NAMED_SETS_HELP}"
            )
        if kind not in _REGISTRY or kind == "clean":
            raise ValueError(
                f"unknown distortion kind {kind!r} in {text!r}; registered: "
                f"{', '.join(n for n in _REGISTRY if n != 'clean')}"
            )
        for value in values.split(","):
            try:
                sigma = float(value)
            except ValueError:
                raise ValueError(f"sigma {value!r} of {kind!r} in {text!r} is not a number") from None
            conditions.append(Distortion(kind, sigma))
    if not conditions:
        raise ValueError(f"no distortions in {text!r}; write groups like 'noise:20,40 blur:2,4'")
    return DistortionSet(conditions)


class DistortionSet(Sequence):
    """An ordered, duplicate-free list of :class:`Distortion` conditions."""

    def __init__(self, conditions: Sequence[Distortion]):
        conditions = list(conditions)
        names = [c.name for c in conditions]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate conditions in distortion set: {names}")
        self.conditions = conditions

    def __getitem__(self, i):  # type: ignore[override]
        return self.conditions[i]

    def __len__(self) -> int:
        return len(self.conditions)

    def __iter__(self) -> Iterator[Distortion]:
        return iter(self.conditions)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DistortionSet) and self.conditions == other.conditions

    def __repr__(self) -> str:
        return f"DistortionSet({self.to_text()!r})"

    def kinds(self) -> list[str]:
        """Kinds present, in order of first appearance (e.g. ``["noise", "blur"]``)."""
        return list(dict.fromkeys(c.kind for c in self.conditions))

    def of_kind(self, kind: str) -> list[Distortion]:
        return [c for c in self.conditions if c.kind == kind]

    def to_text(self) -> str:
        """Inverse of :func:`parse_distortions` (kernel sizes other than the paper's are not representable)."""
        parts = []
        for kind in self.kinds():
            sigmas = ",".join(f"{c.sigma:g}" for c in self.of_kind(kind))
            parts.append(f"{kind}:{sigmas}")
        return " ".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
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
    "noise", _noise, severities=(20, 40, 60, 80, 100), random=True, whole_batch=True, unit="0-255 pixel units"
)
register_distortion("blur", _blur, severities=(2, 4, 6, 8, 10), unit="pixels")
_LEVEL = dict(severities=(1, 2, 3, 4, 5), minimum=1, maximum=5, integer=True, unit="ImageNet-C level")
register_distortion("shot_noise", _corruptions.shot_noise, random=True, family="noise", **_LEVEL)
register_distortion("impulse_noise", _corruptions.impulse_noise, random=True, family="noise", **_LEVEL)
register_distortion("defocus_blur", _corruptions.defocus_blur, family="blur", **_LEVEL)
register_distortion("motion_blur", _corruptions.motion_blur, random=True, family="blur", **_LEVEL)
register_distortion("zoom_blur", _corruptions.zoom_blur, family="blur", **_LEVEL)
register_distortion("brightness", _corruptions.brightness, family="weather", **_LEVEL)
register_distortion("contrast", _corruptions.contrast, family="digital", **_LEVEL)
register_distortion("pixelate", _corruptions.pixelate, family="digital", **_LEVEL)
register_distortion(
    "jpeg", _corruptions.jpeg, family="digital", hint="; for a JPEG quality write jpeg_quality:QUALITY", **_LEVEL
)
register_distortion(
    "jpeg_quality",
    _corruptions.jpeg_quality,
    severities=(25, 18, 15, 10, 7),
    minimum=1,
    maximum=100,
    integer=True,
    unit="JPEG quality",
    family="digital",
)
_BUILTINS = frozenset(_REGISTRY)


PAPER_DISTORTIONS = DistortionSet(
    [Distortion("noise", s) for s in (20, 40, 60, 80, 100)] + [Distortion("blur", s) for s in (2, 4, 6, 8, 10)]
)

# ImageNet-C (Hendrycks & Dietterich 2019), severities 1-5: gaussian_noise scale c in [0, 1] units
# (0.08, 0.12, 0.18, 0.26, 0.38) -> x 255; gaussian_blur sigma (1, 2, 3, 4, 6) px, applied with
# skimage's default truncation at 4 sigma (kernel 2*ceil(4*sigma)+1), not the paper's 4*sigma-1.
IMAGENET_C_DISTORTIONS = DistortionSet(
    [Distortion("noise", round(c * 255, 4)) for c in (0.08, 0.12, 0.18, 0.26, 0.38)]
    + [Distortion("blur", float(s), 2 * math.ceil(4 * s) + 1) for s in (1, 2, 3, 4, 6)]
)


# The paper's set scaled to 28 px images (Fashion-MNIST). The paper's blur sigmas (2-10 px, kernels 7-39)
# are meant for 224 px: at 28 px sigma 10 leaves a flat image, and the paper's kernel rule 4*sigma-1
# makes sigma <= 0.5 an identity (kernel 1). The noise at the paper's sigmas is milder on small, high-
# contrast images. Chosen so that a clean-trained vgg_tiny (87.6% clean) falls from mild to severe
# across five levels, as on ImageNet: noise 30..150 -> 85%..39%, blur 1..3 px (kernels 3..11) -> 85%..55%.
SMALL_IMAGE_DISTORTIONS = DistortionSet(
    [Distortion("noise", s) for s in (30, 60, 90, 120, 150)] + [Distortion("blur", s) for s in (1, 1.5, 2, 2.5, 3)]
)


# The ImageNet-C corruptions rendered here (10 of its 15; glass_blur, snow, frost, fog and elastic_transform are
# not), 5 levels each, in ImageNet-C's order. Gaussian noise is the paper's "noise" at ImageNet-C's std x 255.
IMAGENET_C_10 = DistortionSet(
    [Distortion("noise", round(c * 255, 4)) for c in _corruptions.IMAGENET_C_PARAMETERS["gaussian_noise"]]
    + [
        Distortion(kind, level)
        for kind in (
            "shot_noise",
            "impulse_noise",
            "defocus_blur",
            "motion_blur",
            "zoom_blur",
            "brightness",
            "contrast",
            "pixelate",
            "jpeg",
        )
        for level in (1, 2, 3, 4, 5)
    ]
)


def apply_distortions(
    images: torch.Tensor,
    kinds: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Apply a per-image condition to a batch.

    Args:
        images: ``[B, C, H, W]`` in [0, 1].
        kinds: ``[B]`` integer index into :func:`distortion_names` (0 clean, 1 noise, 2 blur, then the others).
        sigmas: ``[B]`` float severity per image, in each kind's unit (0-255 for noise, pixels for blur, ...).
        generator: generator on the images' device for the random kinds.
        clamp: clamp noisy images (kind ``noise``) to [0, 1].

    Returns:
        ``[B, C, H, W]`` distorted images (clean ones are returned unchanged).

    Kinds are applied in registry order, each to its own images (one call per kind present), except kinds
    registered ``whole_batch`` (``noise``): drawn for the whole batch, so that the stream of random numbers does
    not depend on which images happen to be noisy (a fixed seed gives a fixed noise field per batch slot).
    """
    out = images
    names = distortion_names()
    for code in torch.unique(kinds).tolist():
        if code == 0:
            continue
        if not 0 < code < len(names):
            raise ValueError(f"kind code {code} is not a registered distortion (0-{len(names) - 1})")
        spec = _REGISTRY[names[code]]
        mask = kinds == code
        extra = {"clamp": False} if spec.name == "noise" and not clamp else {}
        if spec.whole_batch:
            severity = torch.where(mask, sigmas, torch.zeros_like(sigmas))
            distorted = _call(spec, images, severity, generator, **extra)
            out = torch.where(mask.view(-1, 1, 1, 1).to(images.device), distorted, out)
        else:
            idx = mask.nonzero().view(-1).to(images.device)
            distorted = _call(spec, images.index_select(0, idx), sigmas[mask], generator, **extra)
            out = out.index_copy(0, idx, distorted)
    return out


class DistortionSampler:
    """Draws one condition per image, uniformly over a distortion set, and applies it on the images' device.

    Args:
        distortions: a :class:`DistortionSet` or its text form; default the paper's ten conditions.
        clean_fraction: probability that an image is left clean (0 in the paper's protocol).
        seed: seed of the sampler's own generators (one per device); ``None`` draws from torch's global RNG.

    The draw is reproducible: the same seed and the same sequence of batch shapes give the same
    conditions and noise. ``state_dict()``/``load_state_dict()`` checkpoint the generators for resume.

    Example:
        >>> sampler = DistortionSampler("noise:20 blur:2", seed=0)
        >>> distorted, (kinds, sigmas) = sampler(torch.rand(4, 3, 16, 16))
    """

    def __init__(
        self,
        distortions: str | DistortionSet | None = None,
        clean_fraction: float = 0.0,
        seed: int | None = None,
    ):
        self.distortions = parse_distortions(distortions)
        if not 0.0 <= clean_fraction <= 1.0:
            raise ValueError(f"clean_fraction must be in [0, 1], got {clean_fraction}")
        if any(c.kernel_size is not None for c in self.distortions):
            raise ValueError("the training sampler supports only the paper's blur kernel size (4*sigma - 1)")
        self.clean_fraction = float(clean_fraction)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        kind_index = [distortion_names().index(c.kind) for c in self.distortions]
        self._kinds = torch.tensor(kind_index, dtype=torch.long)
        self._sigmas = torch.tensor([c.sigma for c in self.distortions], dtype=torch.float32)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            # A distinct stream per device type so CPU and CUDA runs are each reproducible.
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def sample(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``(kinds [B] long, sigmas [B] float32)`` on ``device``."""
        device = torch.device(device)
        gen = self._generator(device)
        choice = torch.randint(len(self.distortions), (batch_size,), generator=gen, device=device)
        kinds = self._kinds.to(device)[choice]
        sigmas = self._sigmas.to(device)[choice]
        if self.clean_fraction > 0:
            clean = torch.rand(batch_size, generator=gen, device=device) < self.clean_fraction
            kinds = torch.where(clean, torch.zeros_like(kinds), kinds)
            sigmas = torch.where(clean, torch.zeros_like(sigmas), sigmas)
        return kinds, sigmas

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Distort a clean batch ``[B, C, H, W]`` in [0, 1]; returns ``(distorted, (kinds, sigmas))``."""
        kinds, sigmas = self.sample(images.shape[0], images.device)
        return apply_distortions(images, kinds, sigmas, generator=self._generator(images.device)), (kinds, sigmas)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generators": {k: g.get_state() for k, g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        for key, gen_state in state["generators"].items():
            self._generator(torch.device(key)).set_state(gen_state)

    def __repr__(self) -> str:
        return (
            f"DistortionSampler({self.distortions.to_text()!r}, clean_fraction={self.clean_fraction}, seed={self.seed})"
        )
