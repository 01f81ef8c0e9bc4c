"""One preprocessing, timm's own: image file -> uint8 crop on the host, float + normalisation on the device.

Every place that turns an image into a clean crop (the recipe's loaders, ``timm-icl eval`` and ``distort``, the
analysis figure, the benchmarks) goes through :class:`ImageTransform`, which is timm's eval transform
(``timm.data.create_transform(**resolve_data_config(model=m))``) without its ``Normalize`` step: the model's
``input_size``, ``crop_pct``, ``crop_mode`` and ``interpolation`` (from ``pretrained_cfg``), overridable. The crop
is exactly timm's pixels, as uint8 ``[3, H, W]``::

    file --decode (RGB uint8)--> timm Resize + CenterCrop (PIL) --> uint8 [3, H, W]   (DataLoader workers)
    batch uint8 [B, 3, H, W] --.to(device)--> float / 255 --distort--> (x - mean) / std  (on the device)

:func:`to_unit_float` and :func:`normalize` are the only conversion and the only normalisation in timm_icl.

Where decoding differs from timm's ``Image.open(f).convert("RGB")`` on purpose:

- 16-bit greyscale PNGs (PIL mode ``I;16``) keep their values (``round(v / 257)``); ``convert("RGB")`` clips them
  to white.
- Images more than :data:`MAX_ASPECT_RATIO` times longer than wide (a 1x20000 strip) raise
  :class:`UnusableImageError` before anything is resized (resizing the short side to 256 px would allocate GBs);
  loaders skip and count them like undecodable files.
- ``draft=True`` lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale when the result still covers the resize. It is
  off by default because it is *not* exact: DCT-domain downscaling gives other pixels than timm's resize of the
  full image (benchmarks/preprocess.py measures how much). For a 500x375 JPEG and a 256 px resize it cannot reduce
  anything anyway.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "DATA_CONFIG_KEYS",
    "MAX_ASPECT_RATIO",
    "UnusableImageError",
    "resolve_preprocessing",
    "open_image",
    "ImageTransform",
    "preprocess_image",
    "to_unit_float",
    "normalize",
    "check_unit_range",
]

#: The keys of a data config this module uses (timm's ``resolve_data_config`` names).
DATA_CONFIG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
#: Longer side / shorter side above which an image is refused (skipped by the loaders).
MAX_ASPECT_RATIO = 100.0
TRAIN_TRANSFORMS = ("eval", "timm")


class UnusableImageError(ValueError):
    """An image that decodes but cannot be used (an absurdly thin strip): loaders skip and count it."""


def _to_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) not in (2, 3):
        raise ValueError(f"image size must be H, (H, W) or (C, H, W), got {image_size!r}")
    return size[-2:]  # type: ignore[return-value]


def resolve_preprocessing(
    model: torch.nn.Module | None = None,
    *,
    pretrained_cfg: Mapping[str, Any] | None = None,
    image_size: int | Sequence[int] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    crop_mode: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The data config of ``model`` (its ``pretrained_cfg``) with explicit overrides, via timm's resolver.

    Args:
        model: a timm model (or None with ``pretrained_cfg``, or neither: timm's defaults, 224 px, crop 0.875,
            bicubic).
        pretrained_cfg: a config to read instead of ``model.pretrained_cfg`` (e.g. an exported config.json's).
        image_size: ``H``, ``(H, W)`` or ``(3, H, W)``; None: the model's ``input_size``.
        crop_pct: resize the shorter side to ``floor(size / crop_pct)`` before the centre crop; None: the model's.
        interpolation: ``"bilinear"``, ``"bicubic"``, ...; None: the model's.
        crop_mode: ``"center"``, ``"squash"`` or ``"border"``; None: the model's (timm default ``"center"``).
        mean, std: normalisation (applied on the device, never here); None: the model's.

    Returns:
        ``{"input_size": (3, H, W), "interpolation", "crop_pct", "crop_mode", "mean", "std"}`` (tuples of floats).

    Example:
        >>> cfg = resolve_preprocessing(timm.create_model("resnet18"), crop_pct=1.0)  # doctest: +SKIP
    """
    from timm.data import resolve_data_config

    args: dict[str, Any] = {}
    if image_size is not None:
        args["input_size"] = (3, *_to_hw(image_size))
    for key, value in (("crop_pct", crop_pct), ("interpolation", interpolation), ("crop_mode", crop_mode)):
        if value is not None:
            args[key] = value
    if crop_pct is not None and not 0 < float(crop_pct) <= 1:  # above 1 would pad: not a crop fraction
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if mean is not None:
        args["mean"] = tuple(mean)
    if std is not None:
        args["std"] = tuple(std)
    if model is None and not pretrained_cfg:
        pretrained_cfg = {"_": None}  # resolve_data_config wants one of model/args/pretrained_cfg
    cfg = resolve_data_config(args, pretrained_cfg=dict(pretrained_cfg) if pretrained_cfg else None, model=model)
    out = {k: cfg[k] for k in DATA_CONFIG_KEYS}
    out["input_size"] = tuple(int(s) for s in out["input_size"])
    out["crop_pct"] = float(out["crop_pct"])
    out["mean"] = tuple(float(m) for m in out["mean"])
    out["std"] = tuple(float(s) for s in out["std"])
    return out


