"""Every config under recipes/configs parses with recipes/train_icl.py and names only existing options."""

import runpy
import sys
from pathlib import Path

import pytest
import yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))


def run_recipe_in_process(monkeypatch, capsys, *argv):
    """Run train_icl.py's settings stage (--dry-run) in this process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train_icl.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(RECIPES / "train_icl.py"), run_name="__main__")
    captured = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) or code is None else 1), captured.out, str(code) + captured.err


def test_configs_exist():
    names = {c.name for c in CONFIGS}
    assert {"vgg16_imagenet_icl.yaml", "vgg16_imagenet_mse.yaml", "vgg16_imagenet_finetune.yaml"} <= names
    assert "fashion_mnist_vgg_tiny_reference.yaml" in names and "fashion_mnist_vgg_tiny_icl.yaml" in names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses(config, monkeypatch, capsys):
    text = config.read_text()
    assert text.startswith("#") and "train_icl.py" in text.split("\n\n")[0] + text, "header must say how to launch"
    values = yaml.safe_load(text)
    code, out, err = run_recipe_in_process(monkeypatch, capsys, "-c", str(config), "--dry-run")
    assert code in (0, None), err
    resolved = yaml.safe_load(out)
    for key, value in values.items():
        assert key in resolved, f"{config.name}: {key} is not an option"
        assert resolved[key] == value, f"{config.name}: {key} resolved to {resolved[key]!r}, not {value!r}"


def test_paper_configs_follow_the_paper():
    icl, mse, plain = (
        yaml.safe_load((RECIPES / "configs" / f"vgg16_imagenet_{m}.yaml").read_text())
        for m in ("icl", "mse", "finetune")
    )
    assert (icl["constraint"], icl["constraint_weight"], icl["alpha"]) == ("icl", 0.1, 100.0)
    assert (mse["constraint"], mse["constraint_weight"]) == ("mse", 0.05)
    assert plain["constraint"] == "none"
    for cfg in (icl, mse, plain):
        assert cfg["lr"] == 0.001 and cfg["epochs"] == 40 and cfg["distortions"] == "paper"
        assert cfg["layers"] == "pre_logits.fc1,pre_logits.fc2" and cfg["model"].startswith("vgg16")


def test_unknown_and_invalid_keys_fail_clearly(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nlearning_rate: 0.1\n")
    code, _, err = run_recipe_in_process(monkeypatch, capsys, "-c", str(bad), "--dry-run")
    assert code != 0 and "unknown options ['learning_rate']" in err
    bad.write_text("constraint: icll\n")
    code, _, err = run_recipe_in_process(monkeypatch, capsys, "-c", str(bad), "--dry-run")
    assert code != 0 and "constraint = 'icll' is not one of" in err


def test_flags_override_config(monkeypatch, capsys):
    config = RECIPES / "configs" / "vgg16_imagenet_icl.yaml"
    code, out, err = run_recipe_in_process(monkeypatch, capsys, "-c", str(config), "--lr", "0.5", "--dry-run")
    assert code in (0, None), err
    assert yaml.safe_load(out)["lr"] == 0.5
