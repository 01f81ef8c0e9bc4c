"""The recipe's cached reference targets (--reference-targets cache): the same loss as the live reference, stale
caches refused, random crops refused."""

import sys
from pathlib import Path

import pytest
import torch
from test_stream import make_wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import train_icl  # noqa: E402


@pytest.fixture(scope="module")
def wds(tmp_path_factory) -> Path:
    return make_wds(tmp_path_factory.mktemp("wds"), n_shards=4, per_shard=6, size=40)


def make_run(wds: Path, out: Path, *extra: str):
    argv = ["--model", "vgg_tiny", "--no-pretrained", "--num-classes", "3", "--dataset", str(wds), "--streaming",
            "--val-split", "none", "--batch-size", "4", "--num-workers", "0", "--image-size", "32",
            "--distortions", "noise:30,90 blur:1,2", "--reference-targets", "cache", "--output-dir", str(out),
            *extra]  # fmt: skip
    args = train_icl.parse_settings(argv)
    accelerator = train_icl.create_accelerator(args)
    train_icl.resolve_batch(args, 1)
    torch.manual_seed(0)  # the same starting (= reference) weights in every run of this test
    model, model_name, init = train_icl.create_model(args)
    data = train_icl.create_data(args, model, 0, 1)
    task = train_icl.create_task(args, model, 0, accelerator.device)
    opt = train_icl.create_optimization(args, task, data, 1)
    return train_icl.Run(args, accelerator, model_name, init, data, task, task.trainable_module, opt, out)


def losses(run, batch, cached):
    state = run.task.get_task_state()  # the same distortions for both calls
    torch.manual_seed(1)
    out = run.task(batch[0], batch[1], reference_targets=cached)
    run.task.load_task_state(state)
    return out


def test_cached_targets_give_the_live_loss_and_stale_caches_are_refused(wds, tmp_path, capsys):
    run = make_run(wds, tmp_path / "run")
    batch = next(iter(run.data.train_loader))
    losses(run, batch, None)  # the sampler's generators start on first use: from here on, calls repeat exactly
    live = losses(run, batch, None)
    train_icl.setup_target_cache(run)
    assert run.task.reference is None and run.target_cache is not None  # reference released
    assert len(run.target_cache) == 24 and (tmp_path / "run" / "targets.safetensors").exists()
    assert not list((tmp_path / "run").glob("*.part*"))
    cached = losses(run, batch, run.target_cache.lookup(batch.ids))
    assert live["constraint_loss"].item() > 0
    for key in ("loss", "task_loss", "constraint_loss"):
        assert abs(live[key].item() - cached[key].item()) <= 1e-6, key
    assert "reference targets:" in capsys.readouterr().out

    # the same cache with another preprocessing (image size) or other reference weights: refused with one line
    with pytest.raises(SystemExit, match=r"error: stale target cache: preprocessing .*rebuild it"):
        train_icl.setup_target_cache(make_run(wds, tmp_path / "run", "--image-size", "28"))
    other = make_run(wds, tmp_path / "run")
    with torch.no_grad():
        next(other.task.get_eval_model().parameters()).add_(0.5)  # the reference is a copy: change it
        next(other.task.reference.parameters()).add_(0.5)
    with pytest.raises(SystemExit, match="error: stale target cache: the reference weights differ"):
        train_icl.setup_target_cache(other)


def test_random_training_crops_and_map_style_data_are_refused(wds, tmp_path):
    with pytest.raises(SystemExit, match="training crops are random"):
        train_icl.setup_target_cache(make_run(wds, tmp_path / "a", "--train-transform", "timm"))
    with pytest.raises(SystemExit, match="needs sample ids"):
        train_icl.setup_target_cache(make_run(wds, tmp_path / "b", "--no-streaming"))


def test_an_interrupted_cache_build_continues_after_its_last_chunk(wds, tmp_path, monkeypatch):
    run = make_run(wds, tmp_path / "run")
    path = tmp_path / "run" / "targets.safetensors"
    from timm_icl.target_cache import TargetCache

    calls = []

    def build_then_die(*args, **kwargs):  # the third chunk never gets written: a kill during the build
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = TargetCache.build
    monkeypatch.setattr(TargetCache, "build", build_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_icl.build_target_cache(run, path, train_icl.cache_preprocessing(run.args, run.data), chunk_batches=2)
    monkeypatch.setattr(TargetCache, "build", original)
    assert sorted(p.name for p in path.parent.glob("targets.part0.*")) == [
        "targets.part0.000000.safetensors", "targets.part0.000001.safetensors", "targets.part0.json"]  # fmt: skip

    loaders = []
    make_loader = train_icl._cache_loader
    monkeypatch.setattr(train_icl, "_cache_loader", lambda r: loaders.append(make_loader(r)) or loaders[-1])
    train_icl.build_target_cache(run, path, train_icl.cache_preprocessing(run.args, run.data), chunk_batches=2)
    assert loaders[0].num_decoded == 24 - 16  # 2 chunks x 2 batches x 4 images were not decoded again
    resumed = TargetCache.load(path)
    fresh_path = tmp_path / "fresh" / "targets.safetensors"
    fresh_path.parent.mkdir()
    train_icl.build_target_cache(run, fresh_path, train_icl.cache_preprocessing(run.args, run.data))
    fresh = TargetCache.load(fresh_path)
    assert resumed.ids == fresh.ids and len(resumed) == 24
    for layer in fresh.layers:
        assert torch.equal(resumed.packed[layer], fresh.packed[layer])
    assert not list(path.parent.glob("targets.part*"))  # chunks and progress files removed after the merge
