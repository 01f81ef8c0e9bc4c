"""timm-icl: make timm image classifiers robust to noise and blur with the Intermediate Constraint Loss.

Public API (see the README for a tour):

- distortions: :func:`gaussian_noise`, :func:`gaussian_blur`, :class:`GaussianNoise`, :class:`GaussianBlur`
- conditions: :class:`Distortion`, :class:`DistortionSet`, :func:`parse_distortions`, :class:`DistortionSampler`
- capture: :func:`capture_preactivations`, :func:`default_layers`, :func:`candidate_layers`
- losses: :func:`icl_loss`, :func:`mse_constraint_loss`, :func:`activation_boundary_loss` and module forms
- task: :class:`ICLTask` (a ``timm.task.TrainingTask``)
- evaluation: :func:`evaluate_robustness`, :func:`format_table`, :func:`plot_accuracy_vs_sigma`
- hub: :func:`export_model`, :func:`push_to_hub`
- models: ``vgg_tiny`` / ``vgg_small`` registered with timm on import
"""

from . import models  # noqa: F401  (registers vgg_tiny / vgg_small with timm)
from .capture import capture_preactivations, resolve_layers, run_until_captured
from .conditions import (
    IMAGENET_C_DISTORTIONS,
    PAPER_DISTORTIONS,
    SMALL_IMAGE_DISTORTIONS,
    Distortion,
    DistortionSampler,
    DistortionSet,
    apply_distortions,
    parse_distortions,
)
from .distortions import (
    GaussianBlur,
    GaussianNoise,
    gaussian_blur,
    gaussian_kernel1d,
    gaussian_noise,
    paper_kernel_size,
)
from .evaluate import evaluate_robustness, format_table, plot_accuracy_vs_sigma
from .hub import export_model, push_to_hub
from .layers import LAYER_PRESETS, candidate_layers, default_layers
from .losses import (
    CONSTRAINTS,
    DEFAULT_LAMBDA,
    ActivationBoundaryLoss,
    IntermediateConstraintLoss,
    MSEConstraintLoss,
    activation_boundary_loss,
    create_constraint,
    icl_loss,
    mse_constraint_loss,
)
from .target_cache import StaleCacheError, TargetCache
from .task import ICLTask

__version__ = "0.1.0"

__all__ = [
    "gaussian_noise",
    "gaussian_blur",
    "gaussian_kernel1d",
    "paper_kernel_size",
    "GaussianNoise",
    "GaussianBlur",
    "Distortion",
    "DistortionSet",
    "DistortionSampler",
    "apply_distortions",
    "parse_distortions",
    "PAPER_DISTORTIONS",
    "IMAGENET_C_DISTORTIONS",
    "SMALL_IMAGE_DISTORTIONS",
    "capture_preactivations",
    "resolve_layers",
    "run_until_captured",
    "default_layers",
    "candidate_layers",
    "LAYER_PRESETS",
    "icl_loss",
    "mse_constraint_loss",
    "activation_boundary_loss",
    "IntermediateConstraintLoss",
    "MSEConstraintLoss",
    "ActivationBoundaryLoss",
    "CONSTRAINTS",
    "DEFAULT_LAMBDA",
    "create_constraint",
    "ICLTask",
    "TargetCache",
    "StaleCacheError",
    "evaluate_robustness",
    "format_table",
    "plot_accuracy_vs_sigma",
    "export_model",
    "push_to_hub",
]
