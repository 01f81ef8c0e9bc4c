"""Fine-tune a timm classifier with the Intermediate Constraint Loss (ICL), one process or many, with accelerate.

    # one process (CPU or one GPU)
    python recipes/train_icl.py --config recipes/configs/vgg16_imagenet_icl.yaml
    # 8 GPUs
    accelerate launch --multi_gpu --num_processes 8 recipes/train_icl.py -c recipes/configs/vgg16_imagenet_icl.yaml
    # two CPU processes (gloo; `--cpu --num_processes 2` would start only one)
    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no recipes/train_icl.py --config recipes/configs/fashion_mnist_vgg_tiny_icl.yaml

A YAML config (flat keys = the long option names with ``_``) sets the defaults; command-line flags override it.
The run folder (``--output-dir``) holds config.yaml (the resolved settings), metrics.jsonl, checkpoints/ (accelerate
``save_state``, rotated), eval.json (the last validation) and model/ (the final model as a timm folder:
``timm.create_model("local-dir:RUN/model", pretrained=True)``).

Read top to bottom: settings, accelerator, model, data, task, optimizer + schedule, run folder + resume, the loop,
export, and ``main()`` which calls them in that order. Every step is a function, importable by tests and by
``reproduce_table1.py`` (``from train_icl import main``; ``main(["--model", ...])`` runs the whole job).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.optim
import timm.scheduler
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

import timm_icl
from timm_icl import ICLTask, evaluate_robustness, parse_distortions
from timm_icl.data import check_dataset_access, check_labels, create_loader
from timm_icl.data.augment import BatchAugment, resolve_augmentation, transform_options
from timm_icl.data.flags import add_data_args, image_size_of, resolve_data_args
from timm_icl.data.stream import StreamBatch
from timm_icl.distortions.plugins import load_distortion_plugins
from timm_icl.loading import create_model as create_timm_model
from timm_icl.loading import load_init_weights, weights_origin
from timm_icl.train import checkpoint
from timm_icl.train.batch import plan_batch
from timm_icl.train.cache_build import build_target_cache, cache_preprocessing, verify_target_cache
from timm_icl.train.config import (
    SettingsError,
    check_dataset_path,
    check_model_settings,
    check_settings,
    exit_once,
    or_exit_once,
    parse_with_config,
)
from timm_icl.train.distributed import any_rank, lockstep
from timm_icl.train.guard import NonFiniteGuard
from timm_icl.train.run_files import ExitCode, disk_full_is_one_line, keep_metrics
from timm_icl.train.signals import StopSignals
from timm_icl.train.tracking import flat_config, parse_trackers, tracker_init_kwargs
from timm_icl.utils.errors import first_line
from timm_icl.utils.launch import cpu_launch_mismatch


# ---------------------------------------------------------------------------------------------------------------------
# settings: a YAML config gives the defaults, flags override (timm's train.py two-stage parse)
# ---------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The recipe's options; the long names (with ``_``) are also the YAML config keys."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("-c", "--config", default=None, help="YAML file of defaults (flat keys = option names)")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=None,
        metavar="MODULE",
        help="import MODULE (or a .py file) first: its register_distortion calls make your kinds usable in "
        "--distortions (installed packages: the 'timm_icl.distortions' entry-point group, no flag needed)",
    )
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="vgg16", help="timm model name (ignored with a local-dir --init-checkpoint)")
    group.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True, help="timm weights")
    group.add_argument(
        "--init-checkpoint",
        "--initial-checkpoint",
        default=None,
        help="start from local weights: timm folder / .safetensors",
    )
    group.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the dataset's)")
    group.add_argument("--drop", type=float, default=None, help="dropout rate (timm's drop_rate; vgg16: fc6/fc7)")
    group.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (timm's drop_path_rate)")
    group = add_data_args(parser, training=True)  # shared with timm-icl eval (timm_icl.data.flags)
    group.add_argument(
        "--train-transform",
        default="eval",
        choices=("eval", "timm"),
        help="training crops: 'eval' (the validation crop, deterministic; the paper's) or 'timm' (timm's random "
        "resized crop + flip + colour jitter); the reference always sees the student's clean crop",
    )
    group = parser.add_argument_group(
        "augmentation (timm's flags; the frozen reference sees the same augmented, mixed clean image as the student, "
        "before distortion)"
    )
    group.add_argument("--aa", default=None, help="timm's AutoAugment policy, e.g. rand-m9-mstd0.5, augmix-m5-w4")
    group.add_argument("--hflip", type=float, default=None, help="horizontal flip probability (timm: 0.5)")
    group.add_argument("--vflip", type=float, default=None, help="vertical flip probability (timm: 0)")
    group.add_argument("--scale", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="random crop area")
    group.add_argument("--ratio", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="crop aspect ratio")
    group.add_argument("--color-jitter", type=float, default=None, help="colour jitter strength (timm: 0.4)")
    group.add_argument("--reprob", type=float, default=0.0, help="random erasing probability (on the device)")
    group.add_argument("--remode", default="pixel", help="random erasing mode: const, rand, pixel")
    group.add_argument("--recount", type=int, default=1, help="random erasing count")
    group.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha (timm's Mixup, on the device)")
    group.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha")
    group.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    group.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
    group.add_argument("--mixup-switch-prob", type=float, default=0.5, help="CutMix instead of Mixup, when both")
    group.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))
    group.add_argument(
        "--jsd-loss",
        action="store_true",
        help="timm's AugMix + JSD recipe: the same as --constraint jsd (three views, no reference)",
    )
    group.add_argument(
        "--aug-splits", type=int, default=0, help="timm's augmentation splits: 3 with --jsd-loss (0: none)"
    )
    group = parser.add_argument_group("data subsets")
    group.add_argument("--max-train-samples", type=int, default=None, help="use only the first N training samples")
    group.add_argument("--train-samples-per-epoch", type=int, default=None, help="a random subset of N per epoch")
    group.add_argument("--max-val-samples", type=int, default=None, help="validate on the first N samples")
    group = parser.add_argument_group("method")
    group.add_argument("--constraint", default="icl", choices=sorted(timm_icl.CONSTRAINTS), help="'none': plain")
    group.add_argument("--constraint-weight", type=float, default=None, help="lambda (default per constraint)")
    group.add_argument("--jsd-weight", type=float, default=12.0, help="the JSD weight of --constraint icl+jsd")
    group.add_argument("--alpha", type=float, default=100.0, help="ICL's sharpness alpha")
    group.add_argument("--margin", type=float, default=1.0, help="activation-boundary margin")
    group.add_argument("--layers", default=None, help="comma-separated layers (default: the model's preset)")
    group.add_argument(
        "--allow-random-reference",
        action="store_true",
        help="let icl/mse/ab constrain toward a frozen *random* network (--no-pretrained, no --init-checkpoint): an "
        "experiment, not the method, which needs a trained reference; refused without this flag",
    )
    group.add_argument("--clean-fraction", type=float, default=0.0, help="share of training images left clean")
    group.add_argument(
        "--reference-targets",
        default="live",
        help="'live' (the frozen reference runs each step), 'cache' (RUN/targets.safetensors: one pass of the "
        "reference writes 1 bit per unit and image, then training runs without it) or a cache file path",
    )
    group.add_argument("--val-distortions", default=None, help="validation conditions (default: --distortions)")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=40)
    group.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="images per optimizer step over all processes (the paper: 64, the default when neither this nor "
        "--batch-size is given); the per-process batch and accumulation follow from the process count",
    )
    group.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=None,
        help="per process, per micro-batch; with --global-batch-size: the largest micro-batch (more: accumulation)",
    )
    group.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    group.add_argument(
        "--opt",
        default="momentum",
        help="any timm optimizer (timm.optim.list_optimizers()): 'momentum' = SGD with "
        "momentum, 'sgd' = SGD with Nesterov momentum, 'adamw', 'lamb', ...",
    )
    group.add_argument("--lr", type=float, default=0.001)
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, default=0.0, help="not applied to biases and norm layers")
    group.add_argument(
        "--sched",
        default="constant",
        choices=["constant", "cosine", "step", "multistep", "tanh", "poly", "wsd"],
        help="timm schedule, stepped per optimizer step (timm's 'plateau' steps on a validation metric per epoch, "
        "which per-step stepping and streams of unknown length do not have: not offered)",
    )
    group.add_argument("--warmup-epochs", type=float, default=0, help="linear warmup from --warmup-lr (epochs)")
    group.add_argument("--warmup-steps", type=int, default=0, help="the same in optimizer steps (added to the above)")
    group.add_argument("--warmup-lr", type=float, default=0.0, help="learning rate at the start of warmup")
    group.add_argument("--min-lr", type=float, default=0.0, help="cosine / poly / tanh: the final learning rate")
    group.add_argument("--decay-epochs", type=float, default=10, help="step schedule: epochs between decays")
    group.add_argument("--decay-rate", type=float, default=0.1, help="step / multistep: factor per decay")
    group.add_argument(
        "--decay-milestones",
        type=float,
        nargs="+",
        default=[30, 60],
        metavar="EPOCH",
        help="multistep: after each of these many epochs the learning rate is multiplied by --decay-rate",
    )
    group.add_argument("--smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy")
    group.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    group.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (validated, exported)")
    group.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay per optimizer step")
    group.add_argument(
        "--model-ema-warmup",
        action="store_true",
        help="timm's EMA warmup: decay min(--model-ema-decay, 1 - (1 + t)^(-2/3)), t = steps - 1, so a short "
        "run's EMA follows the weights instead of staying at the start",
    )
    group.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in all")
    group = parser.add_argument_group("hardware")
    group.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate's")
    group.add_argument("--amp", action="store_true", help="timm's flag: mixed precision in --amp-dtype")
    group.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    group.add_argument("--compile", action="store_true", help="torch.compile the student")
    group.add_argument("--channels-last", action="store_true")
    group.add_argument("--seed", type=int, default=0)
    group = parser.add_argument_group("run folder, logging, checkpoints")
    group.add_argument("--output-dir", "--output", default="runs/icl", help="the run folder")
    group.add_argument(
        "--log-every", "--log-interval", type=int, default=10, help="optimizer steps between metric lines"
    )
    group.add_argument(
        "--log-with",
        default=None,
        help="trackers, comma-separated: 'tensorboard' (RUN/logs), 'wandb' (RUN/wandb; WANDB_MODE=offline keeps it "
        "local), ... (accelerate's); a tracker that is not installed is an error",
    )
    group.add_argument("--log-wandb", action="store_true", help="timm's flag: the same as --log-with wandb")
    group.add_argument("--checkpoint-every-steps", type=int, default=0, help="0: only per epoch")
    group.add_argument("--checkpoint-every-epochs", type=int, default=1, help="0: never per epoch")
    group.add_argument("--keep-checkpoints", "--checkpoint-hist", type=int, default=3, help="rotation: newest N kept")
    group.add_argument("--resume", default=None, help="'latest' (of --output-dir) or a checkpoint folder")
    group.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the exported model")
    group.add_argument(
        "--license",
        default=None,
        help="licence id of the exported weights for the model card, e.g. 'apache-2.0' (default: none claimed; "
        "the card asks for one; the base model's and the data's terms apply)",
    )
    group.add_argument("--dry-run", action="store_true", help="print the resolved settings as YAML and exit")
    return parser


REFERENCE_CONSTRAINTS = ("icl", "mse", "ab", "icl+jsd")  # constraints toward a frozen copy of the starting weights


def parse_settings(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default: ``sys.argv[1:]``): the YAML named by ``-c`` first, then the flags over it
    (:func:`timm_icl.train.config.parse_with_config`). A user's mistake ends the run with one line."""
    try:
        args = parse_with_config(build_parser(), argv)
        try:
            resolve_data_args(args, default_dataset=HEADLINE_DATASET)
            load_distortion_plugins(args.imports)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        args.distortions = args.distortions or "paper"
        try:
            resolve_augmentation(args)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        if args.constraint == "none":  # plain fine-tuning: lambda 0, whatever a shared config says
            args.constraint_weight = 0.0
        if args.amp and args.mixed_precision in (None, "no"):  # timm's --amp / --amp-dtype spelled accelerate's way
            args.mixed_precision = {"bfloat16": "bf16", "float16": "fp16"}[args.amp_dtype]
        try:
            args.log_with = ",".join(parse_trackers(args.log_with, args.log_wandb)) or None
        except ValueError as e:
            raise SettingsError(str(e)) from None
        if (
            args.constraint in REFERENCE_CONSTRAINTS
            and not args.pretrained
            and not args.init_checkpoint
            and not args.allow_random_reference
        ):
            raise SettingsError(
                f"--constraint {args.constraint} with --no-pretrained and no --init-checkpoint would constrain toward "
                "a frozen random network: start from trained weights (--pretrained, --init-checkpoint PATH), use "
                "--constraint none or jsd, or pass --allow-random-reference for an experiment"
            )
        if args.num_classes is not None and args.num_classes < 1:
            raise SettingsError(
                f"--num-classes {args.num_classes}: training needs a classifier (timm's 0 means none, for features); "
                "leave it out for the dataset's number of classes"
            )
        if args.opt.lower() not in timm.optim.list_optimizers():
            raise SettingsError(f"--opt {args.opt!r} is not a timm optimizer; see timm.optim.list_optimizers()")
        check_settings(args)  # values, distortions, the cache's folder: before anything loads or is written
    except SettingsError as e:
        exit_once(f"error: {e}")  # every process meets it: printed once
    return args


