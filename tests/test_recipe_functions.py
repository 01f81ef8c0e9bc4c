"""recipes/train_icl.py as a library: imported, its settings parsed in-process, its whole job run by ``main()``."""

import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_icl  # noqa: F401  (registers vgg_tiny)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import train_icl  # noqa: E402

TINY = [
    "--model", "vgg_tiny", "--no-pretrained", "--dataset", "fashion-mnist", "--val-split", "test",
    "--allow-random-reference",
    "--max-train-samples", "48", "--max-val-samples", "16", "--batch-size", "8", "--num-workers", "0",
    "--distortions", "noise:30 blur:1", "--log-every", "2",
]  # fmt: skip


@pytest.mark.parametrize(
    ("timm_flags", "our_flags"),
    [
        (["-b", "32"], ["--batch-size", "32"]),
        (["-j", "3"], ["--num-workers", "3"]),
        (["--workers", "3"], ["--num-workers", "3"]),
        (["--initial-checkpoint", "w.safetensors"], ["--init-checkpoint", "w.safetensors"]),
        (["--output", "runs/x"], ["--output-dir", "runs/x"]),
        (["--log-interval", "7"], ["--log-every", "7"]),
        (["--checkpoint-hist", "5"], ["--keep-checkpoints", "5"]),
        (["--amp"], ["--mixed-precision", "bf16"]),
        (["--amp", "--amp-dtype", "float16"], ["--mixed-precision", "fp16"]),
    ],
)
def test_timm_flag_aliases_give_the_same_settings(timm_flags, our_flags):
    ours = vars(train_icl.parse_settings(our_flags))
    theirs = vars(train_icl.parse_settings(timm_flags))
    for key in ("amp", "amp_dtype"):  # the spelling itself is recorded; what it resolves to must match
        ours.pop(key), theirs.pop(key)
    assert theirs == ours


def test_timm_optimizer_names_are_accepted_and_unknown_ones_refused(capsys):
    for name in ("momentum", "sgd", "adamw", "lamb", "lion"):
        assert train_icl.parse_settings(["--opt", name]).opt == name
    with pytest.raises(SystemExit) as e:
        train_icl.parse_settings(["--opt", "nosuchopt"])
    assert "timm optimizer" in str(e.value)


def _tiny_task(argv):
    args = train_icl.parse_settings(argv)
    model, _, _ = train_icl.create_model(args)
    data = train_icl.create_data(args, model, rank=0, world=1)
    task = train_icl.create_task(args, model, rank=0, device=torch.device("cpu"))
    return args, data, task


def test_optimizer_has_no_weight_decay_on_biases_and_norms_and_the_schedule_warms_up():
    args, data, task = _tiny_task([*TINY, "--weight-decay", "0.01", "--sched", "cosine", "--lr", "0.1"]
                                   + ["--warmup-steps", "2", "--warmup-lr", "0.01", "--epochs", "2"])  # fmt: skip
    opt = train_icl.create_optimization(args, task, data, world=1)
    decays = {id(p): g["weight_decay"] for g in opt.optimizer.param_groups for p in g["params"]}
    for name, p in task.get_eval_model().named_parameters():
        expected = 0.0 if p.ndim <= 1 else 0.01  # biases and norm weights are 1-d
        assert decays[id(p)] == expected, name
    assert opt.steps_per_epoch == 6 and opt.total_steps == 12  # 48 samples / batch 8, 2 epochs
    lrs = []
    for step in range(13):
        opt.scheduler.step_update(step)
        lrs.append(opt.optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.01 + (0.1 - 0.01) / 2)  # linear warmup
    assert lrs[2] == pytest.approx(0.1 * 0.5 * (1 + torch.cos(torch.tensor(2 / 12 * torch.pi)).item()))
    assert lrs[12] == pytest.approx(0.0, abs=1e-12)  # cosine to min_lr 0 at the last step


def test_label_smoothing_and_dropout_reach_the_model_and_the_loss():
    args, _, task = _tiny_task([*TINY, "--smoothing", "0.1", "--drop", "0.5"])
    assert task.criterion.label_smoothing == pytest.approx(0.1)
    assert task.get_eval_model().drop_rate == pytest.approx(0.5)


