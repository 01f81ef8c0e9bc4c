"""Experiment trackers (accelerate's: tensorboard, wandb, ...) as the recipe uses them: checked before training,
given a flat config of scalars (tensorboard's ``add_hparams`` refuses anything else), written into the run folder."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["TRACKER_PACKAGES", "parse_trackers", "flat_config", "tracker_init_kwargs"]

#: The trackers the recipe knows by name and the package each needs (accelerate drops a missing one silently).
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "aim": "aim",
    "comet_ml": "comet_ml",
    "mlflow": "mlflow",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}


def parse_trackers(log_with: str | None, log_wandb: bool = False) -> list[str]:
    """``--log-with a,b`` (+ timm's ``--log-wandb``) -> tracker names, each checked to be installed. A tracker that
    is unknown or not installed is a ValueError line naming the package to install (never a silent no-op)."""
    names = [n.strip().lower() for n in (log_with or "").split(",") if n.strip()]
    if log_wandb and "wandb" not in names:
        names.append("wandb")
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ValueError(f"--log-with {name}: unknown tracker; choose from {', '.join(TRACKER_PACKAGES)}")
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            hint = " (or pip install 'timm-icl[tracking]')" if name in ("tensorboard", "wandb") else ""
            raise ValueError(f"--log-with {name}: the {package} package is not installed: pip install {package}{hint}")
    return names


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Scalars only, one level: nested dicts become ``outer.inner`` keys, lists and tuples comma-joined strings,
    None is left out (tensorboard's ``add_hparams`` and wandb's config both take this)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if value is None:
            continue
        if isinstance(value, Mapping):
            out.update(flat_config(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            out[name] = ",".join(str(v) for v in value)
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def tracker_init_kwargs(names: list[str], run_dir: str | Path) -> dict[str, dict]:
    """Per-tracker ``init_kwargs`` for ``accelerator.init_trackers``: wandb writes into the run folder and is
    named after it (``WANDB_MODE=offline`` keeps it on this machine). Tensorboard's folder is the accelerator's
    ``logging_dir`` (``RUN/logs``)."""
    run_dir = Path(run_dir)
    kwargs: dict[str, dict] = {}
    if "wandb" in names:
        kwargs["wandb"] = {"dir": str(run_dir), "name": run_dir.name}
    return kwargs
