"""The precision policy (CPU bf16 autocast stands in for a GPU's): distortions in float32 and the reference in its own
dtype outside autocast, only the student under autocast; live and cached targets are the same bits."""

import pytest
import timm
import torch

import timm_icl  # noqa: F401  (registers vgg_tiny)
from timm_icl import ICLTask
from timm_icl.target_cache import TargetCache

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def _setup(seed=0, **kw):
    torch.manual_seed(seed)
    task = ICLTask(timm.create_model("vgg_tiny", num_classes=10), seed=0, **kw)
    images = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    labels = torch.randint(0, 10, (16,))
    task.sampler.sample(1)  # the sampler's generator exists from here: its state can be saved and restored
    return task, images, labels


def _student_inputs(task, images, labels, autocast: bool, targets=None):
    """The student's input (the distorted, normalised batch) and the step's outputs."""
    seen = []
    handle = task.get_eval_model().register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.autocast(**AUTOCAST, enabled=autocast):
            out = task(images, labels, reference_targets=targets)
    finally:
        handle.remove()
    return seen[0], out


def test_distortions_and_reference_ignore_autocast():
    task, images, labels = _setup(distortions="paper")
    state = task.sampler.state_dict()
    x32, out32 = _student_inputs(task, images, labels, autocast=False)
    task.sampler.load_state_dict(state)
    x16, out16 = _student_inputs(task, images, labels, autocast=True)
    assert x32.dtype == x16.dtype == torch.float32
    assert torch.equal(x32, x16)  # the same distorted pixels (before: up to 0.021 apart after normalisation)
    with torch.autocast(**AUTOCAST):
        bits16 = task.reference_targets(images)
    bits32 = task.reference_targets(images)
    assert all(torch.equal(bits16[k], bits32[k]) for k in bits32)  # before: 0.12% of the bits flipped
    assert out16["output"].dtype == torch.bfloat16  # the student did run under autocast
    assert out32["output"].dtype == torch.float32


def test_live_and_cached_targets_train_on_identical_bits_under_autocast():
    task, images, labels = _setup(distortions="paper")
    ids = torch.arange(images.shape[0])
    cache = TargetCache.build(task, [(ids, images)])  # built outside autocast, as the recipe does
    with torch.autocast(**AUTOCAST):
        live = task.reference_targets(images)
    cached = cache.lookup(ids)
    assert all(torch.equal(live[k], cached[k]) for k in live)
    state = task.sampler.state_dict()
    _, out_live = _student_inputs(task, images, labels, autocast=True)
    task.sampler.load_state_dict(state)
    _, out_cached = _student_inputs(task, images, labels, autocast=True, targets=cached)
    assert torch.equal(out_live["loss"], out_cached["loss"])
    assert torch.equal(out_live["constraint_loss"], out_cached["constraint_loss"])


@pytest.mark.parametrize("ref_dtype", [torch.bfloat16])
def test_explicit_reference_dtype_is_used_whatever_the_autocast(ref_dtype):
    task, images, _ = _setup(reference_dtype=ref_dtype)
    seen = []
    handle = task.reference.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    try:
        with torch.autocast(**AUTOCAST):
            inside = task.reference_targets(images)
        outside = task.reference_targets(images)
    finally:
        handle.remove()
    assert seen == [ref_dtype, ref_dtype]
    assert all(torch.equal(inside[k], outside[k]) for k in inside)


def test_channels_last_reference_gives_the_same_bits_here():
    task, images, _ = _setup()
    task_cl, _, _ = _setup(reference_channels_last=True)
    plain, cl = task.reference_targets(images), task_cl.reference_targets(images)
    assert all(torch.equal(plain[k], cl[k]) for k in plain)
