"""Constraint losses between the student's pre-activations on distorted images and the frozen
reference's pre-activations on the clean images.

Each loss accepts one tensor each, or mappings ``{layer: tensor}`` with the same keys. Reduction: mean
over the units (and batch) within a layer, then mean over layers. Everything is computed in float32
whatever the autocast dtype, because the ICL logits are scaled by alpha = 100.

- :func:`icl_loss` (the paper): ``BCE-with-logits(alpha * h_dist, 1[h_ref > 0])``.
- :func:`mse_constraint_loss` (the paper's baseline): ``mean((h_dist - h_ref)^2)``.
- :func:`activation_boundary_loss` (Heo et al., AAAI 2019): ``u * relu(m - h)^2 + (1 - u) * relu(m + h)^2``.
- :func:`jsd_consistency_loss` (AugMix, Hendrycks et al. 2020; timm's ``JsdCrossEntropy``): no reference, the
  Jensen-Shannon divergence between the student's softmax outputs on several views of each image.

The reference may be passed as float pre-activations or, for ICL and AB, directly as the boolean
firing bits ``h_ref > 0`` (what a reference hook or the target cache stores).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "icl_loss",
    "mse_constraint_loss",
    "activation_boundary_loss",
    "jsd_consistency_loss",
    "JSDConsistencyLoss",
    "IntermediateConstraintLoss",
    "MSEConstraintLoss",
    "ActivationBoundaryLoss",
    "CONSTRAINTS",
    "DEFAULT_LAMBDA",
    "create_constraint",
]

Activations = torch.Tensor | Mapping[str, torch.Tensor]


def _pairs(student: Activations, reference: Activations) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    if isinstance(student, torch.Tensor) and isinstance(reference, torch.Tensor):
        pairs = [("", student, reference)]
    elif isinstance(student, Mapping) and isinstance(reference, Mapping):
        if set(student) != set(reference):
            raise ValueError(
                f"student and reference layers differ: student has {sorted(student)}, reference has {sorted(reference)}"
            )
        if not student:
            raise ValueError("no layers to constrain: the activation mappings are empty")
        pairs = [(k, student[k], reference[k]) for k in student]
    else:
        raise TypeError("pass one tensor each, or two mappings {layer: tensor}, for student and reference")
    for name, s, r in pairs:
        if s.shape != r.shape:
            raise ValueError(
                f"layer {name or '<tensor>'}: student shape {tuple(s.shape)} != reference shape {tuple(r.shape)}; "
                "the reference must see images of the same size as the student"
            )
    return pairs


def _firing(reference: torch.Tensor) -> torch.Tensor:
    """Target ``u = 1[h_ref > 0]`` as float32, from float pre-activations or from boolean bits."""
    ref = reference.detach()
    return (ref if ref.dtype == torch.bool else ref > 0).to(torch.float32)


def icl_loss(student: Activations, reference: Activations, alpha: float = 100.0) -> torch.Tensor:
    """Intermediate Constraint Loss.

    ``mean_layers mean_units BCE(sigmoid(alpha * h_dist), 1[h_ref > 0])``, computed as
    ``binary_cross_entropy_with_logits`` in float32 (stable for any finite input; the naive
    ``log(sigmoid(100 h))`` is -inf for |h| above ~1).

    Args:
        student: ``h_dist``, e.g. ``[B, 4096, 1, 1]`` or ``{layer: tensor}``; gradients flow into it.
        reference: ``h_ref`` (float, same shape) or its firing bits (bool); detached.
        alpha: gain of the sigmoid stand-in for the step function (paper: 100).

    Returns:
        scalar float32 loss.

    Example:
        >>> icl_loss(torch.tensor([0.5, -0.5]), torch.tensor([1.0, -1.0]))  # ~0 (both agree)
    """
    losses = [
        F.binary_cross_entropy_with_logits(alpha * s.to(torch.float32), _firing(r))
        for _, s, r in _pairs(student, reference)
    ]
    return torch.stack(losses).mean()


def mse_constraint_loss(student: Activations, reference: Activations) -> torch.Tensor:
    """The paper's MSE baseline: ``mean_layers mean_units (h_dist - h_ref)^2`` in float32; needs float references."""
    losses = []
    for name, s, r in _pairs(student, reference):
        if r.dtype == torch.bool:
            raise ValueError(
                f"layer {name or '<tensor>'}: the MSE constraint needs float reference pre-activations, got firing bits"
            )
        losses.append(F.mse_loss(s.to(torch.float32), r.detach().to(torch.float32)))
    return torch.stack(losses).mean()


