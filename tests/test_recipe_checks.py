"""recipes/train_icl.py checks every setting before it touches the run folder, says a full disk in one line, fails a
run that trained 0 steps, and tells a caller a stopped run from a finished one (issue 19). In-process ``main()`` on
the tiny parquet dataset of test_recipe (vgg_tiny, 16 images, 4 classes)."""

import errno
import json
import re
import signal
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_data import make_parquet
from test_recipe import COMMON, SCRIPT

import timm_icl  # noqa: F401  (registers vgg_tiny)
import timm_icl.train.checkpoint as checkpoint_module
from timm_icl.train.checkpoint import list_checkpoints, verify_checkpoint
from timm_icl.train.config import SettingsError, check_dataset_path
from timm_icl.train.run_files import ExitCode

sys.path.insert(0, str(SCRIPT.parent))
import reproduce_table1  # noqa: E402
import train_icl  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_parquet(tmp_path_factory.mktemp("ds"), n=16, num_classes=4, bad={5}, grey={7})


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder`` with its bytes (folders: None)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def refused(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        train_icl.main(argv)
    code = info.value.code
    assert isinstance(code, str) and "\n" not in code, code
    return code


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--val-distortions", "blurr:1"], "error: --val-distortions 'blurr:1': unknown distortion kind 'blurr'"),
        (["--distortions", "noise:abc"], "error: --distortions 'noise:abc': sigma 'abc' of 'noise'"),
        (["--image-size", "1"], "error: --image-size 1: vgg_tiny cannot take 1x1 images (Given input size: (16x1x1)"),
        (["--num-classes", "2"], "error: --num-classes 2 but the dataset has 4 classes (labels up to 3)"),
        (["--num-classes", "0"], "error: --num-classes 0: training needs a classifier"),
        (["--dataset", "./no/such/data"], "error: --dataset ./no/such/data: no such folder"),
        (["--dataset", "/no/such/data"], "error: --dataset /no/such/data: no such folder"),
        (["--reference-targets", "cache"], "error: --reference-targets cache needs sample ids"),
        (
            ["--reference-targets", "cache", "--streaming", "--train-transform", "timm"],
            "error: --reference-targets cache: the training crops are random",
        ),
        (["--reference-targets", "/no/such/folder/t.safetensors"], "error: --reference-targets /no/such/folder/t."),
        (["--reference-targets", "DAMAGED", "--streaming"], "error: target cache {tmp}/damaged.safetensors does not"),
        (["-c", "CONFIG:batch_size: 3.5\n"], "error: batch_size = 3.5 in {tmp}/config.yaml is not an integer"),
        (["-c", "CONFIG:epochs: true\n"], "error: epochs = True in {tmp}/config.yaml is not an integer"),
        (["-c", 'CONFIG:pretrained: "no"\n'], "error: pretrained = 'no' in {tmp}/config.yaml is not a boolean"),
        (["-c", "CONFIG:model_ema: 1\n"], "error: model_ema = 1 in {tmp}/config.yaml is not a boolean"),
        (["-c", "CONFIG:lr: yes\n"], "error: lr = True in {tmp}/config.yaml is not a number"),
    ],
    ids=lambda value: None if isinstance(value, list) else value.split(":")[1][:40],
)
def test_a_late_checked_setting_is_refused_before_the_run_folder_is_touched(dataset, tmp_path, argv, message):
    run_dir = tmp_path / "run"  # a used run folder: its history must survive a refused command
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: vgg_tiny\n")
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    before = snapshot(run_dir)
    if argv[0] == "-c":
        (tmp_path / "config.yaml").write_text(argv[1][len("CONFIG:") :])
        argv = ["-c", str(tmp_path / "config.yaml")]
    if "DAMAGED" in argv:  # random bytes where the cache should be: refused before config.yaml/metrics.jsonl
        (tmp_path / "damaged.safetensors").write_bytes(bytes(range(256)) * 8)
        argv = [str(tmp_path / "damaged.safetensors") if a == "DAMAGED" else a for a in argv]
    args = [*COMMON, "--dataset", str(dataset), "--val-split", "none", "--output-dir", str(run_dir), *argv]
    assert refused(args).startswith(message.format(tmp=tmp_path))
    assert snapshot(run_dir) == before


def test_a_hub_id_is_still_a_hub_id():
    for spec in ("someone/some-data", "mnist", "fashion-mnist", "timm/imagenet-1k-wds"):  # looked up on the Hub
        check_dataset_path(spec)
    for spec in ("data/train/images", "./data", "~/data", "/data", "data.parquet", "my data"):
        with pytest.raises(SettingsError, match=f"--dataset {re.escape(spec)}: no such folder"):
            check_dataset_path(spec)


