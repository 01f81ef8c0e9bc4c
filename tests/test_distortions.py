"""Distortions: noise statistics and seeding, blur against scipy's independent implementation, borders, gradients."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from timm_icl import GaussianBlur, GaussianNoise, gaussian_blur, gaussian_kernel1d, gaussian_noise, paper_kernel_size


def scipy_blur(images: torch.Tensor, sigma: float, kernel_size: int | None = None) -> np.ndarray:
    """Independent reference: scipy's separable correlation with 'mirror' borders (= OpenCV BORDER_REFLECT_101)."""
    k = paper_kernel_size(sigma) if kernel_size is None else kernel_size
    r = k // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-(x**2) / (2 * sigma**2))
    w /= w.sum()
    arr = images.double().numpy()
    arr = ndimage.correlate1d(arr, w, axis=2, mode="mirror")
    return ndimage.correlate1d(arr, w, axis=3, mode="mirror")


def test_paper_kernel_sizes():
    assert [paper_kernel_size(s) for s in (2, 4, 6, 8, 10)] == [7, 15, 23, 31, 39]
    assert paper_kernel_size(0.25) == 1 and paper_kernel_size(1.0) == 3 and paper_kernel_size(2.5) == 9
    k = gaussian_kernel1d(2.0)
    assert k.numel() == 7 and abs(float(k.sum()) - 1) < 1e-12
    assert torch.allclose(k, k.flip(0))
    assert float(k[3] / k[4]) == pytest.approx(np.exp(1 / 8))


def test_noise_statistics_before_clamp():
    images = torch.full((4, 3, 64, 64), 0.5)
    out = gaussian_noise(images, 20.0, generator=torch.Generator().manual_seed(0), clamp=False)
    noise = out - images
    assert float(noise.mean()) == pytest.approx(0.0, abs=2e-3)
    assert float(noise.std()) == pytest.approx(20 / 255, rel=0.02)


def test_noise_per_sample_sigma_and_clamp():
    images = torch.full((3, 3, 64, 64), 0.5)
    sigma = torch.tensor([0.0, 20.0, 100.0])
    raw = gaussian_noise(images, sigma, generator=torch.Generator().manual_seed(1), clamp=False) - images
    assert float(raw[0].abs().max()) == 0.0
    assert float(raw[1].std()) == pytest.approx(20 / 255, rel=0.03)
    assert float(raw[2].std()) == pytest.approx(100 / 255, rel=0.03)
    clamped = gaussian_noise(images, sigma, generator=torch.Generator().manual_seed(1))
    assert float(clamped.min()) >= 0.0 and float(clamped.max()) <= 1.0
    # at sigma 100 around mid-grey a visible share of pixels saturates
    assert float(((clamped[2] == 0) | (clamped[2] == 1)).float().mean()) > 0.1


def test_noise_seeded_reproducible():
    images = torch.rand(2, 3, 16, 16)
    a = gaussian_noise(images, 40.0, generator=torch.Generator().manual_seed(7))
    b = gaussian_noise(images, 40.0, generator=torch.Generator().manual_seed(7))
    c = gaussian_noise(images, 40.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("size", [(16, 16), (28, 28), (37, 53)])
def test_blur_matches_scipy(sigma, size):
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    ours = gaussian_blur(images, sigma).double().numpy()
    np.testing.assert_allclose(ours, scipy_blur(images, sigma), atol=1e-5)


def test_blur_image_smaller_than_kernel():
    # 16x16 image, sigma 10: 39-tap kernel, reflection applied repeatedly (period 2*(n-1))
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    out = gaussian_blur(images, 10.0)
    np.testing.assert_allclose(out.double().numpy(), scipy_blur(images, 10.0), atol=1e-5)
    # a 1-pixel-wide image is constant along that axis: blurring leaves it unchanged
    thin = torch.rand(1, 1, 1, 9)
    np.testing.assert_allclose(gaussian_blur(thin, 2.0)[..., :].shape, thin.shape)
    col = torch.rand(1, 1, 9, 1)
    assert torch.allclose(gaussian_blur(col, 3.0), torch.from_numpy(scipy_blur(col, 3.0)).float(), atol=1e-6)


def test_blur_per_sample_sigma_batch():
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    sigmas = torch.tensor([2.0, 0.0, 10.0, 2.0])
    out = gaussian_blur(images, sigmas)
    for i, s in enumerate(sigmas.tolist()):
        expected = images[i : i + 1].double().numpy() if s == 0 else scipy_blur(images[i : i + 1], s)
        np.testing.assert_allclose(out[i : i + 1].double().numpy(), expected, atol=1e-5)


def test_blur_explicit_kernel_size_and_constant_image():
    images = torch.rand(2, 1, 20, 20)
    np.testing.assert_allclose(gaussian_blur(images, 2.0, 17).double().numpy(), scipy_blur(images, 2.0, 17), atol=1e-5)
    flat = torch.full((1, 3, 10, 10), 0.3)
    assert torch.allclose(gaussian_blur(flat, 4.0), flat, atol=1e-6)  # rows of the banded matrix sum to 1


def test_blur_gradcheck_float64():
    images = torch.rand(2, 2, 9, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: gaussian_blur(x, torch.tensor([1.5, 3.0])), (images,))


def test_function_equals_module():
    images = torch.rand(2, 3, 20, 20)
    assert torch.equal(GaussianBlur(4.0)(images), gaussian_blur(images, 4.0))
    a = GaussianNoise(60.0, generator=torch.Generator().manual_seed(2))(images)
    b = gaussian_noise(images, 60.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_half_precision_close_to_float32():
    images = torch.rand(2, 3, 20, 20)
    out = gaussian_blur(images.to(torch.bfloat16), 2.0)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), gaussian_blur(images, 2.0), atol=1e-2)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: gaussian_blur(torch.rand(3, 8, 8), 2.0), "shape \\[B, C, H, W\\]"),
        (lambda: gaussian_blur(torch.rand(1, 3, 8, 8), -1.0), "finite and >= 0"),
        (lambda: gaussian_noise(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 20.0), "float images"),
        (lambda: gaussian_noise(torch.rand(2, 3, 8, 8), torch.tensor([1.0, 2.0, 3.0])), "shape \\[B\\]"),
        (lambda: gaussian_blur(torch.rand(1, 3, 8, 8), 2.0, 4), "odd"),
    ],
)
def test_clear_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