def resolve_batch(args: argparse.Namespace, world: int) -> str:
    """Set ``args.batch_size`` / ``grad_accum_steps`` / ``global_batch_size`` for ``world`` processes (the paper's
    global batch of 64 unless told otherwise); returns the line to log."""
    plan = plan_batch(args.global_batch_size, args.batch_size, args.grad_accum_steps, world)
    args.global_batch_size, args.batch_size, args.grad_accum_steps = (
        plan.global_batch_size,
        plan.batch_size,
        plan.grad_accum_steps,
    )
    return plan.describe()


def or_exit(fn, *fn_args, **fn_kwargs):
    """Call ``fn``; a user's mistake (unknown model, dataset, column, layer) ends the run with one line."""
    try:
        return fn(*fn_args, **fn_kwargs)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {first_line(e)}")


# ---------------------------------------------------------------------------------------------------------------------
# accelerate: one process per device; checkpoints named checkpoints/checkpoint_<i>, newest N kept
# ---------------------------------------------------------------------------------------------------------------------
def check_push(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """``--push-to-hub``: the repo id, offline mode and the token's write access are checked before training (on the
    main process; every rank stops when it fails)."""
    if not args.push_to_hub:
        return
    problem = ""
    if accelerator.is_main_process:
        from timm_icl.hub import HubError, validate_push

        try:
            validate_push(args.push_to_hub)
        except (ValueError, HubError) as e:
            problem = first_line(e)
    failed = bool(problem)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(torch.tensor([float(failed)], device=accelerator.device), "sum").item() > 0
    if failed:
        sys.exit(f"error: --push-to-hub: {problem}" if problem else 1)


def create_accelerator(args: argparse.Namespace) -> Accelerator:
    # checkpoints are named, written atomically and rotated by timm_icl.train.checkpoint, not by accelerate
    project = ProjectConfiguration(
        project_dir=str(args.output_dir),
        logging_dir=str(Path(args.output_dir) / "logs"),  # tensorboard: RUN/logs/<run name>
        automatic_checkpoint_naming=False,
    )
    accelerator = Accelerator(
        # several processes without GPUs: accelerate 1.15 only sets up gloo (MULTI_CPU) when told cpu=True
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=args.mixed_precision,
        log_with=args.log_with.split(",") if args.log_with else None,
        project_config=project,
    )
    set_seed(args.seed)  # the same initial weights on every rank (DDP broadcasts them anyway)
    return accelerator


# ---------------------------------------------------------------------------------------------------------------------
# the model first (its input size drives the data)
# ---------------------------------------------------------------------------------------------------------------------
def create_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str, Path | None]:
    """The student at its starting weights: ``(model, model_name, init_checkpoint_path)``."""
    init = Path(args.init_checkpoint) if args.init_checkpoint else None
    if init is not None and not init.exists():
        exit_once(f"error: --init-checkpoint {init} does not exist")
    model_kwargs = {"num_classes": args.num_classes} if args.num_classes else {}
    if args.drop is not None:
        model_kwargs["drop_rate"] = args.drop
    if args.drop_path is not None:
        model_kwargs["drop_path_rate"] = args.drop_path
    if init is not None and init.is_dir():  # a timm folder (config.json + model.safetensors), e.g. a previous RUN/model
        model = or_exit_once(create_timm_model, f"local-dir:{init}", pretrained=True, **model_kwargs)
        model_name = model.pretrained_cfg.get("architecture", args.model)
    else:
        model = or_exit_once(create_timm_model, args.model, pretrained=args.pretrained and init is None, **model_kwargs)
        model_name = args.model
        if init is not None:
            or_exit_once(load_init_weights, model, init, new_head=bool(args.num_classes))
    return model, model_name, init


