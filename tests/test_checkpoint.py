"""timm_icl.train.checkpoint: atomic saves, rotation after the rename, fallback past damaged checkpoints, set-aside on
resume of an older one, stray folders ignored, world-size refusal, recipe state loaded without running pickles."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from timm_icl.train.checkpoint import (
    MARKER,
    CheckpointError,
    WorldSizeMismatch,
    find_resumable,
    list_checkpoints,
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
    for name in ("model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "train_state_0.pt"):
        assert marker["files"][name] == (root / "checkpoint_2" / name).stat().st_size > 0
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
        (newest / "optimizer.bin").unlink()
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
        "missing": "optimizer.bin is missing",
        "garbage": "does not load",
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
    (newest / "train_state_1.pt").write_bytes((newest / "train_state_0.pt").read_bytes())
    rewrite_marker(newest, world_size=2, files={**files, "train_state_1.pt": files["train_state_0.pt"]})
    accelerator, *_ = make_run(1)
    with pytest.raises(WorldSizeMismatch, match=r"written by 2 process\(es\) and this run has 1: resume it with 2"):
        resume_checkpoint(accelerator, root, "latest")
    (newest / "train_state_1.pt").unlink()
    with pytest.raises(CheckpointError, match="train_state_1.pt is missing"):
        verify_checkpoint(newest)


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (str(_Payload.target),))


def test_the_recipe_state_loads_without_running_a_pickle(saved, tmp_path):
    root, _ = saved
    newest = root / "checkpoint_2"
    _Payload.target = tmp_path / "pwned"
    with open(newest / "train_state_0.pt", "wb") as f:
        pickle.dump({"position": _Payload()}, f, protocol=2)
    marker = json.loads((newest / MARKER).read_text())
    marker["files"]["train_state_0.pt"] = (newest / "train_state_0.pt").stat().st_size
    (newest / MARKER).write_text(json.dumps(marker))
    accelerator, *_ = make_run(1)
    resumed = resume_checkpoint(accelerator, root, "latest")
    assert not _Payload.target.exists()
    assert resumed.path == root / "checkpoint_1" and "does not load" in resumed.skipped[0]


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
