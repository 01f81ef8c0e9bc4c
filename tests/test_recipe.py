"""recipes/train_icl.py launched as a user would: python / accelerate launch, tiny model, tiny local dataset."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from test_data import make_parquet

import timm_icl  # noqa: F401  (registers vgg_tiny)

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "train_icl.py"
HOOKED = Path(__file__).resolve().parent / "recipe_with_hooks.py"  # the recipe + testing switches as callbacks
TEST_SWITCHES = {"--stop-after-steps", "--log-labels"}


def script_for(args) -> Path:
    """The recipe itself, or the recipe with its testing callbacks when ``args`` use a testing switch."""
    return HOOKED if TEST_SWITCHES & set(args) else SCRIPT


COMMON = [
    "--model", "vgg_tiny", "--no-pretrained", "--val-split", "train", "--batch-size", "4", "--lr", "0.05",
    "--allow-random-reference",
    "--distortions", "noise:30,90 blur:1,2", "--num-workers", "0", "--log-every", "1",
]  # fmt: skip


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def run(*args: str, world: int = 1, timeout: int = 120) -> subprocess.CompletedProcess:
    if world == 1:
        cmd = [sys.executable, str(script_for(args))]
    else:
        with socket.socket() as s:  # a free port: parallel runs must not collide on 29500
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(world)]
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--main_process_port", port, str(script_for(args))]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env(), timeout=timeout)
    # the launcher's own traceback hides the worker's: show the lines that name an error first
    errors = "\n".join(line for line in proc.stderr.splitlines() if "Error" in line and "errors.html" not in line)
    assert proc.returncode == 0, errors[-3000:] + "\n---\n" + proc.stdout[-1500:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """16 images, 4 classes; image 5 cannot be decoded, image 7 is greyscale."""
    return make_parquet(tmp_path_factory.mktemp("ds"), n=16, num_classes=4, bad={5}, grey={7})


def test_recipe_trains_checkpoints_and_exports(dataset, tmp_path):
    out = tmp_path / "run"
    proc = run(*COMMON, "--dataset", str(dataset), "--epochs", "2", "--output-dir", str(out))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 8  # 15 good images -> 4 batches of 4 per epoch, 2 epochs
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["constraint_loss"]) for r in steps)
    assert any(r["constraint_loss"] > 0 for r in steps)
    assert steps[-1]["skipped"] == 2  # the undecodable image, once per epoch, counted and reported
    assert "undecodable" in proc.stdout + proc.stderr
    vals = [r for r in records if "val/clean" in r]
    assert len(vals) == 2 and all(0 <= r["val/clean"] <= 1 for r in vals) and "val/noise90" in vals[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_0", "checkpoint_1"]
    assert (out / "checkpoints" / "checkpoint_1" / "model.safetensors").exists()
    config = (out / "config.yaml").read_text()
    assert "constraint: icl" in config and "num_classes: 4" in config
    results = json.loads((out / "eval.json").read_text())
    assert results["conditions"]["clean"]["count"] == 15
    # the exported folder loads with timm and holds the trained weights
    model = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True).eval()
    trained = load_file(str(out / "checkpoints" / "checkpoint_1" / "model.safetensors"))
    assert model.num_classes == 4
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name])
    assert json.loads((out / "model" / "config.json").read_text())["icl"]["method"] == "icl"


def test_kill_and_resume_gives_the_same_weights(dataset, tmp_path):
    args = [*COMMON, "--dataset", str(dataset), "--epochs", "2", "--val-split", "none"]
    run(*args, "--output-dir", str(tmp_path / "straight"))
    # SIGTERM (sent by the script to itself at step 6, mid-epoch 1): checkpoint and clean exit, then resume
    proc = run(*args, "--output-dir", str(tmp_path / "killed"), "--stop-after-steps", "6")
    assert "stopped by signal at step 6" in proc.stdout + proc.stderr
    assert not (tmp_path / "killed" / "model").exists()
    proc = run(*args, "--output-dir", str(tmp_path / "killed"), "--resume", "latest")
    assert "resumed from" in proc.stdout + proc.stderr
    straight = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    init = timm.create_model("vgg_tiny", num_classes=4).state_dict()
    assert not torch.equal(init["pre_logits.fc1.weight"], straight["pre_logits.fc1.weight"])


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streamed"])
def test_two_processes_see_every_sample_once(tmp_path, streaming):
    folder = make_parquet(tmp_path / "ds", n=13, size=8)  # label = sample index: identifies each sample
    out = tmp_path / "run"
    args = [*COMMON, "--dataset", str(folder), "--epochs", "2", "--batch-size", "3", "--val-split", "none"]
    args += ["--output-dir", str(out), "--log-labels", "--constraint", "none"]
    if streaming:
        args += ["--streaming", "--sched", "constant"]
    run(*args, world=2)
    per_rank = [[json.loads(line) for line in (out / f"labels_rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    for epoch in (0, 1):
        labels = [x for r in (0, 1) for x in per_rank[r][epoch]["labels"]]
        assert sorted(labels) == list(range(13)), (epoch, per_rank)
        assert {len(per_rank[0][epoch]["labels"]), len(per_rank[1][epoch]["labels"])} == {6, 7}
    if not streaming:  # reshuffled per epoch
        assert per_rank[0][0]["labels"] != per_rank[0][1]["labels"]
    config = (out / "config.yaml").read_text()
    assert "world_size: 2" in config
    model = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True)
    assert model.num_classes == 13


def test_user_mistakes_end_with_one_line(dataset, tmp_path):
    cmd = [sys.executable, str(SCRIPT), *COMMON, "--dataset", str(dataset), "--output-dir", str(tmp_path / "x")]
    proc = subprocess.run([*cmd, "--layers", "nope"], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: layer 'nope'")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([*cmd, "--label-column", "nope"], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode != 0 and "error: no label column 'nope'" in proc.stderr and "Traceback" not in proc.stderr