# ---------------------------------------------------------------------------------------------------------------------
# data: each rank reads its own shard (sharded once, here; the loaders do not go through prepare), decoded in
# workers, clean uint8 crops in timm's eval view of the model (timm_icl.data.preprocess), float on the device
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Data:
    train_loader: Any
    train_info: dict
    val_loader: Any | None
    image_size: int
    data_config: dict = field(default_factory=dict)  # what the crops used; exported into config.json


HEADLINE_DATASET = "timm/imagenet-1k-wds"  # ImageNet-1k as webdataset shards: streamed, read shard by shard


def check_dataset(args: argparse.Namespace) -> None:
    """Settle ``--streaming`` (on for a Hub id) and stop at once, with one line, when a Hub dataset cannot be read
    (before any model or data loads: ImageNet by default, offline or gated, would otherwise fail minutes later)."""
    or_exit_once(check_dataset_path, args.dataset)  # a missing local path: "no such folder", not a Hub lookup
    args.streaming = or_exit_once(check_dataset_access, args.dataset, args.streaming)


def create_data(args: argparse.Namespace, model: torch.nn.Module, rank: int, world: int) -> Data:
    if args.num_workers is None:  # in-memory data: 1-2 workers ran at 0.4-0.65x of in-process loading on 2 cores
        in_memory = args.dataset.lower().replace("_", "-") in ("fashion-mnist", "fashionmnist")
        args.num_workers = 0 if in_memory else 2
    from timm_icl.data.preprocess import resolve_preprocessing

    # the model's own eval view (input_size, crop_pct, crop_mode, interpolation), overridden by the flags
    data_config = or_exit(
        resolve_preprocessing,
        model,
        image_size=image_size_of(args),
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        mean=args.mean,
        std=args.std,
    )
    if args.mean is not None or args.std is not None:  # the task, validation and export normalise with these
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": data_config["mean"], "std": data_config["std"]}
    image_size = data_config["input_size"][-1]
    loader_kwargs = dict(
        data_config=data_config,
        image_column=args.image_column,
        label_column=args.label_column,
        streaming=args.streaming,
        rank=rank,
        world_size=world,
        num_workers=args.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    train_loader, train_info = or_exit(
        create_loader,
        args.dataset,
        args.train_split,
        batch_size=args.batch_size,
        shuffle=True,
        seed=args.seed,  # the same permutation on every rank; each takes its share
        max_samples=args.max_train_samples,
        samples_per_epoch=args.train_samples_per_epoch,
        train_transform=args.train_transform,
        train_options=transform_options(args) if args.train_transform == "timm" else None,
        **loader_kwargs,
    )
    val_loader = None
    if args.val_split.lower() != "none":
        val_loader, _ = or_exit(
            create_loader,
            args.dataset,
            args.val_split,
            batch_size=args.batch_size * 2,
            max_samples=args.max_val_samples,
            **loader_kwargs,
        )
    return Data(train_loader, train_info, val_loader, image_size, data_config)


def fit_head(args: argparse.Namespace, model: torch.nn.Module, num_classes: int | None, say) -> None:
    """The classifier's size: ``--num-classes`` when given (it must cover the dataset's labels), else the
    dataset's. A head of another size than the starting weights' is a fresh one, said once."""
    if args.num_classes is not None:
        if num_classes and args.num_classes < num_classes:
            exit_once(
                f"error: --num-classes {args.num_classes} but the dataset has {num_classes} classes (labels up to "
                f"{num_classes - 1}): pass --num-classes {num_classes} or more, or leave it out"
            )
        start = model.pretrained_cfg.get("num_classes")
        if model.num_classes != args.num_classes:
            model.reset_classifier(args.num_classes)
        if (args.pretrained or args.init_checkpoint) and start and start != args.num_classes:
            say(f"a fresh {args.num_classes}-class head (--num-classes; the starting weights have {start} classes)")
        return
    if num_classes and model.num_classes != num_classes:
        if args.init_checkpoint is not None:
            exit_once(
                f"error: the checkpoint predicts {model.num_classes} classes but the dataset has {num_classes}: "
                f"pass --num-classes {num_classes} to train a fresh head on top of the checkpoint"
            )
        say(f"a fresh {num_classes}-class head for the dataset (the starting weights have {model.num_classes} classes)")
        model.reset_classifier(num_classes)


# ---------------------------------------------------------------------------------------------------------------------
# the task: the student is trained; the frozen reference (a copy of the starting weights) stays OUT of prepare/DDP
# and out of checkpoints (ICLTask keeps it unregistered). Distortion sampling is seeded per rank (seed + rank).
# ---------------------------------------------------------------------------------------------------------------------
def create_task(args: argparse.Namespace, model: torch.nn.Module, rank: int, device: torch.device) -> ICLTask:
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    task = or_exit(
        ICLTask,
        model,
        constraint=args.constraint,
        constraint_weight=args.constraint_weight,
        layers=args.layers.split(",") if args.layers else None,
        distortions=args.distortions,
        clean_fraction=args.clean_fraction,
        alpha=args.alpha,
        margin=args.margin,
        jsd_weight=args.jsd_weight,
        # with Mixup/CutMix the targets are soft and already smoothed by timm's Mixup
        criterion=torch.nn.CrossEntropyLoss(
            label_smoothing=0.0 if (args.mixup or args.cutmix or args.cutmix_minmax) else args.smoothing
        ),
        seed=args.seed + rank,
    )
    task = task.to(device)
    if args.model_ema:  # timm's task EMA (ModelEmaV3) of the student, before any DDP / compile wrapping
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    return task


# ---------------------------------------------------------------------------------------------------------------------
# optimizer and learning-rate schedule (per optimizer step; not prepared: it must step once per step, not per process)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps_per_epoch: int | None
    total_steps: int | None


def create_optimization(args: argparse.Namespace, task: ICLTask, data: Data, world: int) -> Optimization:
    """timm's optimizer (no weight decay on biases and norm layers) and timm's schedule, stepped per optimizer step
    (``step_update``) so that warmup and decay work for streams of unknown length with ``--max-steps`` too."""
    optimizer = timm.optim.create_optimizer_v2(
        task.trainable_module, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum
    )
    loader, num_samples = data.train_loader, data.train_info["num_samples"]
    if loader.batch_sampler is not None:  # ranks differ by at most one batch; every rank runs the longest
        batches_per_epoch = math.ceil(math.ceil(loader.batch_sampler.num_samples / world) / args.batch_size)
    elif num_samples:
        batches_per_epoch = math.ceil(math.ceil(num_samples / world) / args.batch_size)
    else:
        batches_per_epoch = None
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum_steps) if batches_per_epoch else None
    total_steps = args.max_steps or (steps_per_epoch * args.epochs if steps_per_epoch else None)
    if total_steps is None and (args.sched != "constant" or args.warmup_epochs):
        sys.exit("error: the stream's size is unknown: pass --max-steps (or --sched constant, --warmup-steps)")
    per_epoch = steps_per_epoch or 1
    # every length in optimizer steps: timm's "epochs" become steps with updates_per_epoch=1
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=total_steps or 1,
        decay_epochs=max(1, round(args.decay_epochs * per_epoch)),
        decay_rate=args.decay_rate,
        # timm's MultiStepLRScheduler decays once t + 1 reaches a milestone: +1 so that the first optimizer step
        # after m epochs is the first at the lower rate
        decay_milestones=[round(m * per_epoch) + 1 for m in args.decay_milestones],
        min_lr=args.min_lr,
        warmup_lr=args.warmup_lr,
        warmup_epochs=round(args.warmup_epochs * per_epoch) + args.warmup_steps,
        step_on_epochs=False,
        updates_per_epoch=1,
    )
    return Optimization(optimizer, scheduler, steps_per_epoch, total_steps)