def _scale_size(config: Mapping[str, Any]) -> int:
    """The shorter side timm resizes to before its centre crop (``floor(max(H, W) / crop_pct)``)."""
    return max(math.floor(s / float(config["crop_pct"])) for s in config["input_size"][-2:])


def _array_to_pil(array: np.ndarray):
    from PIL import Image

    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # [C, H, W] tensors
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):  # [0, 1] floats, as torchvision's ToTensor writes them
            array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255)
        array = array.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array[..., :3] if array.ndim == 3 else array))


def _sixteen_bit_to_rgb(image):
    """``I;16``/``I`` (16-bit PNG greyscale) -> 8-bit RGB with the real values: ``round(v * 255 / 65535)``."""
    from PIL import Image

    values = np.asarray(image).astype(np.int64)
    values = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
    return Image.fromarray(values.astype(np.uint8), mode="L").convert("RGB")


def open_image(
    value: Any,
    *,
    draft_size: int | None = None,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
):
    """Decode an image cell to an RGB PIL image, as timm's loaders do (``convert("RGB")``, alpha dropped).

    Args:
        value: a PIL image, a path, raw bytes, a ``{"bytes", "path"}`` dict (``datasets``' ``Image(decode=False)``),
            or an array/tensor (``[H, W]``, ``[H, W, C]`` or ``[C, H, W]``; uint8, or float in [0, 1]).
        draft_size: JPEG only: let libjpeg decode at a reduced scale that still leaves both sides >= this
            (not exact, see the module notes); None decodes at full size.
        max_aspect_ratio: refuse images whose longer side exceeds this multiple of the shorter one.

    Returns:
        A loaded ``PIL.Image.Image`` in mode ``RGB``.

    Raises:
        UnusableImageError: a thin strip (checked from the header, before decoding).
        OSError, ValueError: undecodable or truncated data.
    """
    from PIL import Image

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        image = _array_to_pil(value)
    else:
        if isinstance(value, Mapping):
            if value.get("bytes") is not None:
                value = value["bytes"]
            elif value.get("path"):
                value = value["path"]
            else:
                raise ValueError("image cell has neither bytes nor path")
        if isinstance(value, bytes | bytearray | memoryview):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str | os.PathLike):
            image = Image.open(value)
        elif isinstance(value, Image.Image):
            image = value
        else:
            raise TypeError(f"cannot decode an image from {type(value).__name__}")
    w, h = image.size
    if min(w, h) < 1 or max(w, h) > max_aspect_ratio * min(w, h):
        raise UnusableImageError(f"image of {w}x{h} px is too thin (aspect ratio above {max_aspect_ratio:g})")
    if draft_size is not None and image.format == "JPEG" and image.mode in ("RGB", "L"):
        image.draft(image.mode, (draft_size, draft_size))
    image.load()  # truncated / corrupt files fail here, inside the caller's try
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _sixteen_bit_to_rgb(image)
    if image.mode != "RGB":
        if image.mode in ("P", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")  # palette transparency: no PIL warning, same RGB values
        image = image.convert("RGB")
    return image


class ImageTransform:
    """Picklable image -> uint8 ``[3, H, W]`` crop: timm's eval (or training) transform without ``Normalize``.

    Args:
        config: a data config from :func:`resolve_preprocessing` (``input_size``, ``crop_pct``, ``crop_mode``,
            ``interpolation``; ``mean``/``std`` are not used here).
        training: ``"eval"`` (default; deterministic resize + centre crop, what cached targets need) or
            ``"timm"`` (timm's training transform: random resized crop, flip, colour jitter, with its defaults).
        draft: decode JPEGs with PIL's ``draft`` at a reduced scale that still covers the resize (faster, not
            exactly timm's pixels; eval only).
        max_aspect_ratio: see :func:`open_image`.

    ``transform(image)`` takes anything :func:`open_image` takes and returns a uint8 ``[3, H, W]`` tensor.

    Example:
        >>> transform = ImageTransform(resolve_preprocessing(model))  # doctest: +SKIP
        >>> crop = transform("photo.jpg")  # uint8 [3, 224, 224], timm's pixels
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        training: str = "eval",
        draft: bool = False,
        max_aspect_ratio: float = MAX_ASPECT_RATIO,
        options: Mapping[str, Any] | None = None,
    ):
        from timm.data import create_transform

        if training not in TRAIN_TRANSFORMS:
            raise ValueError(f"unknown train transform {training!r}; choose one of {', '.join(TRAIN_TRANSFORMS)}")
        self.config = {k: config[k] for k in DATA_CONFIG_KEYS if k in config}
        self.training, self.max_aspect_ratio = training, float(max_aspect_ratio)
        self.draft_size = _scale_size(self.config) if draft and training == "eval" else None
        # timm's training augmentations by their create_transform names (auto_augment, hflip, vflip, scale, ratio,
        # color_jitter, interpolation), for training="timm" only; random erasing runs on the device (see the recipe)
        self.options = {k: v for k, v in dict(options or {}).items() if v is not None}
        if self.options and training != "timm":
            raise ValueError(f"training augmentations {sorted(self.options)} need training='timm'")
        kwargs = {"interpolation": self.config.get("interpolation", "bilinear"), **self.options}
        self.transform = create_transform(
            input_size=tuple(self.config["input_size"]),
            is_training=training == "timm",
            crop_pct=self.config.get("crop_pct"),
            crop_mode=self.config.get("crop_mode"),
            normalize=False,  # -> MaybePILToTensor: uint8, no scaling
            **kwargs,
        )

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the output."""
        return tuple(self.config["input_size"][-2:])  # type: ignore[return-value]

    def __call__(self, value: Any) -> torch.Tensor:
        image = open_image(value, draft_size=self.draft_size, max_aspect_ratio=self.max_aspect_ratio)
        out = self.transform(image)
        if out.dtype != torch.uint8 or out.ndim != 3:
            raise AssertionError(f"timm's transform returned {out.dtype} {tuple(out.shape)}, expected uint8 [3, H, W]")
        return out

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ImageTransform(input_size={c['input_size']}, crop_pct={c.get('crop_pct')}, "
            f"crop_mode={c.get('crop_mode')}, interpolation={c.get('interpolation')}, training={self.training!r}, "
            f"draft={self.draft_size is not None})"
        )


def preprocess_image(
    image: Any,
    model: torch.nn.Module | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    image_size: int | Sequence[int] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> torch.Tensor:
    """One image (PIL, path, bytes, array) -> uint8 ``[3, H, W]``: ``model``'s eval crop (or ``config``'s).

    The same pixels as ``timm.data.create_transform(**timm.data.resolve_data_config(model=model))`` before its
    ``Normalize`` (times 255). For many images build one :class:`ImageTransform` instead.
    """
    if config is None:
        config = resolve_preprocessing(model, image_size=image_size, crop_pct=crop_pct, interpolation=interpolation)
    return ImageTransform(config)(image)


# ---------------------------------------------------------------------------------------------------------------------
# on the device
# ---------------------------------------------------------------------------------------------------------------------
def to_unit_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[..., H, W]`` in 0-255 -> ``dtype`` in [0, 1] (``x / 255``, as torchvision's ``ToTensor``);
    floating images are returned as they are (assumed in [0, 1])."""
    if images.dtype == torch.uint8:
        return images.to(dtype).div_(255.0)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 (0-255) or floating point (0-1), got {images.dtype}")
    return images


def resolve_mean_std(
    model: torch.nn.Module | None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std to normalise with: the arguments, else the model's ``pretrained_cfg`` (every timm model has one).

    Training (:class:`~timm_icl.task.ICLTask`), evaluation and the analysis all resolve them here, so they normalise
    alike. There is no silent default: a model without them (built by hand, or wrapped) raises rather than being
    normalised with ImageNet's statistics it may not have been trained with.

    Raises:
        ValueError: neither the arguments nor ``model.pretrained_cfg`` give a mean and a std.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = mean if mean is not None else cfg.get("mean")
    std = std if std is not None else cfg.get("std")
    if mean is None or std is None:
        raise ValueError("the model has no pretrained_cfg mean/std (built by hand?); pass mean=... and std=...")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def normalize(images: torch.Tensor, mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float]):
    """``(images - mean) / std`` per channel, for uint8 ``[B, C, H, W]`` (0-255) or float (0-1) images.

    Args:
        images: ``[B, C, H, W]`` uint8 or float in [0, 1], on any device.
        mean, std: ``C`` values (sequences or tensors of any shape with ``C`` elements).

    Returns:
        float ``[B, C, H, W]`` (the images' dtype when floating, else float32).
    """
    x = to_unit_float(images)
    mean_t = torch.as_tensor(mean, device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
    return (x - mean_t) / std_t


def check_unit_range(images: torch.Tensor, who: str = "timm_icl") -> None:
    """Raise a clear ``ValueError`` for an empty batch or float images outside [0, 1] (uint8 needs no check).

    The float check costs one ``aminmax`` (one device sync): call it once per run, not per batch.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"{who} expects a non-empty batch of images [B, C, H, W], got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise TypeError(f"{who} expects uint8 (0-255) or float (0-1) images, got {images.dtype}")
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"{who} expects clean, un-normalised images (uint8, or float in [0, 1]; it distorts, then normalises "
            f"itself); got values in [{lo:.3f}, {hi:.3f}]. Remove the Normalize step from the data pipeline."
        )