def activation_boundary_loss(student: Activations, reference: Activations, margin: float = 1.0) -> torch.Tensor:
    """Activation-boundary loss of Heo et al. (AAAI 2019), the hinge relative of ICL.

    ``mean_layers mean_units [u * relu(margin - h)^2 + (1 - u) * relu(margin + h)^2]`` with
    ``u = 1[h_ref > 0]`` and ``h = h_dist``: a unit that should fire is pushed above ``+margin``,
    one that should not below ``-margin``; zero loss once on the right side with the margin.
    """
    losses = []
    for _, s, r in _pairs(student, reference):
        h = s.to(torch.float32)
        u = _firing(r)
        losses.append((u * F.relu(margin - h).pow(2) + (1 - u) * F.relu(margin + h).pow(2)).mean())
    return torch.stack(losses).mean()


def jsd_consistency_loss(logits: torch.Tensor, num_splits: int = 3) -> torch.Tensor:
    """Jensen-Shannon consistency of ``num_splits`` views (AugMix; the divergence term of timm's
    ``JsdCrossEntropy``, whose total is ``CE(first split) + alpha * this``).

    ``mean_views KL(p_view || M)`` with ``M`` the mean of the views' softmax (clamped to [1e-7, 1] before the log, as
    timm does) and KL summed over classes, averaged over the batch; float32.

    Args:
        logits: ``[num_splits * B, num_classes]``, the views stacked split by split (image ``i`` of each split is
            the same image).
        num_splits: number of views (timm's ``--aug-splits``; AugMix: 3, clean + two augmented).
    """
    if logits.ndim != 2 or num_splits < 2 or logits.shape[0] % num_splits or not logits.shape[0]:
        raise ValueError(
            f"jsd_consistency_loss needs logits [num_splits * B, classes] with num_splits >= 2 ({num_splits}), got "
            f"{tuple(logits.shape)}"
        )
    probs = F.softmax(logits.to(torch.float32), dim=1).split(logits.shape[0] // num_splits)
    log_mixture = torch.clamp(torch.stack(probs).mean(dim=0), 1e-7, 1).log()
    return torch.stack([F.kl_div(log_mixture, p, reduction="batchmean") for p in probs]).mean()


class IntermediateConstraintLoss(nn.Module):
    """Module form of :func:`icl_loss`."""

    needs_reference_values = False  # firing bits suffice

    def __init__(self, alpha: float = 100.0):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, student: Activations, reference: Activations) -> torch.Tensor:
        return icl_loss(student, reference, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class MSEConstraintLoss(nn.Module):
    """Module form of :func:`mse_constraint_loss`."""

    needs_reference_values = True

    def forward(self, student: Activations, reference: Activations) -> torch.Tensor:
        return mse_constraint_loss(student, reference)


class ActivationBoundaryLoss(nn.Module):
    """Module form of :func:`activation_boundary_loss`."""

    needs_reference_values = False

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = float(margin)

    def forward(self, student: Activations, reference: Activations) -> torch.Tensor:
        return activation_boundary_loss(student, reference, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class JSDConsistencyLoss(nn.Module):
    """Module form of :func:`jsd_consistency_loss`: a constraint on the student's logits over ``num_views`` views
    (ICLTask feeds ``[distorted, clean, distorted]``), with no reference network."""

    needs_reference = False

    def __init__(self, num_views: int = 3):
        super().__init__()
        if num_views < 2:
            raise ValueError(f"the JSD constraint needs num_views >= 2, got {num_views}")
        self.num_views = int(num_views)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return jsd_consistency_loss(logits, self.num_views)

    def extra_repr(self) -> str:
        return f"num_views={self.num_views}"


#: constraint name -> factory; "none" is plain fine-tuning.
CONSTRAINTS: dict[str, Callable[..., nn.Module] | None] = {
    "icl": IntermediateConstraintLoss,
    "mse": MSEConstraintLoss,
    "ab": ActivationBoundaryLoss,
    "jsd": JSDConsistencyLoss,
    "icl+jsd": IntermediateConstraintLoss,  # ICLTask adds the JSD term (its jsd_weight) over three views
    "none": None,
}

#: the paper's selected lambda per constraint (AB: not in the paper; chosen like MSE by validation; JSD: AugMix's and
#: timm's ``JsdCrossEntropy`` alpha).
DEFAULT_LAMBDA: dict[str, float] = {"icl": 0.1, "mse": 0.05, "ab": 0.05, "jsd": 12.0, "icl+jsd": 0.1, "none": 0.0}


def create_constraint(name: str, **kwargs) -> nn.Module | None:
    """Build a constraint loss by name (``icl``, ``mse``, ``ab``, ``jsd``, ``none``); kwargs go to its constructor
    (``alpha`` for icl, ``margin`` for ab)."""
    if name not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {name!r}; choose one of {', '.join(CONSTRAINTS)}")
    factory = CONSTRAINTS[name]
    if factory is None:
        return None
    return factory(**kwargs)
