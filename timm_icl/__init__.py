"""timm-icl: make timm image classifiers robust to noise and blur with the Intermediate Constraint Loss.

Public API (see the README for a tour):

- distortions: :func:`gaussian_noise`, :func:`gaussian_blur`, :class:`GaussianNoise`, :class:`GaussianBlur`
- conditions: :class:`Distortion`, :class:`DistortionSet`, :func:`parse_distortions`, :class:`DistortionSampler`,
  :func:`register_distortion` (any ``fn(images, severity, generator)`` by name), :func:`distortion_names`
- corruptions: ImageNet-C's camera corruptions on the device (:mod:`timm_icl.distortions.corruptions`)
- capture: :func:`capture_preactivations`, :func:`default_layers`, :func:`candidate_layers`
- losses: :func:`icl_loss`, :func:`mse_constraint_loss`, :func:`activation_boundary_loss` and module forms
- task: :class:`ICLTask` (a ``timm.task.TrainingTask``)
- evaluation: :func:`evaluate_robustness`
- results: :func:`save_results`, :func:`load_results`, :func:`format_table`, :func:`format_comparison`,
  :func:`plot_accuracy_vs_sigma`, :func:`mcnemar_test`, :func:`paired_z_test`, :func:`wilson_interval`
- hub: :func:`export_model`, :func:`push_to_hub`, :func:`validate_push`
- checkpoints: :mod:`timm_icl.train.checkpoint` (atomic accelerate checkpoints, resume past damaged ones)
- preprocessing: :func:`resolve_preprocessing`, :class:`ImageTransform`, :func:`preprocess_image`, :func:`normalize`
  (timm's eval crop in uint8 on the host, float + normalisation on the device)
- models: ``vgg_tiny`` / ``vgg_small`` registered with timm on import
"""

from . import models  # noqa: F401  (registers vgg_tiny / vgg_small with timm)
from .capture import capture_preactivations, resolve_layers, run_until_captured
from .data.preprocess import ImageTransform, normalize, preprocess_image, resolve_preprocessing
from .distortions import (
    IMAGENET_C_10,
    IMAGENET_C_DISTORTIONS,
    PAPER_DISTORTIONS,
    SMALL_IMAGE_DISTORTIONS,
    Distortion,
    DistortionSampler,
    DistortionSet,
    DistortionSpec,
    GaussianBlur,
    GaussianNoise,
    apply_distortions,
    distortion_names,
    gaussian_blur,
    gaussian_kernel1d,
    gaussian_noise,
    get_distortion,
    paper_kernel_size,
    parse_distortions,
    register_distortion,
    unregister_distortion,
)
from .eval import (
    evaluate_robustness,
    format_comparison,
    format_table,
    group_correctness,
    load_results,
    mcnemar_test,
    mean_interval,
    paired_z_test,
    plot_accuracy_vs_sigma,
    save_results,
    wilson_interval,
)
from .hub import export_model, push_to_hub, validate_push
from .layers import LAYER_PRESETS, candidate_layers, default_layers
from .losses import (
    CONSTRAINTS,
    DEFAULT_LAMBDA,
    ActivationBoundaryLoss,
    IntermediateConstraintLoss,
    JSDConsistencyLoss,
    MSEConstraintLoss,
    activation_boundary_loss,
    create_constraint,
    icl_loss,
    jsd_consistency_loss,
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
    "register_distortion",
    "unregister_distortion",
    "get_distortion",
    "distortion_names",
    "DistortionSpec",
    "IMAGENET_C_10",
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
    "jsd_consistency_loss",
    "IntermediateConstraintLoss",
    "MSEConstraintLoss",
    "ActivationBoundaryLoss",
    "JSDConsistencyLoss",
    "CONSTRAINTS",
    "DEFAULT_LAMBDA",
    "create_constraint",
    "ICLTask",
    "TargetCache",
    "StaleCacheError",
    "evaluate_robustness",
    "format_table",
    "format_comparison",
    "plot_accuracy_vs_sigma",
    "save_results",
    "load_results",
    "group_correctness",
    "wilson_interval",
    "mean_interval",
    "mcnemar_test",
    "paired_z_test",
    "export_model",
    "push_to_hub",
    "validate_push",
    "resolve_preprocessing",
    "ImageTransform",
    "preprocess_image",
    "normalize",
]
