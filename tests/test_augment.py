"""timm's augmentation flags in the recipe: the crop-time ones through timm's own create_transform, random erasing
and Mixup/CutMix on the device before distortion (the reference sees the same mixed clean image), --jsd-loss as the
JSD constraint, and the refusals."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_cards import make_image_folder

import timm_icl
from timm_icl.data.augment import BatchAugment, transform_options
from timm_icl.data.preprocess import ImageTransform, resolve_preprocessing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import train_icl  # noqa: E402


def test_train_options_are_timms_create_transform():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    config = resolve_preprocessing(None, image_size=32, crop_pct=1.0, interpolation="bilinear")
    options = {"auto_augment": "rand-m9-mstd0.5", "hflip": 1.0, "scale": (0.5, 1.0), "ratio": (0.9, 1.1),
               "color_jitter": 0.3}  # fmt: skip
    ours = ImageTransform(config, training="timm", options=options)
    theirs = timm.data.create_transform(input_size=(3, 32, 32), is_training=True, interpolation="bilinear",
                                        crop_pct=1.0, normalize=False, **options)  # fmt: skip
    for seed in range(3):
        for rng in (torch.manual_seed, random.seed, np.random.seed):  # timm draws from all three
            rng(seed)
        a = ours(image)
        for rng in (torch.manual_seed, random.seed, np.random.seed):
            rng(seed)
        assert torch.equal(a, theirs(image)) and a.dtype == torch.uint8
    with pytest.raises(ValueError, match="need training='timm'"):
        ImageTransform(config, options={"hflip": 1.0})


def test_flags_resolve():
    args = train_icl.parse_settings(["--aa", "rand-m9", "--hflip", "0.2", "--scale", "0.5", "1"])
    assert args.train_transform == "timm" and transform_options(args)["scale"] == (0.5, 1.0)
    assert train_icl.parse_settings(["--jsd-loss", "--aug-splits", "3"]).constraint == "jsd"
    with pytest.raises(SystemExit, match="add --jsd-loss"):
        train_icl.parse_settings(["--aug-splits", "3"])
    with pytest.raises(SystemExit, match="uses 3 views"):
        train_icl.parse_settings(["--jsd-loss", "--aug-splits", "2"])
    for flag in (["--mixup", "0.8"], ["--reprob", "0.25"], ["--aa", "rand-m9"]):
        with pytest.raises(SystemExit, match="the training crops are random"):
            train_icl.parse_settings([*flag, "--reference-targets", "cache"])


def test_mixup_batch_is_what_the_student_and_reference_see():
    args = train_icl.parse_settings(["--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--reprob", "0.5"])
    augment = BatchAugment.from_args(args, 4, torch.device("cpu"))
    assert BatchAugment.from_args(train_icl.parse_settings([]), 4, torch.device("cpu")) is None
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.manual_seed(0)
    np.random.seed(0)
    mixed, soft = augment(images, labels)
    assert mixed.dtype == torch.float32 and 0 <= float(mixed.min()) and float(mixed.max()) <= 1
    assert soft.shape == (6, 4) and torch.allclose(soft.sum(1), torch.ones(6))
    assert float(soft.max()) < 1.0  # smoothed by timm's Mixup (label_smoothing 0.1)
    # the task takes the mixed clean batch and soft targets: the reference's input is this very batch
    model = timm.create_model("vgg_tiny", num_classes=4)
    task = timm_icl.ICLTask(model, distortions="noise:30", clean_fraction=1.0, criterion=torch.nn.CrossEntropyLoss())
    seen = {}
    task.reference.features[0].register_forward_hook(lambda m, i, o: seen.update(reference=i[0].detach().clone()))
    out = task(mixed, soft)
    expected = torch.nn.functional.cross_entropy(model(task.normalize(mixed)), soft)
    assert torch.allclose(out["task_loss"], expected, atol=1e-5)
    assert torch.allclose(seen["reference"], task.normalize(mixed))


def test_recipe_trains_with_timm_augmentations(tmp_path):
    data = make_image_folder(tmp_path / "pets")
    argv = ["--model", "vgg_tiny", "--no-pretrained", "--constraint", "none", str(data), "--val-split", "none",
            "-b", "6", "-j", "0", "--img-size", "24", "--epochs", "1", "--aa", "rand-m9-mstd0.5", "--hflip", "0.5",
            "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0", "--smoothing", "0.1", "--log-every", "1",
            "--output-dir", str(tmp_path / "run")]  # fmt: skip
    assert train_icl.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["kind"] == "train"]) == 3 and all(np.isfinite(r["loss"]) for r in records)


def test_multistep_schedule_and_ema_warmup(tmp_path):
    data = make_image_folder(tmp_path / "pets")  # 18 images, -b 6: 3 steps per epoch
    argv = ["--model", "vgg_tiny", "--no-pretrained", "--constraint", "none", str(data), "--val-split", "none",
            "-b", "6", "-j", "0", "--img-size", "24", "--epochs", "3", "--lr", "0.1", "--sched", "multistep",
            "--decay-milestones", "1", "2", "--decay-rate", "0.5", "--log-every", "1",
            "--output-dir", str(tmp_path / "r")]  # fmt: skip
    assert train_icl.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert lrs == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3)

    args = train_icl.parse_settings(["--model-ema", "--model-ema-warmup", "--constraint", "none"])
    model = timm.create_model("vgg_tiny")
    task = train_icl.create_task(args, model, 0, torch.device("cpu"))
    ema = task.get_trainable_module(ema=True)
    model = task.get_trainable_module()  # the student the EMA follows
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    task.update_ema(step=3)
    decay = min(0.9998, 1 - (1 + 2) ** (-2 / 3))  # timm's warmup: step 3 counts as 2 (ModelEmaV3, no update_after)
    name = "head.fc.weight"
    expected = decay * before[name] + (1 - decay) * model.state_dict()[name]
    torch.testing.assert_close(ema.module.state_dict()[name], expected)
