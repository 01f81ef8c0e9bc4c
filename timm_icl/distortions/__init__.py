"""Distortions: the paper's Gaussian noise and blur, ImageNet-C's camera corruptions, a registry of kinds by name,
distortion sets parsed from text, and the seeded per-image sampler used in training.

- :mod:`.noise_blur`: :func:`gaussian_noise`, :func:`gaussian_blur` (exact, batched, per-image sigma)
- :mod:`.corruptions`: ImageNet-C's corruptions on the device (severity = level 1-5)
- :mod:`.registry`: :func:`register_distortion`, :class:`Distortion` (one condition: kind + severity)
- :mod:`.sets`: :class:`DistortionSet`, :func:`parse_distortions`, named sets, :func:`apply_distortions`
- :mod:`.sampler`: :class:`DistortionSampler`
"""

from .noise_blur import GaussianBlur, GaussianNoise, gaussian_blur, gaussian_kernel1d, gaussian_noise, paper_kernel_size
from .registry import (
    KINDS,
    Distortion,
    DistortionSpec,
    call_distortion,
    distortion_names,
    get_distortion,
    register_distortion,
    unregister_distortion,
)
from .sampler import DistortionSampler
from .sets import (
    IMAGENET_C_10,
    IMAGENET_C_DISTORTIONS,
    PAPER_DISTORTIONS,
    SMALL_IMAGE_DISTORTIONS,
    DistortionSet,
    apply_distortions,
    parse_distortions,
)

__all__ = [
    "gaussian_noise",
    "gaussian_blur",
    "gaussian_kernel1d",
    "paper_kernel_size",
    "GaussianNoise",
    "GaussianBlur",
    "KINDS",
    "Distortion",
    "DistortionSpec",
    "call_distortion",
    "distortion_names",
    "get_distortion",
    "register_distortion",
    "unregister_distortion",
    "DistortionSampler",
    "DistortionSet",
    "apply_distortions",
    "parse_distortions",
    "PAPER_DISTORTIONS",
    "IMAGENET_C_DISTORTIONS",
    "IMAGENET_C_10",
    "SMALL_IMAGE_DISTORTIONS",
]
