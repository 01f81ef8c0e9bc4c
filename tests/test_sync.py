"""No host syncs in the training step: counted on CPU with timm_icl.utils.sync_debug (the ops that force a CUDA
sync, host reads, tensors made from Python data or copied per step), and under CUDA's own sync debug mode when a
GPU is there."""

import pytest
import timm
import torch

import timm_icl  # noqa: F401  (registers vgg_tiny)
from timm_icl import ICLTask
from timm_icl.distortions import IMAGENET_C_10, DistortionSet, register_distortion, unregister_distortion
from timm_icl.target_cache import TargetCache
from timm_icl.utils.sync_debug import SyncCounter, host_side


def test_detector_sees_scalar_reads_under_inference_mode():
    """Under torch.inference_mode item()/int()/bool() skip the Python dispatch key: counted once each all the same
    (and once, not twice, outside it)."""
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            c = torch.zeros((), dtype=torch.long)
            with SyncCounter() as sync:
                _ = c.item()
                _ = int(c)
                _ = bool(c > 0)
                _ = [0, 1][c]
        assert sync.counts == {"_local_scalar_dense": 4}, (mode, sync.summary())


def test_detector_counts_each_kind_of_sync_and_nothing_else():
    x = torch.rand(6)
    with SyncCounter() as sync:
        y = (x * 2 + 1).relu().sum()  # device work only
        idx = torch.arange(3)
        _ = x.index_select(0, idx)
    assert sync.total == 0
    with SyncCounter() as sync:
        _ = float(y)  # item
        _ = x[x > 0.5]  # boolean mask
        _ = (x > 0.5).nonzero()
        _ = torch.unique(x)
        _ = x.tolist()  # a device-to-host read on CUDA
        _ = torch.tensor([1, 2])  # Python data
        _ = x.to("cpu")  # a blocking move of a host tensor (counted on CPU)
        _ = x.to("cpu", non_blocking=True)  # the loader's pinned copy: fine
        _ = torch.repeat_interleave(torch.tensor([1, 2]).long())
        with host_side():
            _ = torch.tensor([3]).tolist()  # marked host work: not counted
    assert sync.counts == {
        "_local_scalar_dense": 1,
        "index(bool mask)": 1,
        "nonzero": 1,
        "unique": 1,
        "tolist": 1,
        "torch.tensor": 2,
        "to(device)": 1,
        "repeat_interleave": 1,
    }
    assert (sync.syncs, sync.host_reads, sync.host_data) == (5, 1, 3)
    assert "test_sync.py" in sync.events[0].where


def _salt(images, severity, generator=None):
    """A user's random kind that is not whole_batch (its function gets the set's first severity elsewhere)."""
    flip = torch.rand(images.shape, generator=generator, device=images.device) < severity.view(-1, 1, 1, 1)
    return torch.where(flip, torch.ones_like(images), images)


@pytest.fixture
def user_kind():
    register_distortion("salty", _salt, severities=(0.1, 0.3), maximum=1.0, random=True)
    yield "salty:0.1,0.3 blur:2 noise:40"
    unregister_distortion("salty")


NO_CODEC = DistortionSet([c for c in IMAGENET_C_10 if c.kind != "jpeg"])


def _step_events(distortions, batch=8, cached=False, constraint="icl", autocast=False):
    torch.manual_seed(0)
    task = ICLTask(
        timm.create_model("vgg_tiny", num_classes=10), constraint=constraint, distortions=distortions, seed=0
    )
    images = (torch.rand(batch, 3, 32, 32) * 255).to(torch.uint8)
    labels = torch.randint(0, 10, (batch,))
    ids = torch.arange(batch)
    cache = TargetCache.build(task, [(ids, images)]) if cached else None

    def step():
        targets = cache.lookup(ids, device=images.device) if cached else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = task(images, labels, reference_targets=targets)
        out["loss"].backward()

    step()  # first use: the per-device tables and blur matrices are made (once)
    with SyncCounter() as sync:
        step()
    return sync


@pytest.mark.parametrize("cached", [False, True], ids=["live", "cached"])
@pytest.mark.parametrize("distortions", ["paper", "small", NO_CODEC], ids=["paper", "small", "imagenet-c-10-no-jpeg"])
def test_training_step_has_no_sync(distortions, cached):
    sync = _step_events(distortions, cached=cached)
    assert sync.total == 0, sync.summary()


def test_training_step_with_a_user_kind_has_no_sync(user_kind):
    for cached in (False, True):
        sync = _step_events(user_kind, cached=cached)
        assert sync.total == 0, sync.summary()


def test_training_step_under_autocast_and_other_constraints_has_no_sync():
    for constraint in ("mse", "ab", "none", "jsd"):
        sync = _step_events("paper", constraint=constraint, autocast=True)
        assert sync.total == 0, (constraint, sync.summary())


def test_jpeg_costs_a_constant_per_batch_not_per_image():
    """The JPEG codec runs on the host: the batch goes there and back once, whatever its size (and only then)."""
    small, large = _step_events("imagenet-c-10", batch=8), _step_events("imagenet-c-10", batch=32)
    assert small.counts == large.counts and 0 < small.total <= 4, large.summary()
    assert all("corruptions.py" in e.where or "sets.py" in e.where for e in large.events), large.summary()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("distortions", ["paper", NO_CODEC], ids=["paper", "imagenet-c-10-no-jpeg"])
def test_cuda_step_under_sync_debug_error_mode(distortions):
    torch.manual_seed(0)
    task = ICLTask(timm.create_model("vgg_tiny", num_classes=10), distortions=distortions, seed=0).cuda()
    images = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8).cuda()
    labels = torch.randint(0, 10, (8,)).cuda()
    task(images, labels)["loss"].backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        task(images, labels)["loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