# ---------------------------------------------------------------------------------------------------------------------
# the run: everything the loop needs, in one place. A checkpoint = accelerate state (student, optimizer, scheduler,
# RNGs) + per-rank train_state_<rank>.pt (position in the data, distortion sampler): a resumed run continues bit for
# bit.
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    args: argparse.Namespace
    accelerator: Accelerator
    model_name: str
    init: Path | None
    data: Data
    task: ICLTask
    student: torch.nn.Module  # the prepared (DDP / compiled) student; task.get_eval_model() is the plain one
    opt: Optimization
    run_dir: Path
    position: dict = field(default_factory=lambda: {"epoch": 0, "batch_in_epoch": 0, "step": 0})
    resumed: bool = False
    metrics_file: Any = None
    ema_results: dict | None = None  # the last validation of the EMA weights (--model-ema)
    metrics_records: int = 0  # lines in metrics.jsonl (saved in checkpoints: a resume drops the ones after)
    guard: NonFiniteGuard | None = None
    target_cache: Any = None  # cached reference targets (--reference-targets cache|PATH); None: live reference
    signals: StopSignals = field(default_factory=StopSignals)  # preemption / Ctrl-C: checkpoint and stop
    callbacks: list = field(default_factory=list)  # objects with on_batch/on_step_end/on_epoch_end (tests, tools)
    augment: BatchAugment | None = None  # random erasing / Mixup on the device, or None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    @property
    def interactive(self) -> bool:
        """Progress bars only on a terminal; piped to a file, periodic log lines (timm's style) instead."""
        return sys.stderr.isatty()

    def log(self, record: dict) -> None:
        record = {**record, "time": round(time.time(), 3)}  # wall-clock seconds since the epoch
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
            self.metrics_records += 1
        if self.args.log_with:
            step = record.get("step", 0)
            values = {k: v for k, v in record.items() if isinstance(v, int | float) and k not in ("step", "time")}
            self.accelerator.log(values, step=step)

    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is true on any process (a collective: every rank must call it)."""
        return any_rank(self.accelerator, flag)

    def notify(self, event: str, *event_args) -> None:
        """Call ``event`` (``on_batch``, ``on_step_end``, ``on_epoch_end``) on every callback that has it."""
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(self, *event_args)


# ---------------------------------------------------------------------------------------------------------------------
# cached reference targets (--reference-targets cache|PATH): one pass of the frozen reference over the training set
# writes 1 bit per constrained unit and image (timm_icl.target_cache), keyed by the stream's sample ids; the
# reference is then released and each step looks its bits up instead of running it
# ---------------------------------------------------------------------------------------------------------------------
def setup_target_cache(run: Run) -> None:
    """Load (or first build) the target cache (its content hash checked), compare batches spread over the whole file
    with the live reference, release the reference. Its settings were checked before (check_model_settings)."""
    from timm_icl.target_cache import TargetCache

    args = run.args
    if args.reference_targets in (None, "", "live"):
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    path = run.run_dir / "targets.safetensors" if args.reference_targets == "cache" else Path(args.reference_targets)
    pre = cache_preprocessing(run.data.data_config, args.dataset, args.train_split, args.max_train_samples)
    if not path.exists():
        or_exit(
            build_target_cache,
            run.task,
            _cache_loader(run),
            path,
            pre,
            accelerator=run.accelerator,
            total=run.data.train_info.get("num_samples"),
            say=run.say,
        )
    cache = or_exit(TargetCache.load, path, task=run.task, preprocessing=pre)  # stale or damaged: one line
    rate, batches = or_exit(verify_target_cache, run.task, cache, _cache_loader(run, num_workers=0))
    run.say(
        f"reference targets: {path} ({len(cache)} images, {cache.nbytes_per_image} B each; {rate:.2e} of the bits "
        f"of {batches} batches spread over it differ from the live reference); the reference is released"
    )
    run.task.release_reference()
    run.target_cache = cache


def _cache_loader(run: Run, num_workers: int | None = None):
    """This rank's share of the training set in file order (no shuffling), as a resumable stream."""
    args, data = run.args, run.data
    loader, _ = or_exit(
        create_loader,
        args.dataset,
        args.train_split,
        batch_size=args.batch_size,
        shuffle=False,
        rank=run.accelerator.process_index,
        world_size=run.accelerator.num_processes,
        max_samples=args.max_train_samples,
        data_config=data.data_config,
        image_column=args.image_column,
        label_column=args.label_column,
        streaming=True,
        num_workers=args.num_workers if num_workers is None else num_workers,
    )
    return loader


