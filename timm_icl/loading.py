"""Models from what a user types: a timm name, ``hf-hub:``/``local-dir:``, an exported folder or a run folder,
and initial weights from a safetensors file; every failure is one ``ValueError`` line that says what to do."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .utils.errors import first_line

__all__ = ["resolve_model_spec", "create_model", "load_init_weights", "hub_id_of_pretrained_cfg", "weights_origin"]

_PREFIXES = ("hf-hub:", "local-dir:", "hf_hub:")


def resolve_model_spec(model: str) -> tuple[str, bool]:
    """``(timm model name, pretrained)`` for a user's MODEL: a run folder or exported folder -> ``local-dir:``."""
    if model.startswith(_PREFIXES):
        return model, True
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{model} is a file; MODEL must be a timm name, hf-hub:..., local-dir:... or a folder")
        from .hub import resolve_model_folder

        return f"local-dir:{resolve_model_folder(path)}", True
    if "/" in model or os.sep in model:
        raise ValueError(f"no such folder {model!r}; for a Hub model write hf-hub:{model}")
    return model, True


def create_model(model: str, *, pretrained: bool, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model`` for a user's MODEL (see :func:`resolve_model_spec`); ``kwargs`` go to timm
    (``num_classes``, ``drop_rate``, ...). An unknown name, an unreachable Hub or damaged weights: one line."""
    import timm
    from safetensors import SafetensorError

    from . import models  # noqa: F401  (registers vgg_tiny / vgg_small)

    name, from_weights = resolve_model_spec(model)
    base = name if not name.startswith(_PREFIXES) else None
    if base is not None and not timm.is_model(base.split(".")[0]):
        raise ValueError(f"unknown timm model {model!r}; see timm.list_models('*{base.split('.')[0][:8]}*')")
    try:
        return timm.create_model(name, pretrained=pretrained and from_weights, **kwargs)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # hub errors (offline, 404, gated): OSError
        if isinstance(e, SafetensorError):  # a truncated or damaged weights file: name it
            where = Path(name.split(":", 1)[1]) / "model.safetensors" if name.startswith("local-dir:") else name
            raise ValueError(
                f"cannot load model {model!r}: {where} is damaged or truncated ({first_line(e)})"
            ) from None
        if pretrained and _is_hub_error(e):  # offline, unreachable, gated or missing weights: say what works here
            raise ValueError(
                f"cannot load the pretrained weights of {model!r} from the Hub ({type(e).__name__}: offline or "
                "unreachable?); start from local weights (--init-checkpoint PATH: a .safetensors state dict or a timm "
                "folder saved with save_pretrained/save_for_hf; or MODEL local-dir:PATH) or pass --no-pretrained "
                "for random weights"
            ) from None
        raise ValueError(f"cannot load model {model!r} ({first_line(e, with_type=True)})") from None


def _is_hub_error(e: BaseException) -> bool:
    """An error of reaching the Hub or its cache (not of the model itself)."""
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # older huggingface_hub
        return isinstance(e, OSError)
    hub = (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
    return isinstance(e, hub) or "huggingface" in str(e).lower() or "hub" in type(e).__module__.lower()


def hub_id_of_pretrained_cfg(pretrained_cfg: dict | None) -> str | None:
    """The Hub repository of the weights a ``pretrained_cfg`` describes: its ``hf_hub_id`` (set by timm for Hub
    weights), else timm's registry entry for ``architecture.tag`` (timm's ``save_pretrained`` drops
    ``hf_hub_id`` but keeps both). None for weights timm does not know (an untrained model, our own exports)."""
    cfg = dict(pretrained_cfg or {})
    if cfg.get("hf_hub_id"):
        return str(cfg["hf_hub_id"])
    architecture, tag = cfg.get("architecture"), cfg.get("tag")
    if not architecture or not tag:
        return None
    try:
        from timm.models import get_pretrained_cfg

        known = get_pretrained_cfg(f"{architecture}.{tag}")
    except Exception:  # unknown names: nothing to claim
        return None
    return getattr(known, "hf_hub_id", None) if known is not None else None


def weights_origin(
    model: torch.nn.Module, *, pretrained: bool, init_checkpoint: str | Path | None
) -> tuple[str, str | None, str]:
    """Where the starting weights (and so ICL's frozen reference) came from, for config.json and the card:
    ``(origin, base_model, text)``. ``origin`` is ``"pretrained"`` (timm's Hub weights), ``"init-checkpoint"``
    (local weights) or ``"random"``; ``base_model`` the Hub id they derive from when known (a local timm folder:
    its own record, or timm's registry entry for its ``architecture.tag``); ``text`` says it in words, without
    local paths."""
    if init_checkpoint is not None:
        path = Path(init_checkpoint)
        base = None
        config_path = path / "config.json" if path.is_dir() else None
        if config_path is not None and config_path.is_file():
            import json

            config = json.loads(config_path.read_text())
            pcfg = {"architecture": config.get("architecture"), **(config.get("pretrained_cfg") or {})}
            base = (config.get("icl") or {}).get("base_model") or hub_id_of_pretrained_cfg(pcfg)
        if base:
            return "init-checkpoint", base, f"local weights (`--init-checkpoint`) derived from `{base}`"
        return "init-checkpoint", None, "local weights (`--init-checkpoint`; no Hub weights timm knows behind them)"
    if pretrained:
        base = hub_id_of_pretrained_cfg(getattr(model, "pretrained_cfg", None))
        return "pretrained", base, f"the pretrained timm weights `{base}`" if base else "timm's pretrained weights"
    return "random", None, "a random initialisation (no pretrained weights, no `--init-checkpoint`)"


def load_init_weights(model: torch.nn.Module, path: str | Path, *, new_head: bool) -> None:
    """Load a ``.safetensors`` state dict into ``model``; with ``new_head`` (``--num-classes``) a classifier of
    another size is left freshly initialised. Any other mismatch is a ValueError that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"--init-checkpoint {path} is not a readable safetensors file ({first_line(e)}); "
            "pass a .safetensors state dict or a timm folder (config.json + model.safetensors)"
        ) from None
    own = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier") or ""
    head = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier) if c)
    mismatched = [k for k in state.keys() & own.keys() if state[k].shape != own[k].shape]
    if new_head and mismatched and all(k.startswith(head) for k in mismatched):
        for k in mismatched:
            del state[k]  # a fresh head for --num-classes; everything else from the checkpoint
    missing = sorted(own.keys() - state.keys() - ({k for k in own if k.startswith(head)} if new_head else set()))
    unexpected = sorted(state.keys() - own.keys())
    mismatched = sorted(k for k in state.keys() & own.keys() if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            shapes = f"checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
            parts.append(f"{len(mismatched)} shape mismatch(es) (first: {k}: {shapes})")
        if missing:
            parts.append(f"{len(missing)} missing key(s) (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]})")
        hint = (
            "pass --num-classes N for a fresh head of N classes"
            if mismatched and all(k.startswith(head) for k in mismatched)
            else f"is it a checkpoint of --model {model.pretrained_cfg.get('architecture', '?')}?"
        )
        raise ValueError(f"--init-checkpoint {path} does not fit the model: {'; '.join(parts)}; {hint}")
    model.load_state_dict(state, strict=False)
