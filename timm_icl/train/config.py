"""Training settings: a flat YAML config gives the defaults, command-line flags override it (timm's train.py
two-stage parse), and every value is checked before anything is written.

Errors are :class:`SettingsError` with one line that says what was wrong; the recipe prints it as ``error: ...``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from timm_icl.utils.errors import first_line

__all__ = [
    "SettingsError",
    "read_config",
    "parse_with_config",
    "check_values",
    "check_settings",
    "check_dataset_path",
    "check_model_settings",
    "exit_once",
    "or_exit_once",
    "VALUE_LIMITS",
    "VALUE_MAXIMA",
]


class SettingsError(ValueError):
    """A user's setting is wrong (unknown key, wrong type, out of range); the message is one line."""


def read_config(path: str | Path) -> dict[str, Any]:
    """The YAML config's ``{option: value}``; a missing file or broken YAML is a :class:`SettingsError`."""
    if not Path(path).is_file():
        raise SettingsError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SettingsError(
            f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or type(e).__name__}"
        ) from None
    if not isinstance(values, dict):
        raise SettingsError(f"{path} must hold 'option: value' lines (a YAML mapping), not a {type(values).__name__}")
    return values


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with ``parser``: the YAML named by ``-c/--config`` first (its keys are the options' ``dest``
    names), then the flags over it. Config values skip argparse's own checks, so they are checked here: unknown keys,
    numbers, choices, and nulls for options that have a default. ``args.config`` holds the config's path (or None)."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default=None)
    config_args, remaining = config_parser.parse_known_args(argv)
    original, from_config = {a.dest: a.default for a in parser._actions}, set()
    if config_args.config:
        defaults = read_config(config_args.config)
        from_config = set(defaults)
        unknown = sorted(set(defaults) - {a.dest for a in parser._actions})
        if unknown:
            raise SettingsError(f"{config_args.config} names unknown options {unknown}")
        for action in parser._actions:  # YAML gives typed values that argparse never checks: check them here
            if action.dest in defaults:
                defaults[action.dest] = _config_value(action, defaults[action.dest], config_args.config)
        parser.set_defaults(**defaults)
    args = parser.parse_args(remaining)
    args.config = config_args.config
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            raise SettingsError(f"{action.dest} = {value!r} is not one of {sorted(action.choices)}")
        several = action.nargs not in (None, "?") and isinstance(value, list)  # --input-size C H W, --mean a b c
        values = value if several else [value]
        if action.type in (int, float) and value is not None and not all(isinstance(v, int | float) for v in values):
            raise SettingsError(f"{action.dest} = {value!r} is not a number")
        if value is None and action.dest in from_config and original.get(action.dest) is not None:
            raise SettingsError(f"{action.dest} is null in {args.config}: give a value or drop the key")
    return args


_BOOLEAN_ACTIONS = (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)


def _config_value(action: argparse.Action, value: Any, path: str) -> Any:
    """A config value for ``action``, checked against the option's type: an integer option refuses 3.5 and true, a
    number refuses a word, a switch refuses anything but true/false (YAML's quoted "no" is a string, which Python
    would read as true)."""
    where = f"{action.dest} = {value!r} in {path}"
    if value is None:
        return value
    if isinstance(action, _BOOLEAN_ACTIONS):
        if not isinstance(value, bool):
            raise SettingsError(f"{where} is not a boolean: write true or false (unquoted)")
        return value
    if action.type is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise SettingsError(f"{where} is not an integer")
        if isinstance(value, float):
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise SettingsError(f"{where} is not an integer") from None
        if not isinstance(value, int):
            raise SettingsError(f"{where} is not an integer")
        return value
    if action.type is float:
        if isinstance(value, bool):
            raise SettingsError(f"{where} is not a number")
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise SettingsError(f"{where} is not a number") from None
        if not isinstance(value, int | float):
            raise SettingsError(f"{where} is not a number")
        return float(value)
    if (action.type is None or action.type is str) and action.nargs is None and isinstance(value, list | dict):
        raise SettingsError(f"{where} must be a single value, not a {type(value).__name__}")
    return value


#: the lowest meaningful value of each numeric option, and whether it is allowed itself (lr 0 trains nothing)
VALUE_LIMITS = {
    "lr": (0, False),
    "alpha": (0, False),
    "epochs": (1, True),
    "batch_size": (1, True),
    "global_batch_size": (1, True),
    "grad_accum_steps": (1, True),
    "max_train_samples": (1, True),
    "train_samples_per_epoch": (1, True),
    "max_val_samples": (1, True),
    "image_size": (1, True),
    "max_steps": (1, True),
    "log_every": (1, True),
    "keep_checkpoints": (1, True),
    "num_workers": (0, True),
    "checkpoint_every_steps": (0, True),
    "checkpoint_every_epochs": (0, True),
    "constraint_weight": (0, True),
    "margin": (0, True),
    "clean_fraction": (0, True),
    "weight_decay": (0, True),
    "momentum": (0, True),
    "clip_grad": (0, False),
    "crop_pct": (0, False),
    "warmup_epochs": (0, True),
    "warmup_steps": (0, True),
    "warmup_lr": (0, True),
    "min_lr": (0, True),
    "decay_epochs": (0, False),
    "decay_rate": (0, False),
    "smoothing": (0, True),
    "model_ema_decay": (0, True),
    "drop": (0, True),
    "drop_path": (0, True),
}
#: the highest allowed value of the options that have one
VALUE_MAXIMA = {"crop_pct": 1, "clean_fraction": 1, "smoothing": 1, "model_ema_decay": 1, "drop": 1, "drop_path": 1}


