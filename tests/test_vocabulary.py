"""One vocabulary for the recipe and ``timm-icl``: timm's data flags and prefixes, the run's own distortions as
eval's default, ``--import`` and the ``timm_icl.distortions`` entry points, compare's refusals, and the
``accelerate launch --cpu`` trap."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from test_cards import make_image_folder

import timm_icl
from timm_icl.cli import main
from timm_icl.eval import save_results
from timm_icl.eval.evaluate import evaluate_robustness
from timm_icl.hub import export_model
from timm_icl.utils.launch import cpu_launch_mismatch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
import train_icl  # noqa: E402

PLUGIN = """
import torch
from timm_icl import register_distortion

def invert(images, severity, generator):
    s = severity.view(-1, 1, 1, 1).to(images.dtype)
    return images * (1 - s) + (1 - images) * s

register_distortion("{name}", invert, severities=(0.5, 1.0), maximum=1.0, overwrite=True)
"""


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_kinds.py").write_text(PLUGIN.format(name="invert"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_kinds"
    timm_icl.unregister_distortion("invert")
    sys.modules.pop("my_kinds", None)


def test_timm_data_flags_and_prefixes():
    parse = train_icl.parse_settings
    assert parse(["/data/pets"]).dataset == parse(["--data-dir", "/data/pets"]).dataset == "/data/pets"
    assert (parse(["--dataset", "hfds/beans"]).dataset, parse(["--dataset", "hfds/beans"]).streaming) == ("beans", None)
    assert (parse(["--dataset", "hfids/org/x"]).dataset, parse(["--dataset", "hfids/org/x"]).streaming) == ("org/x", 1)
    assert parse(["--dataset", "wds/imagenet", "--data-dir", "/shards"]).dataset == "/shards"
    assert parse(["--dataset", "torch/fashion_mnist"]).dataset == "fashion-mnist"
    for spec, words in (("tfds/x", "TensorFlow Datasets"), ("torch/cifar10", "torchvision"), ("wds/x", "--data-dir")):
        with pytest.raises(SystemExit, match=words):
            parse(["--dataset", spec])
    args = parse(["--input-size", "3", "24", "24", "--mean", "0.5", "--std", "0.25", "0.25", "0.25"])
    assert args.input_size == [3, 24, 24] and args.mean == [0.5] * 3 and args.std == [0.25] * 3
    assert parse(["--img-size", "96"]).image_size == parse(["--image-size", "96"]).image_size == 96
    assert parse([]).distortions == "paper"


def test_input_size_mean_std_reach_the_export(tmp_path):
    data = make_image_folder(tmp_path / "pets")
    argv = ["--model", "vgg_tiny", "--no-pretrained", "--constraint", "none", str(data), "--val-split", "none"]
    argv += ["-b", "8", "-j", "0", "--input-size", "3", "24", "24", "--mean", "0.5", "--std", "0.25", "--epochs", "1"]
    argv += ["--output-dir", str(tmp_path / "run"), "--train-interpolation", "bicubic"]
    assert train_icl.main(argv) == 0
    pcfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["pretrained_cfg"]
    assert pcfg["input_size"] == [3, 24, 24] and pcfg["mean"] == [0.5] * 3 and pcfg["std"] == [0.25] * 3


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """An exported 28 px vgg_tiny trained on Fashion-MNIST with 'noise:30 blur:1' (config.json says so)."""
    run = tmp_path_factory.mktemp("run") / "fm"
    config = {"method": "icl", "distortions": "noise:30 blur:1"}
    export_model(timm.create_model("vgg_tiny"), run / "model", icl_config=config, dataset="fashion-mnist")
    return run


def test_eval_defaults_to_the_runs_distortions_and_says_so(small_run, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(small_run), "--val-split", "test", "--max-samples", "16", "-b", "8", "-j", "0", "-q",
                 "-o", str(out)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "distortions 'noise:30 blur:1' (the run's own" in err and "dataset fashion-mnist (" in err
    assert "the crops its training used" in err
    results = json.loads(out.read_text())
    assert sorted(results["conditions"]) == ["blur1", "clean", "noise30"] and results["num_samples"] == 16
    # the flag still wins
    assert main(["eval", str(small_run), "--split", "test", "--max-samples", "8", "-q", "--distortions", "noise:60",
                 "-o", str(out)]) == 0  # fmt: skip
    assert sorted(json.loads(out.read_text())["conditions"]) == ["clean", "noise60"]


def test_import_reaches_eval_distort_and_the_recipe(plugin, small_run, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["eval", str(small_run), "--import", plugin, "--dataset", "torch/fashion_mnist", "--split", "test"]
    assert main([*argv, "--max-samples", "8", "-q", "--distortions", "noise:30 invert:0.5,1", "-o", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["conditions"]["invert1"]["kind"] == "invert"
    from timm_icl.eval import format_table

    header, _, row = format_table({"fm": results}).splitlines()  # a custom kind gets its mean column
    cells = dict(zip(header.split(" | "), row.split(" | ")))
    inv = (results["conditions"]["invert0.5"]["top1"] + results["conditions"]["invert1"]["top1"]) / 2
    assert float(cells["invert mean"]) == pytest.approx(inv, abs=1e-4)
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "img.png")
    assert main(["distort", str(tmp_path / "img.png"), "--import", plugin, "--distortions", "invert:1",
                 "-o", str(tmp_path / "g.png"), "--size", "32"]) == 0  # fmt: skip
    args = train_icl.parse_settings(["--import", plugin, "--distortions", "invert:0.5"])
    assert timm_icl.parse_distortions(args.distortions).kinds() == ["invert"]
    with pytest.raises(SystemExit, match="--import no_such_module_xyz: ModuleNotFoundError"):
        train_icl.parse_settings(["--import", "no_such_module_xyz"])


def test_entry_point_group_registers_without_a_flag(tmp_path, monkeypatch, capsys):
    (tmp_path / "ep_kinds.py").write_text(PLUGIN.format(name="ep_invert"))
    info = tmp_path / "ep_kinds-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-kinds\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[timm_icl.distortions]\nep_kinds = ep_kinds\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        from timm_icl.distortions.plugins import load_distortion_plugins

        assert "entry point ep_kinds = ep_kinds" in load_distortion_plugins()
        assert "ep_invert" in timm_icl.distortion_names()
    finally:
        timm_icl.unregister_distortion("ep_invert")


def test_compare_refuses_results_of_other_images_unless_forced(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    images, labels = torch.rand(12, 3, 8, 8), torch.randint(0, 4, (12,))
    a = evaluate_robustness(model, [(images, labels)], "noise:40", seed=0, mean=(0.5,) * 3, std=(0.5,) * 3)
    b = evaluate_robustness(model, [(images[:10], labels[:10])], "noise:40", seed=0, mean=(0.5,) * 3, std=(0.5,) * 3)
    c = evaluate_robustness(model, [(images, labels)], "blur:1", seed=0, mean=(0.5,) * 3, std=(0.5,) * 3)
    paths = [save_results({**r, "dataset": d}, tmp_path / f"{i}.json") for i, (r, d) in
             enumerate(((a, "x"), (b, "x"), (c, "x"), (a, "y")))]  # fmt: skip
    for other, what in ((paths[1], "sample count"), (paths[2], "distortion set"), (paths[3], "dataset")):
        assert main(["compare", str(paths[0]), str(other)]) == 1
        err = capsys.readouterr().err
        assert f"differ in {what}" in err and "--force" in err and err.count("\n") == 1
    assert main(["compare", str(paths[0]), str(paths[3]), "--force"]) == 0
    assert "compared anyway" in capsys.readouterr().err


def test_accelerate_cpu_with_several_processes_is_said(tmp_path):
    env = {"ACCELERATE_USE_CPU": "True"}
    launch = ["python", "accelerate", "launch", "--cpu", "--num_processes", "2", "train.py"]
    assert "ONE process" in cpu_launch_mismatch(launch, env) and "--multi_gpu --num_processes 2" in cpu_launch_mismatch(
        launch, env
    )
    assert cpu_launch_mismatch(launch, {**env, "WORLD_SIZE": "2"}) is None  # several processes really run
    assert cpu_launch_mismatch([*launch[:5], "1", "train.py"], env) is None
    assert cpu_launch_mismatch(launch, {}) is None
    # the real launcher
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "train_icl.py"), "--dry-run",
           "--constraint", "none"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("accelerate launch --cpu starts ONE process whatever --num_processes says (2") == 1