def test_a_refusal_every_process_meets_is_printed_by_the_first_only(monkeypatch):
    """Three processes refusing the same setting: rank 0 prints the line, ranks 1 and 2 exit 1 silently."""
    for rank, expected in (("0", "error: --val-distortions 'blurr:1': unknown distortion kind"), ("1", 1), ("2", 1)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as info:
            train_icl.parse_settings(["--val-distortions", "blurr:1", "--no-pretrained", "--constraint", "none"])
        code = info.value.code
        assert code == expected if rank != "0" else str(code).startswith(expected), (rank, code)


def test_a_run_that_trains_0_steps_fails_and_exports_nothing(tmp_path):
    undecodable = make_parquet(tmp_path / "ds", n=8, num_classes=4, bad=set(range(8)))
    run_dir = tmp_path / "run"
    args = [*COMMON, "--dataset", str(undecodable), "--val-split", "none", "--output-dir", str(run_dir)]
    message = refused([*args, "--epochs", "1", "--checkpoint-every-epochs", "0"])
    assert message.startswith("error: the run trained 0 steps"), message
    assert not (run_dir / "model").exists()


class _StopAfter:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, run):
        if run.position["step"] == self.step:
            signal.raise_signal(signal.SIGTERM)


def test_main_tells_a_stopped_run_from_a_finished_one(dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = [*COMMON, "--dataset", str(dataset), "--val-split", "none", "--output-dir", str(run_dir), "--epochs", "1"]
    code = train_icl.main(args, callbacks=[_StopAfter(2)])
    assert code == 0 and code.finished is False  # SIGTERM: exit 0 for the scheduler, as documented
    assert not (run_dir / "model").exists()
    code = train_icl.main([*args, "--resume", "latest"])
    assert code == 0 and code.finished is True and (run_dir / "model" / "model.safetensors").is_file()


def test_reproduce_table1_never_records_a_stopped_run_as_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(train_icl, "main", lambda argv: ExitCode(0, finished=False))
    args = reproduce_table1.parse_settings(["--out", str(tmp_path / "out")])
    args.reused = []
    with pytest.raises(SystemExit) as info:
        reproduce_table1.train_run(args, tmp_path / "data", tmp_path / "run", size=8, constraint="icl", lam=1.0)
    assert info.value.code == 0
    assert not (tmp_path / "run" / "reuse.json").exists()


def test_a_full_disk_at_a_checkpoint_is_one_line_and_a_resume_after_freeing_space_finishes(
    dataset, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    args = [*COMMON, "--dataset", str(dataset), "--val-split", "none", "--output-dir", str(run_dir), "--epochs", "2"]
    args += ["--checkpoint-every-steps", "2", "--keep-checkpoints", "1"]
    real = checkpoint_module._write_bytes
    writes = {"n": 0}

    def full_after_first_checkpoint(path, data):
        writes["n"] += 1
        if path.parent.name != ".tmp-checkpoint_0" and path.name == "model.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(checkpoint_module, "_write_bytes", full_after_first_checkpoint)
    message = refused(args)
    assert re.fullmatch(
        rf"error: no space left on the device of {re.escape(str(run_dir / 'checkpoints'))} while writing "
        r"checkpoint_1: \d+ bytes \(.*\) needed, \d+ bytes \(.*\) free; free some space and rerun \(a run resumes "
        r"with --resume latest\)",
        message,
    ), message
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint_0"]  # no .tmp-* left
    assert verify_checkpoint(run_dir / "checkpoints" / "checkpoint_0", content=True)["step"] == 2
    assert not (run_dir / "model").exists()
    monkeypatch.setattr(checkpoint_module, "_write_bytes", real)  # space freed
    code = train_icl.main([*args, "--resume", "latest"])
    assert code.finished and (run_dir / "model" / "model.safetensors").is_file()
    (kept,) = list_checkpoints(run_dir / "checkpoints")
    assert verify_checkpoint(kept, content=True)["step"] == 8
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # each step logged once


def test_a_full_disk_at_the_export_leaves_the_previous_export_whole(dataset, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = [*COMMON, "--dataset", str(dataset), "--val-split", "none", "--output-dir", str(run_dir), "--epochs", "1"]
    args += ["--checkpoint-every-epochs", "0"]
    assert train_icl.main(args).finished
    before = snapshot(run_dir / "model")
    import timm.models

    def full(model, out_dir, **kwargs):
        (Path(out_dir) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                           "left on device\" })")  # fmt: skip

    monkeypatch.setattr(timm.models, "save_for_hf", full)
    message = refused([*args, "--lr", "0.01"])
    assert message.startswith(f"error: no space left on the device of {run_dir} while exporting the model: ")
    assert re.search(r": \d+ bytes \(.*\) needed, \d+ bytes \(.*\) free;", message), message
    assert snapshot(run_dir / "model") == before and load_file(str(run_dir / "model" / "model.safetensors"))
    assert not list(run_dir.glob(".model*"))
