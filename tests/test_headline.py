"""The headline command: `train_icl.py --model vgg16` with no config is the paper's run on streamed ImageNet."""

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "train_icl.py"


def test_the_defaults_are_the_papers_protocol_on_streamed_imagenet():
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True)
    settings = yaml.safe_load(out.stdout)
    assert settings["dataset"] == "timm/imagenet-1k-wds" and settings["model"] == "vgg16"
    assert (settings["lr"], settings["epochs"], settings["distortions"]) == (0.001, 40, "paper")
    assert settings["constraint"] == "icl" and settings["pretrained"] is True
    # resolved at start: a Hub id streams; no batch flag = the paper's global batch of 64; the model's own crop
    assert settings["streaming"] is None and settings["global_batch_size"] is None and settings["batch_size"] is None
    assert settings["crop_pct"] is None and settings["image_size"] is None


def test_offline_the_headline_command_stops_at_once_with_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "vgg16", "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    elapsed = time.perf_counter() - tic
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot stream timm/imagenet-1k-wds offline"), proc.stderr
    assert "hf auth login" in lines[0] and "accept its terms" in lines[0] and "pass --dataset" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing started: no model, no run folder
    assert elapsed < 45, elapsed  # the interpreter's imports only (about 5 s idle); was about 60 s of Hub retries
