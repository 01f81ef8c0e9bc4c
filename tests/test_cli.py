"""Every `timm-icl` subcommand, run from a subprocess as a user would, on tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import timm_icl  # noqa: F401
from timm_icl.cli import main
from timm_icl.eval import load_results, save_results
from timm_icl.eval.evaluate import evaluate_robustness
from timm_icl.hub import export_model

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

CHELSEA = Path(__import__("skimage").__file__).parent / "data" / "chelsea.png"


def run_cli(*args, env=None, check=True):
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "timm_icl.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=180
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    export_model(timm.create_model("vgg_tiny", num_classes=10), run / "model", icl_config={"method": "icl"})
    return run


def test_help_has_examples_and_bad_arguments_are_one_line(capsys):
    for command in ("eval", "layers", "distort", "compare", "push"):  # in-process: each subprocess costs ~4 s
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and f"timm-icl {command} " in text
    assert main(["eval", "vgg_tiny"]) == 1  # no dataset (a timm name has no run to take it from): one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("timm-icl eval: error: no dataset: pass --dataset")
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors: one line too
        main(["eval", "vgg_tiny", "--batch-size", "x"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert main(["compare", "/nonexistent/results.json"]) == 1
    assert capsys.readouterr().err == "timm-icl compare: error: no results file at /nonexistent/results.json\n"


def test_layers_marks_the_default_preset(capsys):
    out = run_cli("layers", "vgg_tiny").stdout
    lines = {line[2:].split()[0]: line for line in out.splitlines() if line[:2] in ("* ", "  ") and "[" in line}
    assert lines["pre_logits.fc1"].startswith("* ") and lines["pre_logits.fc2"].startswith("* ")
    assert lines["features.0"].startswith("  ") and "[256, 1, 1]" in lines["pre_logits.fc1"]
    assert main(["layers", "test_resnet", "--input-size", "3", "32", "32", "--json"]) == 0  # in-process: faster
    rows = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in rows if r["default"]] == timm_icl.default_layers(timm.create_model("test_resnet"))


def test_distort_writes_grid_of_paper_conditions(tmp_path):
    out = tmp_path / "grid.png"
    run_cli("distort", CHELSEA, "-o", out, "--size", "96")
    from PIL import Image

    with Image.open(out) as im:
        width, height = im.size
        pixels = im.convert("L").resize((60, 20))
    assert width > 2 * height > 0  # 2 rows (noise, blur) x 6 columns (clean + 5 sigmas)
    assert len(set(pixels.tobytes())) > 50  # a real picture, not a blank canvas


def test_eval_run_folder_on_fashion_mnist(run_dir, tmp_path):
    pytest.importorskip("timm_icl.data")
    if not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST files not installed")
    out = tmp_path / "res.json"
    args = ("eval", run_dir, "--dataset", "fashion-mnist", "--max-samples", "40", "--batch-size", "16")
    proc = run_cli(*args, "--distortions", "noise:60 blur:1.5", "-o", out, "-q")
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "| method | clean | noise mean | blur mean | noise60 | blur1.5 |"
    assert lines[2].startswith(f"| {run_dir.name} | ")
    res = load_results(out)  # per-image correctness is stored as packed bits
    assert res["conditions"]["clean"]["count"] == 40 and len(res["per_image"]["noise60"]) == 40
    assert res["split"] == "test"  # Fashion-MNIST has no validation split
    pre = res["preprocessing"]  # the exported model's own eval view: vgg_tiny's 28 px, crop 1.0, bilinear
    assert pre["input_size"] == [3, 28, 28] and pre["crop_pct"] == 1.0 and pre["interpolation"] == "bilinear"


def test_eval_defaults_to_validation_split_and_takes_crop_flags(tmp_path, capsys):
    for split, value in (("train", 0), ("validation", 60), ("test", 120)):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((40, 30, 3), value, np.uint8)).save(tmp_path / "data" / split / cls / "0.png")
    out = tmp_path / "res.json"
    args = ["eval", "vgg_tiny", "--no-pretrained", "--num-classes", "2", "--dataset", tmp_path / "data"]
    assert main([*map(str, args), "--distortions", "noise:10", "--crop-pct", "0.875", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "split validation; crop 28x28, crop_pct 0.875, bilinear, center" in err
    res = load_results(out)
    assert res["split"] == "validation" and res["num_samples"] == 2 and res["preprocessing"]["crop_pct"] == 0.875
    assert main([*map(str, args), "--split", "test", "--interpolation", "bicubic", "-q", "-o", str(out)]) == 0
    res = load_results(out)
    assert res["split"] == "test" and res["preprocessing"]["interpolation"] == "bicubic"


def test_compare_table_with_intervals_and_mcnemar(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 5))
    images, labels = torch.rand(30, 3, 16, 16), torch.randint(0, 5, (30,))
    paths = []
    for i, seed in enumerate((0, 1)):
        res = evaluate_robustness(
            model, [(images, labels)], "noise:40 blur:1", seed=seed, mean=(0.5,) * 3, std=(0.5,) * 3
        )
        paths.append(save_results(res, tmp_path / f"run{i}.json"))
    out = run_cli("compare", f"A={paths[0]}", f"B={paths[1]}", "--baseline", "A", "--plot", tmp_path / "c.png").stdout
    assert "| A | 1" in out or "| A |" in out
    assert "clean top-1 [95% CI]" in out and "McNemar" in out
    row = next(line for line in out.splitlines() if line.startswith("| B | clean |"))
    assert row.split("|")[3].strip() == "+0.0000" and row.split("|")[7].strip() == "1.000"  # clean is noise-free
    assert (tmp_path / "c.png").stat().st_size > 5000


def test_push_run_folder_to_local_hub(run_dir, tmp_path):
    with HubServer(token="hf_cli_test_token") as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"))
        env["HF_TOKEN"] = "hf_cli_test_token"
        proc = run_cli("push", run_dir, "user/cli-push", env=env)
        assert proc.stdout.strip().startswith(f"{hub.url}/user/cli-push/commit/")
        assert set(hub.repos["user/cli-push"]["files"]) == {"README.md", "config.json", "model.safetensors"}
        assert "hf_cli_test_token" not in proc.stdout + proc.stderr


def test_push_offline_is_one_line_error(run_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(run_dir), "user/cli-push"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("timm-icl push: error: cannot push to user/cli-push: offline mode is on")
    assert err.count("\n") == 1
