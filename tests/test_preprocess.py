"""timm_icl.data.preprocess: the project's crop is timm's own eval transform, pixel for pixel, in uint8."""

import io

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from timm_icl.data import fashion_mnist
from timm_icl.data.preprocess import (
    ImageTransform,
    UnusableImageError,
    check_unit_range,
    normalize,
    open_image,
    preprocess_image,
    resolve_preprocessing,
    to_unit_float,
)

skimage_data = pytest.importorskip("skimage.data")


def _photo_files(tmp_path) -> dict[str, str]:
    """A real photograph (scikit-image's chelsea, 451x300) saved as JPEG (quality 90) and PNG."""
    photo = Image.fromarray(skimage_data.chelsea())
    paths = {}
    for fmt, kwargs in (("JPEG", {"quality": 90}), ("PNG", {})):
        path = tmp_path / f"chelsea.{fmt.lower()}"
        photo.save(path, fmt, **kwargs)
        paths[fmt] = str(path)
    return paths


def _timm_pixels(model, path) -> torch.Tensor:
    """timm's own eval transform of ``path`` (as timm's ImageDataset opens it), stopped before Normalize."""
    transform = create_transform(**resolve_data_config(model=model))
    assert type(transform.transforms[-1]).__name__ == "Normalize"
    x = Image.open(path).convert("RGB")
    for t in transform.transforms[:-1]:
        x = t(x)
    return x  # float in [0, 1], ToTensor's x / 255


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "efficientnet_b0", "convnext_tiny"])
def test_crop_is_timms_eval_transform_exactly(tmp_path, name):
    """vgg16 (bilinear, 0.875), resnet50 (bicubic, 0.95), EfficientNet (bicubic, 0.875), ConvNeXt (bicubic, 0.95)."""
    model = timm.create_model(name, pretrained=False)  # only the config is used; the model never runs
    config = resolve_preprocessing(model)
    cfg = model.pretrained_cfg
    assert config["crop_pct"] == cfg["crop_pct"] and config["interpolation"] == cfg["interpolation"]
    transform = ImageTransform(config)
    for fmt, path in _photo_files(tmp_path).items():
        ours = transform(path)
        assert ours.dtype == torch.uint8 and ours.shape == (3, 224, 224), fmt
        reference = _timm_pixels(model, path)
        assert torch.equal((reference * 255).round().to(torch.uint8), ours), f"{name} {fmt}"
        assert torch.equal(ours.float() / 255, reference), f"{name} {fmt}"  # the same floats after x / 255
        assert torch.equal(preprocess_image(path, model), ours)
        with open(path, "rb") as f:  # bytes, as datasets' Image(decode=False) hands them over
            assert torch.equal(transform(f.read()), ours)


def test_overrides_and_what_they_change(tmp_path):
    path = _photo_files(tmp_path)["PNG"]
    model = timm.create_model("resnet18", pretrained=False)
    config = resolve_preprocessing(model, image_size=160, crop_pct=1.0, interpolation="bilinear")
    assert config["input_size"] == (3, 160, 160) and config["crop_pct"] == 1.0
    assert config["interpolation"] == "bilinear" and config["mean"] == tuple(model.pretrained_cfg["mean"])
    ours = ImageTransform(config)(path)
    timm_tf = create_transform(input_size=160, crop_pct=1.0, interpolation="bilinear", normalize=False)
    assert torch.equal(ours, timm_tf(Image.open(path).convert("RGB")))
    # the old project crop (crop 1.0) is not the model's crop (0.875): the pixels differ
    assert not torch.equal(ImageTransform(resolve_preprocessing(model, image_size=160))(path), ours)
    with pytest.raises(ValueError, match="crop_pct must be in"):
        resolve_preprocessing(model, crop_pct=1.5)


def test_train_transform_timm_is_random_uint8(tmp_path):
    path = _photo_files(tmp_path)["JPEG"]
    config = resolve_preprocessing(None, image_size=64, crop_pct=1.0)
    transform = ImageTransform(config, training="timm")
    torch.manual_seed(0)
    a, b = transform(path), transform(path)
    assert a.dtype == torch.uint8 and a.shape == (3, 64, 64) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown train transform"):
        ImageTransform(config, training="random")


def test_draft_only_changes_pixels_when_it_reduces(tmp_path):
    """draft cannot reduce a 451x300 JPEG for a 256 px resize: exact; for a 64 px crop it decodes at 1/4: not."""
    path = _photo_files(tmp_path)["JPEG"]
    model = timm.create_model("efficientnet_b0", pretrained=False)
    config = resolve_preprocessing(model)
    assert torch.equal(ImageTransform(config, draft=True)(path), ImageTransform(config)(path))
    small = resolve_preprocessing(model, image_size=64)
    exact, drafted = ImageTransform(small)(path), ImageTransform(small, draft=True)(path)
    assert not torch.equal(exact, drafted)
    assert (exact.float() - drafted.float()).abs().mean() < 8  # close, but not timm's pixels


def test_thin_strip_refused_before_decoding():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((1, 20000, 3), np.uint8)).save(buf, format="PNG")
    with pytest.raises(UnusableImageError, match="too thin"):
        ImageTransform(resolve_preprocessing(None))(buf.getvalue())
    assert open_image(Image.new("RGB", (1000, 10))).size == (1000, 10)  # a panorama of 100:1 is still fine


@pytest.mark.skipif(not fashion_mnist.local_files_available("test"), reason="Fashion-MNIST IDX files not installed")
def test_fashion_mnist_fast_path_is_timms_pixels():
    from timm_icl.data import FashionMNISTDataset

    model = timm.create_model("vgg_tiny")  # 28 px, crop 1.0, bilinear
    config = resolve_preprocessing(model)
    fast = FashionMNISTDataset("test", ImageTransform(config))
    assert fast._identity
    transform = ImageTransform(config)
    for i in range(5):
        image, _ = fast[i]
        assert torch.equal(image, transform(fast.images[i].numpy()))  # through PIL + timm: the same pixels
    bigger = FashionMNISTDataset("test", ImageTransform(resolve_preprocessing(model, image_size=32)))
    assert not bigger._identity and bigger[0][0].shape == (3, 32, 32) and bigger[0][0].dtype == torch.uint8


def test_device_side_conversion_and_normalisation():
    images8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(to_unit_float(images8), images8.float().div(255))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (images8.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(normalize(images8, mean, std), expected)
    assert torch.equal(normalize(images8.float() / 255, mean, std), expected)
    check_unit_range(images8)
    with pytest.raises(ValueError, match="got values in"):
        check_unit_range(images8.float())
    with pytest.raises(ValueError, match="non-empty batch"):
        check_unit_range(torch.empty(0, 3, 4, 4))
