"""Small VGG-family models registered with timm, for CPU demos and tests.

``vgg_tiny`` keeps vgg16's layout (``features`` of 3x3 convs with in-place ReLU and max-pools, then
``pre_logits.fc1`` (a KxK conv playing the FC role) -> ReLU -> ``pre_logits.fc2`` (1x1) -> ReLU ->
``head``), so the paper's layers ``pre_logits.fc1/fc2`` exist and the same recipe and presets apply,
at ~0.2M parameters instead of 138M. It is sized for 28-32 px images (Fashion-MNIST, CIFAR).
No pretrained weights exist: the demo trains the reference itself.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vgg import VGG, ConvMlp

__all__ = ["SmallVGG", "vgg_tiny", "vgg_small"]


class SmallVGG(VGG):
    """timm's VGG with a configurable head width and first-FC kernel (vgg16 hard-codes 4096 and 7).

    Args:
        cfg: feature config as in timm's VGG (ints = 3x3 conv widths, ``"M"`` = 2x2 max-pool).
        hidden_size: units of ``pre_logits.fc1`` and ``pre_logits.fc2`` (vgg16: 4096).
        fc_kernel_size: kernel of ``pre_logits.fc1`` (vgg16: 7 for 224 px; 3 for 28 px inputs).
        Other arguments as timm's ``VGG``.
    """

    def __init__(
        self,
        cfg: list,
        num_classes: int = 1000,
        in_chans: int = 3,
        hidden_size: int = 256,
        fc_kernel_size: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **kwargs: Any,
    ):
        super().__init__(
            cfg, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, global_pool=global_pool, **kwargs
        )
        self.pre_logits = ConvMlp(self.num_features, hidden_size, fc_kernel_size, drop_rate=drop_rate)
        self.head = ClassifierHead(hidden_size, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.head_hidden_size = hidden_size
        self._initialize_weights()


_CFGS = {
    "vgg_tiny": dict(cfg=[16, "M", 32, "M", 64, 64, "M"], hidden_size=256, fc_kernel_size=3),
    "vgg_small": dict(cfg=[32, "M", 64, "M", 128, 128, "M"], hidden_size=512, fc_kernel_size=3),
}


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 28, 28),
        "pool_size": (1, 1),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "features.0",
        "classifier": "head.fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"vgg_tiny.untrained": _cfg(), "vgg_small.untrained": _cfg()})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> SmallVGG:
    model_args = {**_CFGS[variant], **kwargs}
    return build_model_with_cfg(
        SmallVGG,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True),
        **model_args,
    )


@register_model
def vgg_tiny(pretrained: bool = False, **kwargs: Any) -> SmallVGG:
    """VGG layout at ~0.2M parameters: convs 16-M-32-M-64-64-M, fc1 (3x3) and fc2 of 256 units."""
    return _create("vgg_tiny", pretrained, **kwargs)


@register_model
def vgg_small(pretrained: bool = False, **kwargs: Any) -> SmallVGG:
    """VGG layout at ~0.9M parameters: convs 32-M-64-M-128-128-M, fc1 (3x3) and fc2 of 512 units."""
    return _create("vgg_small", pretrained, **kwargs)