def stream_state(run: Run) -> dict | None:
    """This rank's exact position in a streamed training set (``timm_icl.data.stream``) after the batches trained on in
    this epoch; None at an epoch's start or for data that is not such a stream."""
    loader = run.data.train_loader
    if not hasattr(loader, "state_dict") or run.position["batch_in_epoch"] == 0:
        return None
    return loader.state_dict(batches=run.position["batch_in_epoch"])  # the loop pulls a batch ahead: not the last


def load_stream_state(run: Run, state: dict | None) -> None:
    """Continue the training stream at ``state`` (from :func:`stream_state`): nothing before it is decoded."""
    if state is not None and hasattr(run.data.train_loader, "load_state_dict"):
        or_exit(run.data.train_loader.load_state_dict, state)


def save_checkpoint(run: Run) -> Path:
    """An atomic checkpoint (:mod:`timm_icl.train.checkpoint`: written aside, marked complete, renamed, then rotated) of
    the accelerate state and this rank's recipe state. Never of diverged weights: the guard is checked first."""
    stop_if_diverged(run)
    state = {
        "position": dict(run.position),
        "task": run.task.get_task_state(),
        "num_skipped": run.data.train_loader.num_skipped,
        "stream": stream_state(run),
        "metrics_records": run.metrics_records,
    }
    step, keep = run.position["step"], run.args.keep_checkpoints
    try:
        return checkpoint.save_checkpoint(run.accelerator, run.checkpoints, state, step=step, keep=keep)
    except (checkpoint.CheckpointError, checkpoint.DiskFull) as e:  # full disk, bad read-back: older ones intact
        sys.exit(f"error: {e}")


def resume(run: Run) -> None:
    """``--resume latest|PATH``: load the checkpoint's state into the run (or say why it starts fresh)."""
    args = run.args
    if args.resume:
        # "latest": the newest complete checkpoint that loads (damaged ones named and skipped); an older one: the
        # newer checkpoints are moved aside into checkpoints/superseded-<time>/. Another process count is refused.
        try:
            resumed = checkpoint.resume_checkpoint(run.accelerator, run.checkpoints, args.resume)
        except checkpoint.CheckpointError as e:
            sys.exit(f"error: --resume {args.resume}: {e}")
        if resumed is None:
            run.say(f"--resume latest: no checkpoint under {run.checkpoints}, starting from scratch")
        else:
            for line in resumed.skipped:
                run.say(line)
            if resumed.set_aside is not None:
                run.say(f"the checkpoints after {resumed.path.name} were moved aside to {resumed.set_aside}")
            ckpt, state = resumed.path, resumed.state
            run.position = state["position"]
            run.task.load_task_state(state["task"])
            run.data.train_loader.num_skipped = state["num_skipped"]
            load_stream_state(run, state.get("stream"))
            run.metrics_records = state.get("metrics_records", -1)  # -1: an older checkpoint, cut by step
            run.say(f"resumed from {ckpt} at epoch {run.position['epoch']}, step {run.position['step']}")
            run.resumed = True
    if not run.resumed and checkpoint.list_checkpoints(run.checkpoints):
        # A fresh run in a used folder (e.g. the demo run twice): new checkpoints are numbered after the old ones,
        # which rotation then removes; metrics.jsonl starts over.
        run.say(f"{run.run_dir} holds checkpoints of an earlier run: starting fresh (pass --resume latest to continue)")