def check_values(args: argparse.Namespace) -> None:
    """Refuse meaningless values (``--lr -0.1``, ``--epochs 0``, ``--alpha 0``, NaN, ...) and an ``--output-dir``
    that is a file, each with one line (:class:`SettingsError`)."""
    for dest, (low, inclusive) in VALUE_LIMITS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        if not math.isfinite(value):
            raise SettingsError(f"{flag} must be a finite number, got {value}")
        if value < low or (value == low and not inclusive):
            raise SettingsError(f"{flag} must be {'>=' if inclusive else '>'} {low}, got {value}")
        if dest in VALUE_MAXIMA and value > VALUE_MAXIMA[dest]:
            raise SettingsError(f"{flag} must be <= {VALUE_MAXIMA[dest]}, got {value}")
    output_dir = getattr(args, "output_dir", None)
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise SettingsError(f"--output-dir {output_dir} is a file; the run folder must be a folder")


# ---------------------------------------------------------------------------------------------------------------------
# every setting checked before the run folder is touched (issue 19): the recipe calls check_settings() while parsing,
# check_dataset_path() before the data is looked up, check_model_settings() once the model and the data exist; a
# refusal is one line, printed by the first process only (exit_once), and nothing has been written
# ---------------------------------------------------------------------------------------------------------------------
def exit_once(message: str):
    """End the run with ``message`` for a refusal that every process reaches alike (a setting, the model, the data's
    layout): the first process prints it, every other one exits with 1 silently (not three copies of one line)."""
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        sys.exit(message)
    sys.exit(1)


def or_exit_once(fn, *fn_args, **fn_kwargs):
    """Call ``fn``; a ``ValueError``/``FileNotFoundError``/``RuntimeError`` that every process meets alike (an unknown
    model, a missing file) ends the run with its first line, printed once (:func:`exit_once`)."""
    try:
        return fn(*fn_args, **fn_kwargs)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        exit_once(f"error: {first_line(e)}")


def check_settings(args: argparse.Namespace) -> None:
    """Everything that can be checked from the settings alone: the values (:func:`check_values`), the training and
    validation distortions (an unknown kind such as ``blurr`` is refused now, not after an epoch of training) and
    the folder a ``--reference-targets PATH`` cache is to be written in. A :class:`SettingsError` otherwise."""
    check_values(args)
    from timm_icl.distortions import parse_distortions

    for flag in ("distortions", "val_distortions"):
        spec = getattr(args, flag, None)
        if spec is None:
            continue
        try:
            parse_distortions(spec)
        except (ValueError, KeyError, TypeError) as e:
            raise SettingsError(f"--{flag.replace('_', '-')} {spec!r}: {first_line(e)}") from None
    cache = getattr(args, "reference_targets", None)
    if cache not in (None, "", "live", "cache") and not Path(cache).exists() and not Path(cache).parent.is_dir():
        raise SettingsError(f"--reference-targets {cache}: no such folder {Path(cache).parent} to write the cache in")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".parquet", ".tar", ".arrow", ".csv", ".json", ".jsonl", ".zip")


def check_dataset_path(spec: str | None) -> None:
    """A ``--dataset`` that names a local path (starting with ``/``, ``.`` or ``~``, two or more ``/``, a file suffix,
    anything a Hub id cannot be) must exist: "no such folder", not a Hub lookup of the path. Hub ids (``owner/name``,
    ``name``) and ``fashion-mnist`` pass."""
    if not spec or Path(spec).expanduser().exists():
        return
    looks_local = (
        spec.startswith(("/", ".", "~"))
        or "\\" in spec
        or spec.count("/") >= 2
        or spec.lower().endswith(_FILE_SUFFIXES)
        or not _HUB_ID.fullmatch(spec)
    )
    if looks_local and spec.lower().replace("_", "-") not in ("fashion-mnist", "fashionmnist"):
        raise SettingsError(f"--dataset {spec}: no such folder (a Hub dataset id is 'owner/name')")


def check_model_settings(args: argparse.Namespace, model: nn.Module, input_size, train_loader) -> None:
    """What needs the model and the data: the crop size must be one the model can take (``--image-size 1`` through
    five max-pools is refused now, not in the first step after config.yaml was written: one image through the model,
    only when the size is not its own), and cached reference targets need sample ids (streamed data)."""
    cache = getattr(args, "reference_targets", None)
    if cache not in (None, "", "live") and not hasattr(train_loader, "state_dict"):
        raise SettingsError(
            f"--reference-targets {cache} needs sample ids, which only streamed data carries for now: add --streaming"
        )
    size = tuple(int(s) for s in input_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    own = tuple(cfg.get("input_size") or ())
    if size == own:
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *size))
    except Exception as e:  # a too small input: pooling/conv size errors; a fixed-size model: a shape error
        name = cfg.get("architecture") or type(model).__name__
        raise SettingsError(
            f"--image-size {size[-1]}: {name} cannot take {size[-2]}x{size[-1]} images ({first_line(e)}); its own "
            f"size is {own[-1] if own else 'unknown'}"
        ) from None
    finally:
        model.train(was_training)
