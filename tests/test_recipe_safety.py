"""recipes/train_icl.py under kills, damaged files, exploding losses, Ctrl-C and user mistakes, launched as a user
would: atomic checkpoints and fallback resume, the non-finite guard, atomic export, push checked before training,
one-line errors. Tiny model (vgg_tiny) on 16 tiny images (15 decodable: 4 steps per epoch at batch 4)."""

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from hub_server import HubServer
from safetensors.torch import load_file
from test_data import make_parquet
from test_recipe import COMMON, SCRIPT, env, script_for

import timm_icl  # noqa: F401  (registers vgg_tiny)
from timm_icl.hub import export_model
from timm_icl.train.checkpoint import MARKER, find_resumable, list_checkpoints, verify_checkpoint

sys.path.insert(0, str(SCRIPT.parent))
import train_icl  # noqa: E402

from timm_icl.train.guard import NonFiniteGuard  # noqa: E402

TOKEN = "hf_fAkEtOkEn0123456789"


def launch(*args: str, extra_env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    """The recipe in a fresh process; the caller checks the exit code."""
    proc_env = dict(env(), **(extra_env or {}))
    return subprocess.run(
        [sys.executable, str(script_for(args)), *args], capture_output=True, text=True, env=proc_env, timeout=timeout
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a failed run ends with (tqdm's carriage-return bars stripped)."""
    assert proc.returncode not in (0, None), proc.stdout[-1000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line.split("\r")[-1] for line in proc.stderr.strip().splitlines()]
    errors = [line[line.index("error:") :] for line in lines if "error:" in line]
    assert errors, proc.stderr[-2000:]
    return errors[-1]


def train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r.get("kind") == "train"]


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """16 images, 4 classes; image 5 cannot be decoded, image 7 is greyscale (as in test_recipe)."""
    return make_parquet(tmp_path_factory.mktemp("ds"), n=16, num_classes=4, bad={5}, grey={7})


@pytest.fixture(scope="module")
def base(dataset) -> list[str]:
    """2 epochs of 4 steps, a checkpoint every 2 steps and at each epoch's end."""
    return [*COMMON, "--dataset", str(dataset), "--epochs", "2", "--val-split", "none", "--checkpoint-every-steps", "2"]


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted run: its folder and its final weights."""
    out = tmp_path_factory.mktemp("straight") / "run"
    ok(launch(*base, "--output-dir", str(out)))
    assert train_steps(out) == list(range(1, 9))
    return out, load_file(str(out / "model" / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------
def test_a_kill_during_a_save_with_keep_1_then_resume_loses_nothing(base, straight, tmp_path):
    out = tmp_path / "run"
    args = [*base, "--keep-checkpoints", "1", "--output-dir", str(out)]
    # SIGKILL inside the second save (step 4), after accelerate wrote its files and before the marker
    proc = launch(*args, extra_env={"TIMM_ICL_TEST_KILL_DURING_SAVE": "2"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint_0"]  # rotation did not run first
    assert verify_checkpoint(out / "checkpoints" / "checkpoint_0")["step"] == 2
    (torn,) = (out / "checkpoints").glob(".tmp-checkpoint_*")
    assert (torn / "model.safetensors").exists() and not (torn / MARKER).exists()
    assert train_steps(out) == [1, 2, 3, 4]

    text = ok(launch(*args, "--resume", "latest"))
    assert re.search(r"resumed from \S+checkpoint_0 at epoch 0, step 2", text)
    assert weights_equal(load_file(str(out / "model" / "model.safetensors")), straight[1])
    # metrics.jsonl: steps 3 and 4 were logged twice (before the kill and after the resume): now once each
    assert train_steps(out) == list(range(1, 9))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_5"]  # keep 1, no torn folder


def test_a_damaged_newest_checkpoint_falls_back_and_an_older_resume_finishes(base, straight, tmp_path):
    out = tmp_path / "run"
    args = [*base, "--keep-checkpoints", "3", "--output-dir", str(out)]
    ok(launch(*args, "--stop-after-steps", "6"))  # checkpoints at steps 2, 4, 4 (epoch end), 6; newest 3 kept
    checkpoints = out / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]
    weights = checkpoints / "checkpoint_3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # e.g. a disk that filled up, a copy cut short

    text = ok(launch(*args, "--resume", "latest"))
    assert re.search(r"skipped \S+checkpoint_3: damaged \(model.safetensors has 100 bytes", text), text[-2000:]
    assert re.search(r"resumed from \S+checkpoint_2 at epoch 1, step 4", text)
    assert weights_equal(load_file(str(out / "model" / "model.safetensors")), straight[1])
    assert train_steps(out) == list(range(1, 9))
    (aside,) = checkpoints.glob("superseded-*")
    assert [p.name for p in aside.iterdir()] == ["checkpoint_3"]  # kept, not deleted, not resumed again

    # --resume of an older checkpoint (step 6): the newer ones are moved aside, the run finishes (no "already
    # exists" crash at its first save) with the same weights, and logs each step once
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint_3", "checkpoint_4", "checkpoint_5"]
    assert verify_checkpoint(checkpoints / "checkpoint_3")["step"] == 6
    text = ok(launch(*args, "--resume", str(checkpoints / "checkpoint_3")))
    assert "the checkpoints after checkpoint_3 were moved aside to" in text
    assert weights_equal(load_file(str(out / "model" / "model.safetensors")), straight[1])
    assert train_steps(out) == list(range(1, 9))
    asides = sorted(sorted(p.name for p in a.iterdir()) for a in checkpoints.glob("superseded-*"))
    assert asides == [["checkpoint_3"], ["checkpoint_4", "checkpoint_5"]]


def test_a_stray_folder_in_checkpoints_is_ignored(base, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint_3.bak").mkdir(parents=True)  # used to crash: invalid literal for int()
    (out / "checkpoints" / "notes").mkdir()
    text = ok(launch(*base, "--max-steps", "2", "--output-dir", str(out), "--resume", "latest"))
    assert "no checkpoint under" in text and "starting from scratch" in text
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint_0", "checkpoint_1"]  # step, epoch
    assert (out / "checkpoints" / "checkpoint_3.bak").is_dir() and (out / "model" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# the non-finite guard
# ---------------------------------------------------------------------------------------------------------------------
def test_an_exploding_loss_stops_the_run_before_anything_is_saved_exported_or_pushed(base, tmp_path):
    out = tmp_path / "run"
    with HubServer(token=TOKEN) as hub:
        hub_env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf")}
        args = [*base, "--lr", "1e6", "--checkpoint-every-steps", "1", "--output-dir", str(out)]
        proc = launch(*args, "--push-to-hub", "user/diverged", extra_env=hub_env)
        line = error_line(proc)
        assert proc.returncode == 1
        assert re.fullmatch(
            r"error: training diverged at step (\d+) \(loss \S+, task_loss \S+, constraint_loss \S+\): stopped with "
            r"nothing saved, exported or pushed; the last good checkpoint is \S+checkpoint_\d+\. .*",
            line,
        ), line
        assert ("GET", "/api/whoami-v2") in [(m, p) for m, p, _ in hub.requests]  # validated before training
        assert not [p for m, p, _ in hub.requests if m == "POST"] and hub.repos == {}  # nothing pushed
    diverged_at = int(re.search(r"step (\d+)", line).group(1))
    assert not (out / "model").exists() and not list(out.glob(".model*"))  # nothing exported
    (kept, *_), _ = find_resumable(out / "checkpoints")
    assert verify_checkpoint(kept)["step"] == diverged_at - 1  # the last good one; none after it
    assert all(torch.isfinite(t).all() for t in load_file(str(kept / "model.safetensors")).values())


# ---------------------------------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------------------------------
def test_ctrl_c_writes_a_checkpoint_and_the_run_resumes(dataset, tmp_path):
    out = tmp_path / "run"
    args = [*COMMON, "--dataset", str(dataset), "--epochs", "200", "--val-split", "none", "--output-dir", str(out)]
    with open(tmp_path / "output.txt", "w") as output:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=output, stderr=output, env=env())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends
        assert proc.wait(timeout=120) == 130
    text = (tmp_path / "output.txt").read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "Ctrl-C: checkpointing after this step" in text
    stopped_at = int(re.search(r"stopped by signal at step (\d+): checkpoint", text).group(1))
    (newest, *_), skipped = find_resumable(out / "checkpoints")
    assert skipped == [] and verify_checkpoint(newest)["step"] == stopped_at
    assert not (out / "model").exists()

    resume = [*args[:-2], "--output-dir", str(out), "--resume", "latest", "--max-steps", str(stopped_at + 2)]
    assert f"step {stopped_at}" in ok(launch(*resume))
    assert train_steps(out) == list(range(1, stopped_at + 3))


_SECOND_CTRL_C = """
import os, signal, sys, time
from timm_icl.train.signals import StopSignals
signals = StopSignals().install()
signal.raise_signal(signal.SIGINT)
print("first:", signals.received, flush=True)
signal.raise_signal(signal.SIGINT)
time.sleep(5)
print("not reached", flush=True)
"""


def test_a_second_ctrl_c_aborts_at_once():
    proc = subprocess.run([sys.executable, "-c", _SECOND_CTRL_C], capture_output=True, text=True, env=env())
    assert proc.returncode == 130
    assert f"first: [{int(signal.SIGINT)}]" in proc.stdout and "not reached" not in proc.stdout
    assert "second Ctrl-C: aborted at once, no checkpoint written" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# export and push
# ---------------------------------------------------------------------------------------------------------------------
def test_an_export_torn_by_a_kill_leaves_the_previous_model_whole(base, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight[0], out)  # a finished run: model/ holds its export
    before = digest(out / "model")
    # a new run in the same folder, killed in the middle of its export (new weights and config.json written)
    proc = launch(*base, "--lr", "0.01", "--max-steps", "2", "--output-dir", str(out),
                  extra_env={"TIMM_ICL_TEST_KILL_DURING_EXPORT": "1"})  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert digest(out / "model") == before  # the previous export, whole: weights, config and card together
    model = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True)
    assert weights_equal(model.state_dict(), straight[1])
    (staged,) = out.glob(".model.tmp-*")  # the half-written new export, hidden beside it (the next one clears it)
    assert not weights_equal(load_file(str(staged / "model.safetensors")), straight[1])


@pytest.mark.parametrize(
    ("repo_id", "token", "offline", "message"),
    [
        ("user/model", "hf_wrong", "0", "not authorised to push to user/model"),
        ("user/model", TOKEN, "1", "offline mode is on"),
    ],
    ids=["bad-token", "offline"],  # repo id syntax and the other token problems: test_hub.py::test_validate_push
)
def test_push_problems_stop_the_run_before_training(base, tmp_path, repo_id, token, offline, message):
    out = tmp_path / "run"
    with HubServer(token=TOKEN, read_token="hf_readonly") as hub:
        hub_env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": offline, "HF_TOKEN": token, "HF_HOME": str(tmp_path)}
        proc = launch(*base, "--output-dir", str(out), "--push-to-hub", repo_id, extra_env=hub_env)
        assert not [p for m, p, _ in hub.requests if m == "POST"]
    line = error_line(proc)
    assert line.startswith("error: --push-to-hub: ") and message in line, line
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()  # no training started


# ---------------------------------------------------------------------------------------------------------------------
# user mistakes: one line each
# ---------------------------------------------------------------------------------------------------------------------
def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-0.1"], "error: --lr must be > 0, got -0.1"),
        (["--lr", "nan"], "error: --lr must be a finite number, got nan"),
        (["--grad-accum-steps", "0"], "error: --grad-accum-steps must be >= 1, got 0"),
        (["--alpha", "0"], "error: --alpha must be > 0, got 0.0"),
        (["--alpha", "-5"], "error: --alpha must be > 0, got -5.0"),
        (["--epochs", "0"], "error: --epochs must be >= 1, got 0"),
        (["--max-train-samples", "0"], "error: --max-train-samples must be >= 1, got 0"),
        (["--image-size", "0"], "error: --image-size must be >= 1, got 0"),
        (["-c", "{tmp}/nope.yaml"], "error: config file {tmp}/nope.yaml does not exist"),
        (["-c", "CONFIG:lr: [1, 2\n"], "error: {tmp}/config.yaml is not valid YAML at line 2, column 1: expected ','"),
        (["-c", "CONFIG:- lr\n"], "error: {tmp}/config.yaml must hold 'option: value' lines (a YAML mapping), not a"),
        (["-c", 'CONFIG:epochs: "many"\n'], "error: epochs = 'many' in {tmp}/config.yaml is not an integer"),
        (["-c", "CONFIG:lr: null\n"], "error: lr is null in {tmp}/config.yaml: give a value or drop the key"),
        (["--output-dir", "{tmp}/a-file"], "error: --output-dir {tmp}/a-file is a file; the run folder must be a"),
    ],
    ids=lambda value: None if isinstance(value, list) else value.split(",")[0][:40],
)
def test_meaningless_settings_end_with_one_line(tmp_path, argv, message):
    (tmp_path / "a-file").write_text("not a folder")
    argv = [_config(tmp_path, a[len("CONFIG:") :]) if a.startswith("CONFIG:") else a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as info:
        train_icl.parse_settings([*argv, "--dry-run"])
    assert isinstance(info.value.code, str) and "\n" not in info.value.code
    assert info.value.code.startswith(message.format(tmp=tmp_path)), info.value.code


@pytest.mark.parametrize("case", ["val-split", "init-checkpoint"])
def test_mistakes_seen_from_the_command_line_are_one_line(dataset, tmp_path, case):
    args = [*COMMON, "--dataset", str(dataset), "--output-dir", str(tmp_path / "run")]
    if case == "val-split":
        proc = launch(*args, "--val-split", "nosuchsplit")
        expected = f"error: dataset '{dataset}' has no split 'nosuchsplit'"
    else:
        (tmp_path / "weights.bin").write_bytes(b"PK\x03\x04 a pickle zip, not safetensors")
        proc = launch(*args, "--val-split", "none", "--init-checkpoint", str(tmp_path / "weights.bin"))
        expected = f"error: --init-checkpoint {tmp_path / 'weights.bin'} is not a readable safetensors file"
    assert error_line(proc).startswith(expected)


def test_eval_of_a_truncated_model_names_the_file(dataset, tmp_path):
    folder = export_model(timm.create_model("vgg_tiny", num_classes=4), tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cli = Path(sys.executable).parent / "timm-icl"
    cmd = (
        [str(cli)]
        if cli.exists()
        else [sys.executable, "-c", "import sys; from timm_icl.cli import main; sys.exit(main())"]
    )
    proc = subprocess.run([*cmd, "eval", str(folder), "--dataset", str(dataset)], capture_output=True, text=True,
                          env=env(), timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert f"{weights} is damaged or truncated" in line, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_is_not_resumed_by_one(dataset, tmp_path):
    from test_recipe import run as run_recipe

    out = tmp_path / "run"
    args = [*COMMON, "--dataset", str(dataset), "--epochs", "2", "--val-split", "none", "--output-dir", str(out)]
    run_recipe(*args, "--stop-after-steps", "1", world=2)
    line = error_line(launch(*args, "--resume", "latest"))
    assert re.fullmatch(
        r"error: --resume latest: \S+checkpoint_0 was written by 2 process\(es\) and this run has 1: resume it with 2 "
        r"\(each process's position in the data and the global batch size depend on the count\)",
        line,
    ), line


# ---------------------------------------------------------------------------------------------------------------------
# the guard itself
# ---------------------------------------------------------------------------------------------------------------------
def test_the_guard_keeps_the_first_non_finite_step_and_its_parts():
    guard = NonFiniteGuard(torch.device("cpu"), step=10)
    for parts, norm in [([1.0, 0.9, 1.1], 2.0), ([float("nan"), 0.8, float("inf")], 3.0), ([float("nan")] * 3, 1.0)]:
        guard.observe(torch.tensor(parts), torch.tensor(norm))
        guard.end_step()
    assert bool(guard.seen) and guard.step.item() == 13
    step, loss, task_loss, constraint_loss, norm = guard.first.tolist()
    assert step == 12 and task_loss == pytest.approx(0.8) and constraint_loss == float("inf") and norm == 3.0
    # what the recipe reads at boundaries
    torch.testing.assert_close(torch.tensor(guard.first_bad(accelerator=None)), guard.first, equal_nan=True)
    clean = NonFiniteGuard(torch.device("cpu"), step=0)
    assert clean.first_bad(accelerator=None) is None
    clean.observe(torch.tensor([1.0, 1.0, 0.0]), torch.tensor(float("inf")))  # an infinite gradient norm alone
    assert bool(clean.seen) and clean.first[4].item() == float("inf")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_guard_does_not_synchronise_the_device():
    guard = NonFiniteGuard(torch.device("cuda"), step=0)
    parts, norm = torch.tensor([1.0, 2.0, float("nan")], device="cuda"), torch.tensor(1.0, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
    try:
        for _ in range(3):
            guard.observe(parts)
            guard.observe(parts, norm)
            guard.end_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(guard.seen) and guard.first[0].item() == 1
