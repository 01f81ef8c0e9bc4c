"""Distortion sets parsed from text and the per-image sampler."""

import pytest
import torch

from timm_icl import (
    IMAGENET_C_DISTORTIONS,
    PAPER_DISTORTIONS,
    Distortion,
    DistortionSampler,
    apply_distortions,
    gaussian_blur,
    gaussian_noise,
    parse_distortions,
)


def test_parse_paper_set_round_trip():
    ds = parse_distortions("noise:20,40,60,80,100 blur:2,4,6,8,10")
    assert ds == PAPER_DISTORTIONS and parse_distortions(None) == PAPER_DISTORTIONS
    assert [c.name for c in ds][:2] == ["noise20", "noise40"] and ds[-1].name == "blur10"
    assert parse_distortions(ds.to_text()) == ds
    assert parse_distortions("blur:0.5,1.5").to_text() == "blur:0.5,1.5"
    assert [c.kernel_size for c in IMAGENET_C_DISTORTIONS.of_kind("blur")] == [9, 17, 25, 33, 49]


@pytest.mark.parametrize(
    "text, message",
    [
        ("noise20", "cannot parse"),
        ("fog:10", "unknown distortion kind"),
        ("blur:two", "not a number"),
        ("noise:20,20", "duplicate"),
        ("blur:-1", ">= 0"),
        ("", "no distortions"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_distortions(text)


def test_apply_distortions_matches_single_condition_calls():
    images = torch.rand(4, 3, 20, 20)
    kinds = torch.tensor([0, 1, 2, 1])
    sigmas = torch.tensor([0.0, 20.0, 2.0, 60.0])
    out = apply_distortions(images, kinds, sigmas, generator=torch.Generator().manual_seed(0))
    noisy = gaussian_noise(images, torch.tensor([0.0, 20.0, 0.0, 60.0]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0], images[0])
    assert torch.equal(out[1], noisy[1]) and torch.equal(out[3], noisy[3])
    assert torch.allclose(out[2], gaussian_blur(images[2:3], 2.0)[0])


def test_sampler_uniform_seeded_and_clean_fraction():
    sampler = DistortionSampler(seed=0)
    kinds, sigmas = sampler.sample(10000)
    assert set(kinds.tolist()) == {1, 2}
    # each of the ten conditions is drawn about 1/10 of the time
    per_condition = [
        int(((kinds == (1 if c.kind == "noise" else 2)) & (sigmas == c.sigma)).sum()) for c in PAPER_DISTORTIONS
    ]
    assert all(900 < n < 1100 for n in per_condition), per_condition
    a = DistortionSampler(seed=3).sample(64)
    b = DistortionSampler(seed=3).sample(64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    kinds, _ = DistortionSampler(seed=0, clean_fraction=0.3).sample(10000)
    assert 0.27 < float((kinds == 0).float().mean()) < 0.33
    assert bool((DistortionSampler("blur:2", clean_fraction=1.0, seed=0).sample(50)[0] == 0).all())


def test_sampler_state_round_trip_reproduces_stream():
    images = torch.rand(6, 3, 16, 16)
    sampler = DistortionSampler(seed=11)
    sampler(images)
    state = sampler.state_dict()
    first, _ = sampler(images)
    other = DistortionSampler(seed=0)
    other.load_state_dict(state)
    second, _ = other(images)
    assert torch.equal(first, second)


def test_distortion_validation():
    with pytest.raises(ValueError, match="kernel_size applies to blur only"):
        Distortion("noise", 20, kernel_size=3)
    assert Distortion("blur", 2.5).name == "blur2.5"
