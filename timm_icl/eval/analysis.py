"""What ICL is about, measured: how a network's firing pattern on a distorted image departs from its
firing pattern on the clean image.

``firing_agreement`` is the fraction of constrained units whose firing state ``1[h > 0]`` on the distorted
image equals the state on the clean image: 1.0 means the distortion changed nothing the constraint sees,
0.5 is chance. ICL's loss is a soft version of ``1 - agreement`` toward the *reference* network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..capture import run_until_captured
from ..data.preprocess import normalize, resolve_mean_std
from ..layers import default_layers

__all__ = ["firing_agreement", "normalize_for"]


def normalize_for(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Normalise ``[B, C, H, W]`` images (uint8, or float in [0, 1]) with ``model.pretrained_cfg`` mean/std."""
    return normalize(images, *resolve_mean_std(model))


@torch.no_grad()
def firing_agreement(
    model: nn.Module,
    clean: torch.Tensor,
    distorted: torch.Tensor,
    layers: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image fraction of units whose firing state agrees between clean and distorted inputs.

    Args:
        model: a timm model in eval mode (with ``pretrained_cfg`` mean/std).
        clean, distorted: ``[B, C, H, W]`` in [0, 1], the same images before and after a distortion.
        layers: constrained layers; default the family preset.

    Returns:
        ``{layer: agreement [B]}`` plus ``"all"``: the agreement over the units of all layers together.
    """
    layers = list(default_layers(model) if layers is None else layers)
    bits_clean = run_until_captured(model, normalize_for(model, clean), layers, transform=lambda h: h > 0)
    bits_dist = run_until_captured(model, normalize_for(model, distorted), layers, transform=lambda h: h > 0)
    out: dict[str, torch.Tensor] = {}
    agree_total = torch.zeros(clean.shape[0], device=clean.device)
    units_total = 0
    for name in bits_clean:
        same = (bits_clean[name] == bits_dist[name]).flatten(1)
        out[name] = same.float().mean(1)
        agree_total += same.float().sum(1)
        units_total += same.shape[1]
    out["all"] = agree_total / units_total
    return out
