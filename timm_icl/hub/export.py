"""Export a fine-tuned model as a folder timm (and transformers) can load: weights, config.json, model card, results.

The exported folder holds::

    config.json              timm's config (``save_for_hf``) + an ``"icl"`` block: method, lambda, alpha, layers, ...
    model.safetensors        the student's weights (no pickle ``.bin``)
    README.md                the model card from ``timm_icl/hub/model_cards/template.md`` (model-index: a result each)
    eval_results.json        the evaluation numbers (without per-image lists), when given
    accuracy_vs_sigma.png    accuracy against distortion strength, when results are given

and loads with ``timm.create_model("local-dir:<folder>", pretrained=True)`` or, once pushed,
``timm.create_model("hf-hub:<repo_id>", pretrained=True)``. The card is rendered by :mod:`.card`; :mod:`.push`
uploads the folder.

Example:
    >>> folder = export_model(task.get_eval_model(), "runs/icl/model", icl_config=cfg, results=res)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..eval.plots import plot_accuracy_vs_sigma
from ..utils.files import replace_folder, staging_folder
from ..utils.jsonio import canonical_json, json_safe
from .card import PLOT_NAME, RESULTS_NAME, describe_dataset, render_model_card

__all__ = ["export_model", "resolve_model_folder", "non_finite_tensors", "non_finite_summary"]

_logger = logging.getLogger(__name__)

#: pretrained_cfg keys that describe the base weights (their paper, origin, licence), dropped from an export.
_BASE_WEIGHTS_KEYS = ("paper_ids", "paper_name", "notes", "origin_url", "license", "hf_hub_id", "url", "file", "source")
_EXPORTED = ("config.json", "model.safetensors", "README.md", RESULTS_NAME, PLOT_NAME)
#: Testing hook: SIGKILL the process in the middle of an export (new weights and config written, no card yet).
KILL_DURING_EXPORT_ENV = "TIMM_ICL_TEST_KILL_DURING_EXPORT"


def _strip_per_image(results: Mapping[str, Any]) -> dict:
    return {k: v for k, v in results.items() if k != "per_image"}


def non_finite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors in ``state_dict`` that hold a NaN or an infinity."""
    return [
        name
        for name, value in state_dict.items()
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def non_finite_summary(bad: list[str], state_dict: Mapping[str, Any]) -> str:
    """One line naming the non-finite tensors ``bad`` (the first four) among the floating tensors of ``state_dict``."""
    total = sum(1 for v in state_dict.values() if torch.is_tensor(v) and v.is_floating_point())
    shown = ", ".join(bad[:4]) + (f", ... ({len(bad) - 4} more)" if len(bad) > 4 else "")
    return f"{len(bad)} of {total} weight tensors hold NaN or infinite values ({shown}); the training diverged"


def _publish(staged: Path, final: Path) -> None:
    """Put the complete ``staged`` export in ``final``'s place in one rename; files of ``final`` that an export does
    not write (a user's notes) are carried over, a stale ``pytorch_model.bin`` is not."""
    if final.is_dir():
        for item in final.iterdir():
            if item.name in _EXPORTED or item.name == "pytorch_model.bin" or (staged / item.name).exists():
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.copytree(item, staged / item.name, symlinks=True)
            else:
                shutil.copy2(item, staged / item.name, follow_symlinks=False)
    replace_folder(staged, final)


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    icl_config: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
    model_name: str | None = None,
    dataset: str | None = None,
    base_model: str | None = None,
    license: str | None = None,  # noqa: A002  (the Hub's metadata key)
    label_names: list[str] | None = None,
    data_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a folder that ``timm.create_model("local-dir:<out_dir>", pretrained=True)`` loads.

    Args:
        model: the fine-tuned timm model (an ``ICLTask`` or a DDP/compiled wrapper is unwrapped to its student).
        out_dir: the folder. Written atomically: the export goes into a hidden folder beside it that then takes its
            place in one rename, so a kill leaves the previous export or the new one, never a mix. Files of a
            previous export are replaced; other files there are carried over, a stale ``pytorch_model.bin`` is not.
        icl_config: the training settings recorded in config.json's ``"icl"`` block, e.g. ``{"method": "icl",
            "lambda": 0.1, "alpha": 100, "layers": [...], "distortions": "noise:20,... blur:2,...",
            "reference_model": "vgg16.tv_in1k"}`` (``constraint``/``constraint_weight`` are accepted as aliases).
        results: an :func:`~timm_icl.eval.evaluate.evaluate_robustness` result: card table, model-index, plot.
        model_name: the card's title and model-index name (default: the folder name).
        dataset: training/evaluation dataset id, e.g. ``"zalando-datasets/fashion_mnist"``.
        base_model: the model fine-tuned from, e.g. ``"timm/vgg16.tv_in1k"``.
        license: licence id of these weights (e.g. ``"apache-2.0"``); also written to the pretrained config.
        label_names: class names, index = class id (written to config.json for pipelines).
        data_config: the preprocessing training and evaluation used (``input_size``, ``crop_pct``, ``crop_mode``,
            ``interpolation``, ``mean``, ``std``: :func:`~timm_icl.data.preprocess.resolve_preprocessing`, or a loader's
            ``info["data_config"]``), written to config.json's ``pretrained_cfg`` so that ``resolve_data_config``
            of the loaded model, transformers' image processor and ``timm-icl eval`` see the same crops. None keeps
            the model's own ``pretrained_cfg`` values.

    Returns:
        The folder path.

    Raises:
        ValueError: a weight tensor holds NaN or infinite values (names the tensors), or no ``pretrained_cfg``.
    """
    from timm.models import save_for_hf
    from timm.utils import unwrap_model

    if callable(getattr(model, "get_eval_model", None)):  # an ICLTask: its student (or its EMA)
        model = model.get_eval_model()
    model = unwrap_model(model)  # DDP / torch.compile wrappers
    if not getattr(model, "pretrained_cfg", None):
        raise ValueError(
            "the model has no pretrained_cfg (built by hand?); "
            "create it with timm.create_model(...) so that it can be exported"
        )
    bad = non_finite_tensors(model.state_dict())
    if bad:
        raise ValueError(f"refusing to export to {out_dir}: {non_finite_summary(bad, model.state_dict())}")
    # Atomic as a folder: everything is written into a hidden staging folder beside out_dir, which then takes
    # out_dir's place in one rename, so a kill leaves either the previous export or the new one, complete.
    final = Path(out_dir)
    out_dir = staging_folder(final)

    model_config: dict[str, Any] = {}
    pretrained_override: dict[str, Any] = {"tag": "icl"}
    if license:
        pretrained_override["license"] = license
    model_config["pretrained_cfg"] = pretrained_override
    if label_names:
        if len(label_names) != model.num_classes:
            raise ValueError(f"{len(label_names)} label names for a model with {model.num_classes} classes")
        model_config["label_names"] = list(label_names)
    if data_config is not None:  # timm's own path: also drops the source's test_input_size / test_crop_pct
        data_config = {k: v for k, v in json_safe(data_config).items() if v is not None}
    save_for_hf(model, out_dir, model_config=model_config, safe_serialization=True, data_config=data_config)

    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    # the architecture's own paper, notes and licence describe the base weights, not these: not carried over
    pcfg = config.get("pretrained_cfg", {})
    for key in _BASE_WEIGHTS_KEYS:
        pcfg.pop(key, None)
    if license:
        pcfg["license"] = license
    # transformers' TimmWrapper passes num_classes itself and then fails with "got multiple values for keyword
    # argument 'num_classes'" when model_args repeats it; timm reads the top-level num_classes anyway.
    config.get("model_args", {}).pop("num_classes", None)
    icl = dict(json_safe(dict(icl_config or {})))
    if "constraint" in icl and "method" not in icl:
        icl["method"] = icl.pop("constraint")
    if "constraint_weight" in icl and "lambda" not in icl:
        icl["lambda"] = icl.pop("constraint_weight")
    icl.setdefault("method", None)
    for key, value in (("dataset", dataset), ("base_model", base_model), ("license", license)):
        if value is not None or key not in icl:
            icl[key] = value if value is not None else icl.get(key)
    icl["model_name"] = model_name or icl.get("model_name") or final.resolve().name
    # decided here, where a local path exists; config.json keeps only its name and kind, never the path
    described = describe_dataset(icl.get("dataset"))
    if described["source"] not in (None, "hub", "fashion-mnist"):
        icl["dataset"] = described["name"]  # a local folder: its own name
    icl["dataset_source"], icl["dataset_hub_id"] = described["source"], described["hub_id"]
    config["icl"] = icl
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if os.environ.get(KILL_DURING_EXPORT_ENV) == "1":  # testing: a kill with new weights + config, old card
        os.kill(os.getpid(), signal.SIGKILL)

    if results is not None:
        (out_dir / RESULTS_NAME).write_text(canonical_json(_strip_per_image(results)))
        try:
            plot_accuracy_vs_sigma({icl["model_name"]: results}, out_dir / PLOT_NAME, title=icl["model_name"])
        except ImportError:
            _logger.warning("matplotlib is not installed: the card has no plot")
    (out_dir / "README.md").write_text(render_model_card(out_dir, shown_as=final))
    _publish(out_dir, final)
    return final


def resolve_model_folder(path: str | Path) -> Path:
    """An exported folder, or a recipe run folder whose exported model is ``RUN/model``."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise ValueError(
        f"{path} is not an exported model folder (no config.json + model.safetensors, nor model/ with them)"
    )