def test_main_runs_the_whole_job_in_process_with_ema(tmp_path):
    out = tmp_path / "run"
    assert train_icl.main([*TINY, "--epochs", "2", "--model-ema", "--model-ema-decay", "0.5", "--lr", "0.05",
                           "--output-dir", str(out)]) == 0  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12] and len(val) == 2
    assert "val_ema/clean" in val[-1] and 0 <= val[-1]["val_ema/clean"] <= 1
    # the EMA is its own set of weights, exported beside the raw model, and it loads with timm
    raw = load_file(str(out / "model" / "model.safetensors"))
    ema = load_file(str(out / "model-ema" / "model.safetensors"))
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    model = timm.create_model(f"local-dir:{out / 'model-ema'}", pretrained=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, ema[name])
    ema_eval = json.loads((out / "eval_ema.json").read_text())
    assert ema_eval["summary"]["clean"] == val[-1]["val_ema/clean"]


def test_init_checkpoint_with_another_head_says_what_to_do(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("vgg_tiny", num_classes=7)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    args = train_icl.parse_settings(["--model", "vgg_tiny", "--init-checkpoint", str(weights), "--num-classes", "4"])
    model, _, _ = train_icl.create_model(args)  # a fresh 4-class head, the rest from the checkpoint
    assert model.num_classes == 4
    for name, value in source.state_dict().items():
        if not name.startswith("head.fc."):
            torch.testing.assert_close(model.state_dict()[name], value)

    args = train_icl.parse_settings(["--model", "vgg_tiny", "--init-checkpoint", str(weights)])
    with pytest.raises(SystemExit) as e:  # vgg_tiny's default 10 classes vs the checkpoint's 7
        train_icl.create_model(args)
    assert "head.fc" in str(e.value) and "checkpoint [7] vs model [10]" in str(e.value)
    assert "pass --num-classes" in str(e.value)

    args = train_icl.parse_settings(["--model", "vgg_tiny", "--init-checkpoint", str(weights), "--num-classes", "7"])
    model, _, _ = train_icl.create_model(args)
    train_icl.fit_head(args, model, 4, print)  # a dataset of 4 classes: --num-classes 7 is respected
    assert model.num_classes == 7
    args = train_icl.parse_settings(["--model", "vgg_tiny", "--init-checkpoint", str(weights), "--num-classes", "3"])
    with pytest.raises(SystemExit) as e:  # fewer outputs than the dataset's classes
        train_icl.fit_head(args, model, 4, print)
    assert "--num-classes 3 but the dataset has 4 classes" in str(e.value)

    args = train_icl.parse_settings(["--model", "test_resnet", "--init-checkpoint", str(weights)])
    with pytest.raises(SystemExit) as e:
        train_icl.create_model(args)
    message = str(e.value)
    assert "does not fit the model" in message and "missing key(s)" in message and "\n" not in message

    (tmp_path / "w.pt").write_bytes(b"not safetensors")
    args = train_icl.parse_settings(["--model", "vgg_tiny", "--init-checkpoint", str(tmp_path / "w.pt")])
    with pytest.raises(SystemExit) as e:
        train_icl.create_model(args)
    assert "not a readable safetensors file" in str(e.value)


def test_labels_outside_the_head_are_refused_with_one_line():
    from timm_icl.data import check_labels

    check_labels(torch.tensor([0, 3, 9]), 10)  # fine
    check_labels(torch.tensor([], dtype=torch.long), 10)
    with pytest.raises(ValueError) as e:
        check_labels(torch.tensor([0, 12]), 10)
    assert "label 12" in str(e.value) and "--num-classes 13" in str(e.value)
    with pytest.raises(ValueError) as e:
        check_labels(torch.tensor([-1, 2]), 10)
    assert "unlabelled split" in str(e.value)


def test_task_state_round_trips_the_sampler():
    from timm_icl import ICLTask

    task = ICLTask(timm.create_model("vgg_tiny"), constraint="none", distortions="noise:30 blur:1", seed=3)
    task.sampler.sample(5)
    state = task.get_task_state()
    expected = task.sampler.sample(7)
    other = ICLTask(timm.create_model("vgg_tiny"), constraint="none", distortions="noise:30 blur:1", seed=99)
    other.load_task_state(state)
    for a, b in zip(other.sampler.sample(7), expected):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        other.load_task_state(None)