def open_run_folder(run: Run, image_size: int) -> None:
    """config.yaml (the resolved settings), trackers, metrics.jsonl (appended to when resuming)."""
    args = run.args
    resolved = dict(vars(args))
    resolved.update(
        model_name=run.model_name,
        image_size=image_size,
        data_config={k: list(v) if isinstance(v, tuple) else v for k, v in run.data.data_config.items()},
        num_classes=run.task.get_eval_model().num_classes,
        world_size=run.accelerator.num_processes,
    )
    run.run_dir.mkdir(parents=True, exist_ok=True)  # on every rank: each may write its own files into it
    if run.is_main:
        (run.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    if args.log_with:  # scalars only, one level (tensorboard's add_hparams refuses a nested data_config)
        run.accelerator.init_trackers(
            run.run_dir.name,
            config=flat_config(resolved),
            init_kwargs=tracker_init_kwargs(args.log_with.split(","), run.run_dir),
        )
    if run.is_main:
        metrics = run.run_dir / "metrics.jsonl"
        if run.resumed:  # drop what was logged after the checkpoint: the resumed run logs those steps again
            run.metrics_records = keep_metrics(metrics, run.metrics_records, run.position["step"])
        run.metrics_file = open(metrics, "a" if run.resumed else "w")  # noqa: SIM115


def stop_if_diverged(run: Run) -> None:
    """End the run with one line when any rank saw a non-finite loss or gradient norm: no checkpoint, validation,
    export or push of diverged weights; the checkpoints on disk are the last good ones. A collective."""
    first = run.guard.first_bad(run.accelerator) if run.guard is not None else None
    if first is None:
        return
    step, loss, task_loss, constraint_loss, norm = first
    parts = f"loss {loss:.4g}, task_loss {task_loss:.4g}, constraint_loss {constraint_loss:.4g}"
    if run.args.clip_grad:
        parts += f", grad norm {norm:.4g}"
    found = checkpoint.newest_verified(run.checkpoints)  # its content checked, not only its marker
    last = f"the last good checkpoint is {found}" if found else "no checkpoint was written"
    sys.exit(
        f"error: training diverged at step {int(step)} ({parts}): stopped with nothing saved, exported or pushed; "
        f"{last}. Lower --lr or --constraint-weight, or set --clip-grad"
    )


# ---------------------------------------------------------------------------------------------------------------------
# validation and the loop
# ---------------------------------------------------------------------------------------------------------------------
def validate(run: Run, epoch: int) -> dict | None:
    """Robustness of the current student (and of its EMA, with ``--model-ema``) on the validation split: every rank
    its shard, exact counts. Writes eval.json (eval_ema.json) and one ``"kind": "val"`` metrics record."""
    if run.data.val_loader is None:
        return None
    accelerator = run.accelerator
    record = {"kind": "val", "epoch": epoch, "step": run.position["step"]}
    results = None
    for ema in (False, True) if run.task.has_ema() else (False,):
        evaluated = evaluate_robustness(
            run.task.get_eval_model(ema=ema),
            run.data.val_loader,
            parse_distortions(run.args.val_distortions or run.args.distortions),
            seed=run.args.seed,
            device=accelerator.device,
            accelerator=accelerator if accelerator.num_processes > 1 else None,
            per_image=False,
            progress=False,
        )
        # the model card's model-index names the evaluated split, and a subset as what it is: "test[:500]"
        subset = run.args.max_val_samples
        evaluated["split"] = run.args.val_split + (f"[:{subset}]" if subset is not None else "")
        prefix, summary = ("val_ema" if ema else "val"), evaluated["summary"]
        line = "  ".join(f"{k} {v:.4f}" for k, v in summary.items() if v is not None)
        run.say(f"epoch {epoch}{' (EMA)' if ema else ''}: {line}")
        record.update({f"{prefix}/{k}": v for k, v in summary.items()})
        record.update({f"{prefix}/{name}": c["top1"] for name, c in evaluated["conditions"].items()})
        record.update(
            {
                f"{prefix}/{name}_top5": c["top5"]
                for name, c in evaluated["conditions"].items()
                if c.get("top5") is not None
            }
        )
        if run.is_main:
            (run.run_dir / ("eval_ema.json" if ema else "eval.json")).write_text(json.dumps(evaluated, indent=1) + "\n")
        if ema:
            run.ema_results = evaluated
        results = results or evaluated
    run.task.train()
    run.log(record)
    return results


def progress_line(epoch, step, steps_per_epoch, loss, task_loss, constraint_loss, lr, rate) -> str:
    """One timm-style log line: ``Train: 0 [ 12/100 ( 12%)]  step 12  loss 2.3012 (ce 2.2990, constraint 0.0220)
    lr 1.00e-03  412.3 img/s`` (the step in the epoch and its share when the epoch's length is known)."""
    where = f"step {step}"
    if steps_per_epoch:
        in_epoch = (step - 1) % steps_per_epoch + 1
        width = len(str(steps_per_epoch))
        where = f"[{in_epoch:>{width}}/{steps_per_epoch} ({100 * in_epoch / steps_per_epoch:3.0f}%)]  step {step}"
    return (
        f"Train: {epoch} {where}  loss {loss:.4f} (ce {task_loss:.4f}, constraint {constraint_loss:.4f})  "
        f"lr {lr:.2e}  {rate:.1f} img/s"
    )


def stand_in_batch(run: Run) -> StreamBatch:
    """A one-image black batch to replay with weight 0 when a rank has no batch of its own this epoch (a stream
    resumed after this rank's last shard while others go on); its id is one the target cache holds."""
    size = max(1, getattr(run.data.train_loader, "last_batch_size", 1))  # the batch it replaced: same random draws
    image_id = run.target_cache.ids[0] if run.target_cache is not None else -1
    images = torch.zeros(size, *run.data.data_config["input_size"], dtype=torch.uint8)
    return StreamBatch(images, torch.zeros(size, dtype=torch.long), torch.full((size,), image_id))


def train(run: Run) -> tuple[dict | None, bool]:
    """The loop, from ``run.position`` to the end. Returns ``(last validation results, stopped_by_signal)``."""
    args, accelerator, task, student = run.args, run.accelerator, run.task, run.student
    optimizer, scheduler, steps_per_epoch = run.opt.optimizer, run.opt.scheduler, run.opt.steps_per_epoch
    train_loader, position, device = run.data.train_loader, run.position, accelerator.device
    world = accelerator.num_processes
    num_classes = task.get_eval_model().num_classes
    run.guard = NonFiniteGuard(device, position["step"])
    check_norm = bool(args.clip_grad) and accelerator.scaler is None  # fp16's scaler skips inf steps by design
    task.train()
    results = None
    stopped = False
    for epoch in range(position["epoch"], args.epochs):
        if args.max_steps is not None and position["step"] >= args.max_steps:
            break
        train_loader.set_epoch(epoch)
        skip = position["batch_in_epoch"]
        # streams of timm_icl.data.stream continue from their loaded position (set_epoch keeps it): nothing to skip
        positioned = hasattr(train_loader, "load_state_dict")
        if skip and train_loader.batch_sampler is not None:
            train_loader.batch_sampler.skip_batches(skip)  # map-style: resume at the exact batch
        elif skip and not positioned:
            run.say(f"streamed data: skipping {skip} batches to resume (the shuffle buffer is not restored)")
        images_per_step = args.batch_size * args.grad_accum_steps * world
        bar = tqdm(
            total=steps_per_epoch * images_per_step if steps_per_epoch else None,
            initial=skip // args.grad_accum_steps * images_per_step,
            disable=not run.is_main or not run.interactive,  # piped to a file: log lines, not bar redraws
            desc=f"epoch {epoch}",
            unit="img",
            unit_scale=True,
        )
        tic, images_done = time.perf_counter(), 0
        # loss parts summed on the device over the logging window (no host sync per step): [loss, ce, constraint, n]
        window = torch.zeros(4, device=device)
        micro = 0
        batches = lockstep(train_loader, accelerator, lambda: stand_in_batch(run))
        if skip and train_loader.batch_sampler is None and not positioned:
            for _ in zip(range(skip), batches, strict=False):
                pass
        for batch, weight, is_last in batches:
            images, labels = batch
            or_exit(check_labels, labels, num_classes)
            cached = None if run.target_cache is None else run.target_cache.lookup(batch.ids, device=device)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if run.augment is not None:  # erasing / Mixup on the clean batch: the reference sees it as the student
                images, labels = run.augment(images, labels)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if weight > 0:
                images_done += len(labels)
            run.notify("on_batch", batch, weight)
            micro += 1
            sync = micro == args.grad_accum_steps or is_last
            # no_sync: skip DDP's all-reduce on micro-batches that do not end an optimizer step
            with accelerator.no_sync(student) if not sync else contextlib.nullcontext():
                with accelerator.autocast():
                    out = task(images, labels, reference_targets=cached)
                accelerator.backward(out["loss"] * (weight / args.grad_accum_steps))
            parts = torch.stack([out[k].detach().float() for k in ("loss", "task_loss", "constraint_loss")])
            window += torch.cat([parts, parts.new_ones(1)]) * weight
            run.guard.observe(parts)
            position["batch_in_epoch"] += 1
            if not sync:
                continue
            micro = 0
            if args.clip_grad:
                grad_norm = accelerator.clip_grad_norm_(student.parameters(), args.clip_grad)
                if check_norm and grad_norm is not None:
                    run.guard.observe(parts, grad_norm)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            position["step"] += 1
            scheduler.step_update(position["step"])  # timm schedule, per optimizer step
            task.update_ema(step=position["step"])
            run.guard.end_step()
            bar.update(images_per_step)

            if position["step"] % args.log_every == 0 or is_last:
                stop_if_diverged(run)
                # window means over every micro-batch since the last line, all ranks
                loss, task_loss, constraint_loss, count = accelerator.reduce(window, "sum").tolist()
                loss, task_loss, constraint_loss = (v / max(count, 1.0) for v in (loss, task_loss, constraint_loss))
                window.zero_()
                rate = images_done * world / (time.perf_counter() - tic)
                bar.set_postfix(loss=f"{loss:.4f}", ce=f"{task_loss:.4f}", icl=f"{constraint_loss:.4f}", lr=f"{lr:.2e}")
                if not run.interactive:
                    run.say(
                        progress_line(
                            epoch, position["step"], steps_per_epoch, loss, task_loss, constraint_loss, lr, rate
                        )
                    )
                record = {"kind": "train", "step": position["step"], "epoch": epoch, "loss": loss}
                record.update(task_loss=task_loss, constraint_loss=constraint_loss, lr=lr, images_per_s=rate)
                record.update(skipped=train_loader.num_skipped)
                run.log(record)

            run.notify("on_step_end")
            if run.any_rank(bool(run.signals.received)):
                path = save_checkpoint(run)
                run.say(f"stopped by signal at step {position['step']}: checkpoint {path}; rerun with --resume latest")
                stopped = True
                break
            if args.checkpoint_every_steps and position["step"] % args.checkpoint_every_steps == 0:
                save_checkpoint(run)
            if args.max_steps is not None and position["step"] >= args.max_steps:
                break
        bar.close()
        if stopped:
            break
        run.notify("on_epoch_end", epoch)
        skipped = int(accelerator.reduce(torch.tensor([train_loader.num_skipped], device=device), "sum").item())
        if skipped:
            run.say(f"epoch {epoch}: {skipped} undecodable training image(s) skipped so far (see the warnings)")
        position.update(epoch=epoch + 1, batch_in_epoch=0)
        stop_if_diverged(run)
        results = validate(run, epoch)
        if args.checkpoint_every_epochs and (epoch + 1) % args.checkpoint_every_epochs == 0:
            save_checkpoint(run)
    return results, stopped


# ---------------------------------------------------------------------------------------------------------------------
# export: the student as a timm folder (safetensors, config.json with the "icl" block, model card), then the Hub
# ---------------------------------------------------------------------------------------------------------------------
def export(run: Run, results: dict | None) -> Path | None:
    """Write RUN/model on the main process (and push it with ``--push-to-hub``); returns the folder there."""
    args, task = run.args, run.task
    stop_if_diverged(run)
    if results is None and run.data.val_loader is not None and run.position["step"] > 0:
        results = validate(run, run.position["epoch"])
    exported = None
    if run.is_main:
        from timm_icl.hub import export_model

        init = run.init
        origin, base_model, start_text = weights_origin(
            task.get_eval_model(), pretrained=args.pretrained and init is None, init_checkpoint=init
        )
        uses_reference = args.constraint in REFERENCE_CONSTRAINTS
        label_names = run.data.train_info.get("class_names")
        num_classes = task.get_eval_model().num_classes
        if label_names and len(label_names) < num_classes:  # --num-classes above the dataset's: unused outputs
            label_names = [*label_names, *(f"unused_{i}" for i in range(len(label_names), num_classes))]
        icl_config = {
            "method": args.constraint,
            "lambda": task.constraint_weight,
            "alpha": args.alpha,
            "layers": list(task.layers),
            "distortions": task.sampler.distortions.to_text(),
            "clean_fraction": args.clean_fraction,
            "weights_origin": origin,
            "starting_weights": start_text,
            "reference": (
                ("a frozen copy of the starting weights" + (" (random: an experiment)" if origin == "random" else ""))
                if uses_reference
                else None
            ),
            "epochs": args.epochs,
            "steps": run.position["step"],
            "epochs_completed": (
                round(run.position["step"] / run.opt.steps_per_epoch, 3) if run.opt.steps_per_epoch else None
            ),
            "lr": args.lr,
            "batch_size": args.batch_size * run.accelerator.num_processes * args.grad_accum_steps,
        }
        if args.constraint == "icl+jsd":
            icl_config["jsd_weight"] = task.jsd_weight
        exported = export_model(
            task.get_eval_model(),
            run.run_dir / "model",
            icl_config=icl_config,
            results=results,
            model_name=run.run_dir.name,
            dataset=args.dataset,
            base_model=base_model,
            license=args.license,
            label_names=label_names,
            data_config=run.data.data_config,  # the crops training and validation used
        )
        run.say(f"model exported to {exported} (timm.create_model('local-dir:{exported}', pretrained=True))")
        if task.has_ema():  # timm's train.py keeps both; so do we: RUN/model-ema, the same folder format
            ema_folder = export_model(
                task.get_eval_model(ema=True),
                run.run_dir / "model-ema",
                icl_config={**icl_config, "ema_decay": args.model_ema_decay},
                results=run.ema_results,
                model_name=f"{run.run_dir.name}-ema",
                dataset=args.dataset,
                base_model=base_model,
                license=args.license,
                label_names=label_names,
                data_config=run.data.data_config,
            )
            run.say(f"EMA weights exported to {ema_folder}")
        if args.push_to_hub:
            from timm_icl.hub import push_to_hub

            run.say(f"pushed to {or_exit(push_to_hub, exported, args.push_to_hub)}")
    run.accelerator.wait_for_everyone()
    return exported


# ---------------------------------------------------------------------------------------------------------------------
# main: the steps above in order
# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None, callbacks: list | None = None) -> ExitCode:
    """Run the whole job; returns the exit code (0 finished, or stopped by SIGTERM/SIGUSR1 after a checkpoint; 130
    stopped by Ctrl-C) as an :class:`~timm_icl.train.run_files.ExitCode` whose ``finished`` tells a finished run
    (trained to its end, exported) from a stopped one. ``callbacks``: objects with any of ``on_batch(run, batch,
    weight)``, ``on_step_end(run)``, ``on_epoch_end(run, epoch)`` (tests, tools)."""
    args = parse_settings(argv)
    mismatch = cpu_launch_mismatch()
    if mismatch and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"warning: {mismatch}", file=sys.stderr, flush=True)
    if not sys.stderr.isatty():  # piped to a file: no progress-bar redraws from datasets either
        import datasets

        datasets.disable_progress_bars()
    if args.dry_run:
        print(yaml.safe_dump(vars(args), sort_keys=False), end="")
        return ExitCode(0, finished=False)
    check_dataset(args)  # ImageNet by default: offline or without access, stop now, not after minutes of retries
    accelerator = create_accelerator(args)
    check_push(args, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes

    def say(message: str) -> None:
        if accelerator.is_main_process:
            tqdm.write(message)

    say(or_exit(resolve_batch, args, world))  # before the loaders: they take the per-process batch

    model, model_name, init = create_model(args)
    data = create_data(args, model, rank, world)
    fit_head(args, model, data.train_info["num_classes"], say)
    try:  # the last settings that need the model and the data: every refusal so far has written nothing
        check_model_settings(args, model, data.data_config["input_size"], data.train_loader)
    except SettingsError as e:
        exit_once(f"error: {e}")
    task = create_task(args, model, rank, accelerator.device)
    opt = create_optimization(args, task, data, world)
    accelerator.register_for_checkpointing(opt.scheduler)
    if task.has_ema():
        accelerator.register_for_checkpointing(task.get_trainable_module(ema=True))
    student, opt.optimizer = accelerator.prepare(task.trainable_module, opt.optimizer)
    if args.compile:
        student = torch.compile(student)
    task.trainable_module = student  # the task calls it; hooks go on the unwrapped module (task.get_eval_model())

    run = Run(args, accelerator, model_name, init, data, task, student, opt, Path(args.output_dir))
    run.callbacks = list(callbacks or [])
    run.augment = BatchAugment.from_args(args, task.get_eval_model().num_classes, accelerator.device)
    resume(run)
    setup_target_cache(run)  # a damaged or stale cache is refused before config.yaml / metrics.jsonl are written
    plain = task.get_eval_model()  # its size: about what an export needs, said when the disk is full
    with disk_full_is_one_line(run.run_dir, "writing config.yaml and metrics.jsonl", plain):
        open_run_folder(run, data.image_size)
    run.signals = StopSignals(announce=run.is_main).install()
    num_params = sum(p.numel() for p in task.trainable_module.parameters() if p.requires_grad)
    say(
        f"{model_name}: {num_params / 1e6:.2f}M params, constraint {args.constraint} "
        f"(lambda {task.constraint_weight}), layers {task.layers}, {world} process(es), "
        f"{data.train_info['num_samples']} training samples, {opt.steps_per_epoch} steps/epoch"
    )
    try:
        with disk_full_is_one_line(run.run_dir, "writing metrics.jsonl / eval.json", plain):
            results, stopped = train(run)
        if not stopped and run.position["step"] == 0:  # every image undecodable, say: nothing to export
            exit_once(
                f"error: the run trained 0 steps ({data.train_info['num_samples']} training samples, "
                f"{data.train_loader.num_skipped} undecodable ones skipped): nothing exported; check the training data"
            )
        if not stopped:
            with disk_full_is_one_line(run.run_dir, "exporting the model", plain):
                export(run, results)
    finally:
        if run.metrics_file is not None:
            with contextlib.suppress(OSError):  # a full disk: its buffered lines cannot be written either
                run.metrics_file.close()
        run.signals.restore()
    accelerator.end_training()
    # Ctrl-C: 130 (the shell's convention); SIGTERM/SIGUSR1 (preemption): 0, as a cluster scheduler expects
    return ExitCode(130 if stopped and run.signals.interrupted else 0, finished=not stopped)


if __name__ == "__main__":
    sys.exit(main())
