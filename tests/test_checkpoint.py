"""timm_icl.train.checkpoint: atomic saves, rotation after the rename, fallback past damaged checkpoints, set-aside on
resume of an older one, stray folders ignored, world-size refusal, recipe state loaded without running pickles."""

import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

import timm_icl.train.checkpoint as checkpoint_module
from timm_icl.train.checkpoint import (
    MARKER,
    CheckpointError,
    DiskFull,
    WorldSizeMismatch,
    checkpoint_index,
    find_resumable,
    list_checkpoints,
    newest_verified,
    resume_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def make_run(seed: int):
    """A prepared Linear(4, 3) + SGD with momentum + a registered LR scheduler, weights from ``seed``."""
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    accelerator.register_for_checkpointing(scheduler)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> None:
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def rewrite_marker(path: Path, **changes) -> None:
    marker = json.loads((path / MARKER).read_text())
    marker.update(changes)
    (path / MARKER).write_text(json.dumps(marker))


@pytest.fixture()
def saved(tmp_path):
    """Three checkpoints (steps 1, 2, 3) of one run, kept all; the weights after each."""
    accelerator, model, optimizer, scheduler = make_run(0)
    root = tmp_path / "checkpoints"
    after = []
    for step in (1, 2, 3):
        train_step(model, optimizer, scheduler)
        save_checkpoint(accelerator, root, {"position": {"step": step}}, step=step, keep=5)
        after.append(weights(model))
    return root, after


def test_save_writes_a_complete_checkpoint_that_resumes_exactly(saved):
    root, after = saved
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
    marker = verify_checkpoint(root / "checkpoint_2", world_size=1)
    assert marker["step"] == 3 and marker["world_size"] == 1 and marker["index"] == 2
    for name in ("model.safetensors", "optimizer.pt", "custom_0.pt", "rng_state_0.pt", "train_state_0.pt"):
        size, digest = marker["files"][name]
        assert size == (root / "checkpoint_2" / name).stat().st_size > 0
        assert digest == hashlib.sha256((root / "checkpoint_2" / name).read_bytes()).hexdigest()
    assert not [p for p in (root / "checkpoint_2").iterdir() if p.suffix in (".pkl", ".bin")]  # no pickles
    assert not list(root.glob(".tmp-*"))

    accelerator, model, optimizer, scheduler = make_run(1)  # other weights: the resume must overwrite them
    resumed = resume_checkpoint(accelerator, root, "latest")
    assert resumed.path == root / "checkpoint_2" and resumed.skipped == [] and resumed.set_aside is None
    assert resumed.state == {"position": {"step": 3}}
    for name, value in after[2].items():
        assert torch.equal(model.state_dict()[name], value)
    assert scheduler.last_epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_rotation_keeps_the_newest_n_after_the_new_one_is_in_place(tmp_path):
    accelerator, model, optimizer, scheduler = make_run(0)
    root = tmp_path / "checkpoints"
    for step in range(1, 5):
        save_checkpoint(accelerator, root, {"step": step}, step=step, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint_2", "checkpoint_3"]


_KILLED_SAVE = """
import sys, torch
from accelerate import Accelerator
from timm_icl.train.checkpoint import save_checkpoint
accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(4, 3)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
accelerator.register_for_checkpointing(torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5))
model, optimizer = accelerator.prepare(model, optimizer)
for step in (1, 2):  # the second save is killed (SIGKILL) after accelerate wrote its files
    save_checkpoint(accelerator, sys.argv[1], {"step": step}, step=step, keep=1)
"""


def test_a_kill_during_a_save_with_keep_1_leaves_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    env = dict(os.environ, OMP_NUM_THREADS="1", TIMM_ICL_TEST_KILL_DURING_SAVE="2")
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(root)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint_0"]  # rotation did not run first
    assert verify_checkpoint(root / "checkpoint_0")["step"] == 1
    (tmp,) = root.glob(".tmp-checkpoint_*")
    assert (tmp / "model.safetensors").exists() and not (tmp / MARKER).exists()

    accelerator, model, optimizer, scheduler = make_run(0)
    assert resume_checkpoint(accelerator, root).state == {"step": 1}
    save_checkpoint(accelerator, root, {"step": 2}, step=2, keep=1)  # the torn folder is cleared, then rotated
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_1"]


@pytest.mark.parametrize("damage", ["truncated", "missing", "garbage", "no-marker"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(saved, damage):
    root, after = saved
    newest = root / "checkpoint_2"
    if damage == "truncated":  # a kill half-way through writing: the size no longer matches the marker
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing":
        (newest / "optimizer.pt").unlink()
    elif damage == "garbage":  # same size, unreadable content: found only by loading it
        size = (newest / "model.safetensors").stat().st_size
        (newest / "model.safetensors").write_bytes(b"\xff" * size)
    else:
        (newest / MARKER).unlink()
    accelerator, model, optimizer, scheduler = make_run(1)
    resumed = resume_checkpoint(accelerator, root, "latest")
    assert resumed.path == root / "checkpoint_1" and resumed.state == {"position": {"step": 2}}
    assert len(resumed.skipped) == 1 and "checkpoint_2" in resumed.skipped[0]
    expected = {
        "truncated": "model.safetensors has",
        "missing": "optimizer.pt is missing",
        "garbage": "model.safetensors: its content does not match the SHA-256 in COMPLETE",
        "no-marker": "no COMPLETE marker",
    }[damage]
    assert expected in resumed.skipped[0]
    for name, value in after[1].items():
        assert torch.equal(model.state_dict()[name], value)
    # the damaged one is moved aside (not deleted, not resumed again); the next save is number 2 again
    (aside,) = root.glob("superseded-*")
    assert (aside / "checkpoint_2").is_dir()
    path = save_checkpoint(accelerator, root, {"position": {"step": 3}}, step=3, keep=5)
    assert path.name == "checkpoint_2"


def test_resume_of_an_older_checkpoint_sets_the_newer_ones_aside(saved):
    root, after = saved
    accelerator, model, optimizer, scheduler = make_run(1)
    resumed = resume_checkpoint(accelerator, root, root / "checkpoint_0")
    assert resumed.state == {"position": {"step": 1}}
    assert sorted(p.name for p in resumed.set_aside.iterdir()) == ["checkpoint_1", "checkpoint_2"]
    assert resumed.set_aside.parent == root and resumed.set_aside.name.startswith("superseded-")
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint_0"]
    path = save_checkpoint(accelerator, root, {"position": {"step": 2}}, step=2, keep=5)  # no "already exists"
    assert path.name == "checkpoint_1"


def test_stray_folders_are_ignored(saved):
    root, _ = saved
    (root / "checkpoint_3.bak").mkdir()
    (root / "notes").mkdir()
    (root / "checkpoint_9").write_text("a file, not a folder")
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint_0", "checkpoint_1", "checkpoint_2"]
    accelerator, *_ = make_run(1)
    assert resume_checkpoint(accelerator, root).path == root / "checkpoint_2"
    assert (root / "checkpoint_3.bak").is_dir() and (root / "notes").is_dir()


def test_a_checkpoint_of_another_world_size_is_refused(saved):
    root, _ = saved
    newest = root / "checkpoint_2"
    files = json.loads((newest / MARKER).read_text())["files"]
    for name in ("train_state", "rng_state"):
        (newest / f"{name}_1.pt").write_bytes((newest / f"{name}_0.pt").read_bytes())
        files[f"{name}_1.pt"] = files[f"{name}_0.pt"]
    rewrite_marker(newest, world_size=2, files=files)
    accelerator, *_ = make_run(1)
    with pytest.raises(WorldSizeMismatch, match=r"written by 2 process\(es\) and this run has 1: resume it with 2"):
        resume_checkpoint(accelerator, root, "latest")
    (newest / "train_state_1.pt").unlink()
    with pytest.raises(CheckpointError, match="train_state_1.pt is missing"):
        verify_checkpoint(newest)


class _Payload:
    """Unpickling this runs ``os.mkdir(target)``: proof that a file executed code."""

    target = None

    def __reduce__(self):
        return (os.mkdir, (str(_Payload.target),))


def plant(path: Path, name: str, data: bytes) -> None:
    """Write ``data`` as ``path/name`` and list it in the marker with its true size and SHA-256 (what an attacker who
    edits the folder can do)."""
    (path / name).write_bytes(data)
    marker = json.loads((path / MARKER).read_text())
    marker["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("name", ["train_state_0.pt", "rng_state_0.pt", "optimizer.pt", "custom_0.pt"])
def test_a_planted_pickle_in_a_loaded_file_does_not_run(saved, tmp_path, name):
    root, after = saved
    newest = root / "checkpoint_2"
    _Payload.target = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"state": _Payload()}, buffer)  # a torch zip whose pickle calls os.mkdir when loaded
    plant(newest, name, buffer.getvalue())
    accelerator, model, *_ = make_run(1)
    resumed = resume_checkpoint(accelerator, root, "latest")
    assert not _Payload.target.exists()
    assert resumed.path == root / "checkpoint_1" and f"{newest}: does not load (" in resumed.skipped[0]
    assert "\n" not in resumed.skipped[0]
    for key, value in after[1].items():
        assert torch.equal(model.state_dict()[key], value)


def test_accelerates_custom_checkpoint_pickle_is_never_opened(saved, tmp_path):
    root, after = saved
    newest = root / "checkpoint_2"
    _Payload.target = tmp_path / "pwned"
    plant(newest, "custom_checkpoint_0.pkl", pickle.dumps(_Payload(), protocol=2))  # accelerate loads this file
    plant(newest, "random_states_0.pkl", pickle.dumps(_Payload(), protocol=2))
    accelerator, model, *_ = make_run(1)
    resumed = resume_checkpoint(accelerator, root, "latest")
    assert resumed.path == newest and resumed.skipped == [] and not _Payload.target.exists()
    for key, value in after[2].items():
        assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize("damage", ["rng-garbage", "weights-flipped"])
def test_same_size_damage_is_found_by_the_hash(saved, damage):
    root, after = saved
    newest = root / "checkpoint_2"
    if damage == "rng-garbage":  # random bytes of the same size: accelerate logged this at info level and went on
        name = "rng_state_0.pt"
        (newest / name).write_bytes(os.urandom((newest / name).stat().st_size))
    else:  # 4 bytes flipped inside the tensor data: still a valid safetensors file that loads
        name = "model.safetensors"
        data = bytearray((newest / name).read_bytes())
        for i in range(len(data) - 4, len(data)):
            data[i] ^= 0xFF
        (newest / name).write_bytes(bytes(data))
        from safetensors.torch import load

        load(bytes(data))  # loads without complaint: only the hash can tell
    verify_checkpoint(newest)  # sizes and marker: fine
    with pytest.raises(CheckpointError, match=f"{name}: its content does not match the SHA-256"):
        verify_checkpoint(newest, content=True)
    assert newest_verified(root) == root / "checkpoint_1"
    accelerator, model, *_ = make_run(1)
    resumed = resume_checkpoint(accelerator, root, "latest")
    assert resumed.path == root / "checkpoint_1"
    expected = f"skipped {newest}: damaged ({name}: its content does not match the SHA-256 in COMPLETE)"
    assert resumed.skipped == [expected]
    for key, value in after[1].items():
        assert torch.equal(model.state_dict()[key], value)


def test_every_rng_is_restored(tmp_path):
    accelerator, model, optimizer, scheduler = make_run(0)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    save_checkpoint(accelerator, tmp_path, {}, step=1)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    accelerator, *_ = make_run(1)
    resume_checkpoint(accelerator, tmp_path, "latest")
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_tied_weights_are_stored_once_and_restored_tied(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.Linear(3, 3)
            self.b.weight = self.a.weight

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(Tied())
    save_checkpoint(accelerator, tmp_path, {}, step=1)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator2 = Accelerator(cpu=True)
    model2 = accelerator2.prepare(Tied())
    resume_checkpoint(accelerator2, tmp_path, "latest")
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in reference.items())
    assert model2.b.weight is model2.a.weight


def test_an_old_pickle_format_checkpoint_is_refused_in_one_line(saved):
    root, _ = saved
    rewrite_marker(root / "checkpoint_2", format=1, files={"random_states_0.pkl": 10})
    accelerator, *_ = make_run(1)
    resumed = resume_checkpoint(accelerator, root, "latest")
    assert resumed.path == root / "checkpoint_1"
    assert "written in checkpoint format 1 by an older timm-icl" in resumed.skipped[0]


def test_only_checkpoint_folders_named_as_written_are_read(saved):
    root, _ = saved
    os.replace(root / "checkpoint_2", root / "checkpoint_007")
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint_0", "checkpoint_1"]
    assert checkpoint_index("checkpoint_7") == 7 and checkpoint_index("checkpoint_07") is None
    assert checkpoint_index("checkpoint_0") == 0 and checkpoint_index("checkpoint_+1") is None


def test_a_checkpoint_that_reads_back_wrong_is_not_used_and_nothing_is_rotated(tmp_path, monkeypatch):
    accelerator, model, optimizer, scheduler = make_run(0)
    save_checkpoint(accelerator, tmp_path, {"step": 1}, step=1, keep=1)
    real = checkpoint_module.sha256_file
    monkeypatch.setattr(
        checkpoint_module, "sha256_file", lambda p, from_disk=False: "0" * 64 if p.name == "optimizer.pt" else real(p)
    )
    with pytest.raises(CheckpointError, match=r"checkpoint_1: optimizer.pt read back from the disk differs"):
        save_checkpoint(accelerator, tmp_path, {"step": 2}, step=2, keep=1)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_0"]
    assert verify_checkpoint(tmp_path / "checkpoint_0", content=True)["step"] == 1


def test_a_full_disk_says_so_in_one_line_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    accelerator, model, optimizer, scheduler = make_run(0)
    save_checkpoint(accelerator, tmp_path, {"step": 1}, step=1, keep=1)
    real = checkpoint_module._write_bytes

    def full(path, data):
        if path.name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(checkpoint_module, "_write_bytes", full)
    train_step(model, optimizer, scheduler)
    with pytest.raises(DiskFull) as info:
        save_checkpoint(accelerator, tmp_path, {"step": 2}, step=2, keep=1)
    message = str(info.value)
    assert re.fullmatch(
        rf"no space left on the device of {re.escape(str(tmp_path))} while writing checkpoint_1: "
        r"\d+ bytes \(.*\) needed, "
        r"\d+ bytes \(.*\) free; free some space and rerun \(a run resumes with --resume latest\)",
        message,
    ), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_0"]  # no .tmp-* left, the previous intact
    verify_checkpoint(tmp_path / "checkpoint_0", content=True)
    monkeypatch.setattr(checkpoint_module, "_write_bytes", real)  # space freed: the same save goes through
    save_checkpoint(accelerator, tmp_path, {"step": 2}, step=2, keep=1)
    accelerator, *_ = make_run(1)
    assert resume_checkpoint(accelerator, tmp_path, "latest").state == {"step": 2}


def test_nothing_to_resume_and_nothing_that_loads(tmp_path, saved):
    accelerator, *_ = make_run(1)
    assert resume_checkpoint(accelerator, tmp_path / "empty", "latest") is None
    assert find_resumable(tmp_path / "empty") == ([], [])
    root, _ = saved
    for path in list_checkpoints(root):
        (path / MARKER).unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint under .* can be resumed: .*checkpoint_2: incomplete"):
        resume_checkpoint(accelerator, root, "latest")
    with pytest.raises(CheckpointError, match="checkpoint_0: incomplete"):
        resume_checkpoint(accelerator, root, root / "checkpoint_0")
