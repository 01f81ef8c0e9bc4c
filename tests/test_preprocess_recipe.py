"""The same pixels in training, validation, export and `timm-icl eval`: a recipe run at a non-default image size,
crop fraction and interpolation exports that view, and `timm-icl eval RUN` reproduces the recipe's eval.json."""

import json
import sys
from pathlib import Path

import timm
from test_data import make_parquet

import timm_icl  # noqa: F401  (registers vgg_tiny)
from timm_icl.cli import main as cli_main
from timm_icl.eval import load_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import train_icl  # noqa: E402


def test_recipe_eval_and_cli_eval_see_the_same_images(tmp_path):
    dataset = make_parquet(tmp_path / "ds", n=12, size=45, num_classes=3)  # 45 px images, one split: train
    out = tmp_path / "run"
    distortions = "noise:30,90 blur:1"
    args = [
        "--model", "vgg_tiny", "--no-pretrained", "--dataset", str(dataset), "--val-split", "train",
        "--allow-random-reference",
        "--image-size", "32", "--crop-pct", "0.8", "--interpolation", "bicubic", "--train-transform", "timm",
        "--batch-size", "4", "--num-workers", "0", "--epochs", "1", "--lr", "0.05", "--seed", "3",
        "--distortions", distortions, "--output-dir", str(out),
    ]  # fmt: skip
    assert train_icl.main(args) == 0

    # the export records the crops training and validation used, not vgg_tiny's 28 px / crop 1.0 / bilinear
    pcfg = json.loads((out / "model" / "config.json").read_text())["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 32, 32] and pcfg["crop_pct"] == 0.8 and pcfg["interpolation"] == "bicubic"
    loaded = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True)
    resolved = timm.data.resolve_data_config({}, model=loaded)
    assert resolved["input_size"] == (3, 32, 32) and resolved["crop_pct"] == 0.8
    card = (out / "model" / "README.md").read_text()
    assert "| training length | 3 steps, 1 epochs completed (of 1 planned) |" in card

    recipe = json.loads((out / "eval.json").read_text())
    assert recipe["split"] == "train"
    result = tmp_path / "cli.json"
    cli = ["eval", str(out), "--dataset", str(dataset), "--split", "train", "--seed", "3"]
    assert cli_main([*cli, "--distortions", distortions, "-q", "-o", str(result)]) == 0
    evaluated = load_results(result)
    assert evaluated["preprocessing"]["input_size"] == [3, 32, 32] and evaluated["preprocessing"]["crop_pct"] == 0.8
    assert evaluated["num_samples"] == recipe["num_samples"] == 12
    for name, condition in recipe["conditions"].items():  # identical numbers, condition by condition
        assert evaluated["conditions"][name]["correct"] == condition["correct"], name
        assert evaluated["conditions"][name]["top1"] == condition["top1"], name
