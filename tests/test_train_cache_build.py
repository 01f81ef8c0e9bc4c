"""Cached reference targets: the sharded, resumable build (timm_icl.train.cache_build) gives the live loss, stale
caches are refused, an interrupted build continues after its last chunk; the recipe refuses what cannot be cached."""

import sys
from pathlib import Path

import pytest
import timm
import torch
from accelerate import Accelerator
from test_stream import make_wds

from timm_icl import ICLTask, StaleCacheError, TargetCache
from timm_icl.data import create_loader, resolve_preprocessing
from timm_icl.train.cache_build import build_target_cache, cache_preprocessing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import train_icl  # noqa: E402  (the recipe's refusals, end to end)


@pytest.fixture(scope="module")
def wds(tmp_path_factory) -> Path:
    return make_wds(tmp_path_factory.mktemp("wds"), n_shards=4, per_shard=6, size=40)


def make_task(seed: int = 0) -> ICLTask:
    torch.manual_seed(seed)  # the same starting (= reference) weights in every call
    model = timm.create_model("vgg_tiny", num_classes=3)
    return ICLTask(model, constraint="icl", distortions="noise:30,90 blur:1,2", seed=0)


def make_loader(wds: Path, task: ICLTask, image_size: int = 32):
    config = resolve_preprocessing(task.get_eval_model(), image_size=image_size)
    loader, info = create_loader(str(wds), "train", batch_size=4, streaming=True, data_config=config)
    return loader, cache_preprocessing(config, str(wds), "train", None)


def losses(task, batch, cached):
    state = task.get_task_state()  # the same distortions for both calls
    torch.manual_seed(1)
    out = task(batch[0], batch[1], reference_targets=cached)
    task.load_task_state(state)
    return out


def test_cached_targets_give_the_live_loss_and_stale_caches_are_refused(wds, tmp_path):
    task, path = make_task(), tmp_path / "targets.safetensors"
    loader, pre = make_loader(wds, task)
    build_target_cache(task, loader, path, pre, accelerator=Accelerator(cpu=True), say=lambda m: None)
    assert not list(tmp_path.glob("*.part*"))  # chunks and progress files removed after the merge
    cache = TargetCache.load(path, task=task, preprocessing=pre)
    assert len(cache) == 24

    batch = next(iter(make_loader(wds, task)[0]))
    losses(task, batch, None)  # the sampler's generators start on first use: from here on, calls repeat exactly
    live, cached = losses(task, batch, None), losses(task, batch, cache.lookup(batch.ids))
    assert live["constraint_loss"].item() > 0
    for key in ("loss", "task_loss", "constraint_loss"):
        assert abs(live[key].item() - cached[key].item()) <= 1e-6, key

    # another preprocessing (image size) or other reference weights: refused
    with pytest.raises(StaleCacheError, match="preprocessing"):
        TargetCache.load(path, task=task, preprocessing=make_loader(wds, task, image_size=28)[1])
    other = make_task()
    with torch.no_grad():
        next(other.reference.parameters()).add_(0.5)
    with pytest.raises(StaleCacheError, match="reference weights differ"):
        TargetCache.load(path, task=other, preprocessing=pre)


def test_an_interrupted_cache_build_continues_after_its_last_chunk(wds, tmp_path, monkeypatch):
    task, path = make_task(), tmp_path / "run" / "targets.safetensors"
    path.parent.mkdir()
    accelerator = Accelerator(cpu=True)
    calls = []

    def build_then_die(*args, **kwargs):  # the third chunk never gets written: a kill during the build
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = TargetCache.build
    monkeypatch.setattr(TargetCache, "build", build_then_die)
    loader, pre = make_loader(wds, task)
    with pytest.raises(KeyboardInterrupt):
        build_target_cache(task, loader, path, pre, accelerator=accelerator, chunk_batches=2, say=lambda m: None)
    monkeypatch.setattr(TargetCache, "build", original)
    assert sorted(p.name for p in path.parent.glob("targets.part0.*")) == [
        "targets.part0.000000.safetensors", "targets.part0.000001.safetensors", "targets.part0.json"]  # fmt: skip

    said = []
    loader, pre = make_loader(wds, task)
    build_target_cache(task, loader, path, pre, accelerator=accelerator, chunk_batches=2, say=said.append)
    assert loader.num_decoded == 24 - 16  # 2 chunks x 2 batches x 4 images were not decoded again
    assert said == ["reference targets: continuing after 16 images (2 chunk(s) per process)"]
    resumed = TargetCache.load(path)
    fresh_path = tmp_path / "fresh" / "targets.safetensors"
    fresh_path.parent.mkdir()
    build_target_cache(task, make_loader(wds, task)[0], fresh_path, pre, accelerator=accelerator, say=said.append)
    fresh = TargetCache.load(fresh_path)
    assert resumed.ids == fresh.ids and len(resumed) == 24
    for layer in fresh.layers:
        assert torch.equal(resumed.packed[layer], fresh.packed[layer])
    assert not list(path.parent.glob("targets.part*"))


def test_concatenate_refuses_parts_of_other_weights(wds):
    task = make_task()
    loader, pre = make_loader(wds, task)
    batches = [(b.ids, b[0]) for b in loader]
    a = TargetCache.build(task, batches[:2], preprocessing=pre)
    b = TargetCache.build(task, batches[2:], preprocessing=pre)
    whole = TargetCache.concatenate([a, b])
    assert whole.ids == a.ids + b.ids and len(whole) == 24
    for layer in whole.layers:
        assert torch.equal(whole.packed[layer], torch.cat([a.packed[layer], b.packed[layer]]))
    other = make_task()
    with torch.no_grad():
        next(other.reference.parameters()).add_(0.5)
    with pytest.raises(StaleCacheError):
        TargetCache.concatenate([a, TargetCache.build(other, batches[2:], preprocessing=pre)])


def test_the_recipe_refuses_random_training_crops_and_map_style_data(wds, tmp_path):
    base = ["--model", "vgg_tiny", "--no-pretrained", "--num-classes", "3", "--dataset", str(wds), "--streaming",
            "--allow-random-reference",
            "--val-split", "none", "--batch-size", "4", "--num-workers", "0", "--image-size", "32",
            "--distortions", "noise:30,90 blur:1,2", "--reference-targets", "cache"]  # fmt: skip
    with pytest.raises(SystemExit, match="training crops are random"):
        train_icl.main([*base, "--train-transform", "timm", "--output-dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="needs sample ids"):
        train_icl.main([*base, "--no-streaming", "--output-dir", str(tmp_path / "b")])
