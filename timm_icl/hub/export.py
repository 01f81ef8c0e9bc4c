"""Export a fine-tuned model as a folder timm (and transformers) can load, with a model card, and push it to the Hub.

The exported folder holds::

    config.json              timm's config (``save_for_hf``) + an ``"icl"`` block: method, lambda, alpha, layers, ...
    model.safetensors        the student's weights (no pickle ``.bin``)
    README.md                the model card from ``timm_icl/hub/model_cards/template.md`` (model-index: a result each)
    eval_results.json        the evaluation numbers (without per-image lists), when given
    accuracy_vs_sigma.png    accuracy against distortion strength, when results are given

and loads with ``timm.create_model("local-dir:<folder>", pretrained=True)`` or, once pushed,
``timm.create_model("hf-hub:<repo_id>", pretrained=True)``.

Example:
    >>> folder = export_model(task.get_eval_model(), "runs/icl/model", icl_config=cfg, results=res)  # doctest: +SKIP
    >>> push_to_hub(folder, "me/vgg16-icl")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.fashion_mnist import HUB_ID as FASHION_MNIST_HUB_ID
from ..eval.results import canonical_json, format_table, json_safe, plot_accuracy_vs_sigma

__all__ = [
    "export_model",
    "push_to_hub",
    "validate_push",
    "non_finite_tensors",
    "render_model_card",
    "HubError",
    "resolve_model_folder",
    "card_template",
]

_logger = logging.getLogger(__name__)

RESULTS_NAME = "eval_results.json"
PLOT_NAME = "accuracy_vs_sigma.png"
_EXPORTED = ("config.json", "model.safetensors", "README.md", RESULTS_NAME, PLOT_NAME)
#: Testing hook: SIGKILL the process in the middle of an export (new weights and config written, no card yet).
KILL_DURING_EXPORT_ENV = "TIMM_ICL_TEST_KILL_DURING_EXPORT"

_METHODS = {
    "icl": (
        "Intermediate Constraint Loss (ICL)",
        "While the model is fine-tuned on distorted images with their labels, each constrained pre-activation unit of "
        "the fine-tuned network on the *distorted* image is pushed to fire (> 0) exactly when the same unit of the "
        "original, frozen network fires on the *clean* image: `loss = CE + lambda * BCE(sigmoid(alpha * h_dist), "
        "1[h_ref > 0])` (Suzuki et al., FIT 2020).",
    ),
    "mse": (
        "MSE intermediate constraint",
        "Fine-tuning on distorted images with `loss = CE + lambda * mean((h_dist - h_ref)^2)` on the constrained "
        "pre-activations, h_ref from the frozen original network on the clean image (the paper's MSE baseline).",
    ),
    "ab": (
        "activation-boundary constraint",
        "Fine-tuning on distorted images with a margin hinge loss that keeps each constrained pre-activation on the "
        "same side of zero as the frozen original network on the clean image (Heo et al., AAAI 2019).",
    ),
    "none": (
        "plain fine-tuning on distorted images",
        "Fine-tuning on distorted images with their labels and cross-entropy only (the paper's baseline, lambda = 0).",
    ),
}


class HubError(RuntimeError):
    """A push to the Hub failed for a reason the user can fix (offline, not authorised, bad repo id)."""


# --------------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------------
def _strip_per_image(results: Mapping[str, Any]) -> dict:
    return {k: v for k, v in results.items() if k != "per_image"}


def non_finite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """The names of the floating-point tensors in ``state_dict`` that hold a NaN or an infinity."""
    return [
        name
        for name, value in state_dict.items()
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def _non_finite_summary(bad: list[str], state_dict: Mapping[str, Any]) -> str:
    total = sum(1 for v in state_dict.values() if torch.is_tensor(v) and v.is_floating_point())
    shown = ", ".join(bad[:4]) + (f", ... ({len(bad) - 4} more)" if len(bad) > 4 else "")
    return f"{len(bad)} of {total} weight tensors hold NaN or infinite values ({shown}); the training diverged"


def _staging_folder(final: Path) -> Path:
    """A fresh hidden folder beside ``final`` to export into (leftovers of a killed export are removed first)."""
    if final.exists() and not final.is_dir():
        raise ValueError(f"cannot export to {final}: it is a file, not a folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for leftover in final.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)
    staged = final.parent / f".{final.name}.tmp-{os.getpid()}"
    staged.mkdir()
    return staged


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # directories on some filesystems
        pass
    finally:
        os.close(fd)


def _replace_folder(staged: Path, final: Path) -> None:
    """Put the complete ``staged`` folder in ``final``'s place in one rename; files of ``final`` that an export does
    not write (a user's notes) are carried over, a stale ``pytorch_model.bin`` is not."""
    if final.is_dir():
        for item in final.iterdir():
            if item.name in _EXPORTED or item.name == "pytorch_model.bin" or (staged / item.name).exists():
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.copytree(item, staged / item.name, symlinks=True)
            else:
                shutil.copy2(item, staged / item.name, follow_symlinks=False)
    for path in [*staged.rglob("*"), staged]:
        if path.is_file() or path == staged:
            _fsync(path)
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        os.replace(staged, final)
        old = None
    elif _exchange(staged, final):
        old = staged  # now holds the previous export
    else:  # two renames: a kill between them leaves the previous export in .<name>.old-<pid>
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(staged, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
        raise ValueError(f"refusing to export to {out_dir}: {_non_finite_summary(bad, model.state_dict())}")
    # Atomic as a folder: everything is written into a hidden staging folder beside out_dir, which then takes
    # out_dir's place in one rename, so a kill leaves either the previous export or the new one, complete.
    final = Path(out_dir)
    out_dir = _staging_folder(final)

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
        data_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items() if v is not None}
    save_for_hf(model, out_dir, model_config=model_config, safe_serialization=True, data_config=data_config)

    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
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
    icl["dataset_hub_id"] = hub_dataset_id(icl.get("dataset"))  # decided here, where a local path exists
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
    _replace_folder(out_dir, final)
    return final


# --------------------------------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------------------------------
def _eval_results(results: Mapping[str, Any], dataset: str | None, dataset_name: str) -> list:
    from huggingface_hub import EvalResult

    out = []
    for name, cond in results["conditions"].items():
        # dataset_config carries the condition: the Hub groups metrics into one result per (task, dataset, config)
        common = dict(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset,
            dataset_name=f"{dataset_name} ({name})",
            dataset_config=name,
            dataset_split=results.get("split"),  # the split that was evaluated (None: not recorded)
            dataset_args={"distortion": cond["kind"], "sigma": cond["sigma"]},
        )
        out.append(
            EvalResult(metric_type="accuracy", metric_name="top-1 accuracy", metric_value=cond["top1"], **common)
        )
        if cond.get("top5") is not None:
            out.append(
                EvalResult(metric_type="accuracy", metric_name="top-5 accuracy", metric_value=cond["top5"], **common)
            )
    return out


def render_model_card(
    folder: str | Path, repo_id: str | None = None, *, transformers_ok: bool = True, shown_as: str | Path | None = None
) -> str:
    """Render README.md for an exported folder from its config.json (``icl`` block) and eval_results.json.

    Args:
        folder: an exported folder.
        repo_id: the Hub repository (the card then shows ``hf-hub:<repo_id>``; else ``local-dir:<folder>``).
        shown_as: the folder path the card names (default ``folder``; the export renders in a staging folder).
        transformers_ok: show the transformers snippet (the export drops ``model_args.num_classes``, which makes
            the folder loadable by transformers' TimmWrapper; tested in tests/test_hub.py).
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    icl = config.get("icl", {})
    results_path = folder / RESULTS_NAME
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    model_name = icl.get("model_name") or folder.resolve().name
    dataset = icl.get("dataset")
    dataset_name = {"fashion-mnist": "Fashion-MNIST"}.get(dataset or "", dataset or "evaluation set")
    # a Hub dataset id or nothing: a local path stays in config.json's icl block, never in the metadata
    dataset_id = icl["dataset_hub_id"] if "dataset_hub_id" in icl else hub_dataset_id(dataset)
    base_model = icl.get("base_model")
    if base_model and base_model.startswith("hf-hub:"):
        base_model = base_model[len("hf-hub:") :]
    elif base_model and "/" not in base_model:
        base_model = _hub_id_of_timm_name(base_model) or base_model  # "vgg16" -> "timm/vgg16.tv_in1k"
    method = (icl.get("method") or "icl").lower()
    method_title, method_text = _METHODS.get(method, (method, ""))
    tags = ["timm", "image-classification", "robustness", "gaussian-noise", "gaussian-blur", "timm-icl"]
    if method == "icl":
        tags.append("intermediate-constraint-loss")
    card_data = ModelCardData(
        library_name="timm",
        model_name=model_name,
        base_model=base_model if base_model and "/" in base_model else None,
        datasets=[dataset_id] if dataset_id else None,
        license=icl.get("license") or config.get("pretrained_cfg", {}).get("license"),
        pipeline_tag="image-classification",
        tags=tags,
        metrics=["accuracy"] if results else None,
        eval_results=_eval_results(results, dataset_id, dataset_name) if results and dataset_id else None,
    )
    length_keys = ("epochs", "steps", "epochs_completed")
    skip = ("model_name", "dataset", "dataset_hub_id", "base_model", "license", "method", *length_keys)
    hyperparameters = [("method", method)] + [(k, _format_value(v)) for k, v in icl.items() if k not in skip]
    if any(k in icl for k in length_keys):
        hyperparameters.append(("training length", _training_length(icl)))
    pcfg = config.get("pretrained_cfg", {})
    input_size = pcfg.get("input_size", [3, 224, 224])
    eval_text = ""
    if results:
        eval_text = (
            f"Top-1 accuracy on {dataset_name} ({results.get('num_samples', '?')} images), clean and under each "
            f"condition (distortions `{results.get('distortions', '')}`, noise seed {results.get('seed', 0)}; "
            "reproduce with `timm-icl eval`)."
        )
    load_id = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{shown_as or folder}"
    card = ModelCard.from_template(
        card_data,
        template_str=card_template(),
        model_name=model_name,
        summary=f"A `{config.get('architecture')}` image classifier ({config.get('num_classes')} classes) "
        f"made robust to noise and blur.",
        method_title=method_title,
        method_text=method_text,
        hyperparameters=hyperparameters,
        base_model=base_model,
        base_model_text=(
            f"none on the Hub; the frozen reference was {icl['reference_model']}"
            if icl.get("reference_model")
            else "none (trained from scratch)"
        ),
        license=card_data.license,
        dataset_text=(
            f"Fine-tuned and evaluated on {dataset_name}"
            + (f" (`{dataset_id}`)" if dataset_id and dataset_id != dataset_name else "")
            + "; every training image distorted with one condition drawn from the training distortion set."
            if dataset
            else "Not recorded."
        ),
        load_id=load_id,
        hub_id=repo_id or str(shown_as or folder),
        transformers_ok=transformers_ok,
        input_size=f"{input_size[1]}x{input_size[2]}",
        preprocessing_text=_preprocessing_text(pcfg),
        mean=_format_value(pcfg.get("mean")),
        std=_format_value(pcfg.get("std")),
        results_table=format_table({model_name: results}) if results else "",
        eval_text=eval_text,
        plot=PLOT_NAME if (folder / PLOT_NAME).exists() else None,
    )
    return str(card)


def hub_dataset_id(dataset: str | None) -> str | None:
    """The Hub id of a dataset spec (``"fashion-mnist"`` -> ``zalando-datasets/fashion_mnist``), None for a local
    path or anything that is not ``owner/name``."""
    import re

    if not dataset:
        return None
    if dataset.lower().replace("_", "-") in ("fashion-mnist", "fashionmnist"):
        return FASHION_MNIST_HUB_ID
    if dataset.startswith(("/", ".", "~")) or Path(dataset).expanduser().exists():
        return None
    return dataset if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", dataset) else None


def _training_length(icl: Mapping[str, Any]) -> str:
    """What ran: ``"120 steps, 3 epochs completed (of 40 planned)"``."""
    parts = []
    if icl.get("steps") is not None:
        parts.append(f"{icl['steps']} steps")
    done, planned = icl.get("epochs_completed"), icl.get("epochs")
    if done is not None:
        parts.append(f"{_format_value(done)} epochs completed" + (f" (of {planned} planned)" if planned else ""))
    elif planned is not None:
        parts.append(f"{planned} epochs planned")
    return ", ".join(parts)


def _preprocessing_text(pcfg: Mapping[str, Any]) -> str:
    """The eval view of config.json's pretrained_cfg, in words (timm's ``create_transform`` reads the same keys)."""
    import math

    h, w = pcfg.get("input_size", [3, 224, 224])[-2:]
    crop_pct = float(pcfg.get("crop_pct") or 0.875)
    interpolation = pcfg.get("interpolation") or "bicubic"
    mode = pcfg.get("crop_mode") or "center"
    scale = [math.floor(s / crop_pct) for s in (h, w)]
    if mode == "center":
        geometry = (
            f"resize the shorter side to {max(scale)} px ({interpolation}), then centre-crop {h}x{w} "
            f"(crop_pct {crop_pct:g})"
        )
    elif mode == "squash":
        geometry = f"resize to {scale[0]}x{scale[1]} px ({interpolation}, aspect not kept), then centre-crop {h}x{w}"
    else:
        geometry = f"resize the longer side to {max(scale)} px ({interpolation}), then pad/crop to {h}x{w}"
    return (
        f"{geometry}; scale to [0, 1]; normalise with mean {_format_value(pcfg.get('mean'))} and std "
        f"{_format_value(pcfg.get('std'))}"
    )


def card_template() -> str:
    """The model card template (Jinja2, rendered by huggingface_hub's ``ModelCard.from_template``), package data
    of timm_icl: ``timm_icl/hub/model_cards/template.md``, read with ``importlib.resources`` (wheels, zips,
    editable)."""
    from importlib import resources

    try:
        return resources.files("timm_icl.hub").joinpath("model_cards", "template.md").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError("timm_icl/hub/model_cards/template.md is missing: reinstall timm-icl") from None


def _hub_id_of_timm_name(name: str) -> str | None:
    """The Hub repository of a timm pretrained tag (``"vgg16"`` -> ``"timm/vgg16.tv_in1k"``), if timm knows one."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # unknown names, old timm versions: the card then just names the model
        return None
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(
            f"`{v}`" if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v) for v in value
        )
    if isinstance(value, float):
        return f"{value:g}"
    return f"`{value}`" if isinstance(value, str) else str(value)


# --------------------------------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------------------------------
def resolve_model_folder(path: str | Path) -> Path:
    """An exported folder, or a recipe run folder whose exported model is ``RUN/model``."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise ValueError(
        f"{path} is not an exported model folder (no config.json + model.safetensors, nor model/ with them)"
    )


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or env


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    retries: int = 3,
    is_main_process: bool = True,
) -> str | None:
    """Upload an exported folder to the Hub (main process only), with its card re-rendered for ``repo_id``.

    Every push uploads the card again, so it always matches the weights and numbers (timm's own push writes a
    README only once). The card is uploaded from memory and written to the local folder only after the push
    succeeded: a failed push leaves the folder byte for byte as it was. Weights with NaN/inf are refused. The
    token is passed to huggingface_hub only (default: ``HF_TOKEN`` or the saved login); it is never written to a
    file or a log message.

    Args:
        folder: an exported folder (or a recipe run folder containing ``model/``).
        repo_id: ``"user/name"``.
        token: a write token; ``None`` uses huggingface_hub's own lookup.
        private: create the repository as private (if it does not exist yet).
        commit_message: default ``"Upload <model_name> (timm-icl)"``.
        retries: attempts on transient failures (connection errors, HTTP 429/5xx), with 1, 2, 4 ... s back-off.
        is_main_process: whether this process uploads; in a multi-process job pass e.g.
            ``accelerator.is_main_process`` (the caller knows; the library does not guess from the environment).

    Returns:
        The commit URL, or ``None`` when ``is_main_process`` is False.

    Raises:
        HubError: offline mode, not authorised, or the Hub kept failing; the local folder is left intact.
        ValueError: ``folder`` is not an exported model, its weights are damaged or not finite, or ``repo_id`` is
            malformed.
    """
    folder = resolve_model_folder(folder)
    _check_repo_id(repo_id)
    if not is_main_process:
        return None
    _check_finite_folder(folder, repo_id)
    if _offline():
        raise HubError(
            f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset it to push. "
            f"The exported folder {folder} is unchanged."
        )
    from huggingface_hub import CommitOperationAdd, HfApi

    # HTTPError: the transport errors' base class (httpx's), re-exported by huggingface_hub for this purpose
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, RepositoryNotFoundError

    # The card for this repository (load snippet with hf-hub:<repo_id>) is uploaded from memory; the local README
    # is updated only after the push succeeded, so a failed push leaves the folder exactly as it was.
    card = render_model_card(folder, repo_id)

    config = json.loads((folder / "config.json").read_text())
    message = commit_message or f"Upload {config.get('icl', {}).get('model_name') or folder.name} (timm-icl)"
    api = HfApi(token=token)
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts) and p.name != "README.md"
    ]
    delay = 1.0
    for attempt in range(1, max(1, retries) + 1):
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            operations = [
                CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files
            ]
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
            info = api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
            tmp = folder / ".README.md.tmp"
            tmp.write_text(card)
            os.replace(tmp, folder / "README.md")
            return str(info.commit_url)
        except RepositoryNotFoundError as e:
            raise HubError(_auth_message(repo_id, e)) from None
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                raise HubError(_auth_message(repo_id, e)) from None
            if status is not None and status < 500 and status != 429:
                raise HubError(f"the Hub refused the push to {repo_id} (HTTP {status}): {_first_line(e)}") from None
            last = f"HTTP {status}: {_first_line(e)}"
        except (OSError, HTTPError) as e:  # refused / reset connections, DNS, timeouts: worth another try
            last = f"{type(e).__name__}: {_first_line(e)}"
        if attempt < retries:
            _logger.warning("push to %s failed (%s); retrying in %.0f s", repo_id, last, delay)
            time.sleep(delay)
            delay *= 2
    raise HubError(
        f"push to {repo_id} failed after {retries} attempts ({last}); the exported folder {folder} is intact"
    )


def validate_push(repo_id: str, *, token: str | None = None) -> str:
    """Check, before a long training run, that a push to ``repo_id`` can succeed; one-line errors.

    Checks the repo id's syntax (huggingface_hub's validator, plus a namespace), offline mode, and the token: it
    must exist, be valid (``whoami``), not be read-only, and belong to the namespace (the user or one of their
    organisations where their role is not read; a fine-grained token must name it with a write permission). Whether
    an existing repository accepts this user's writes is known only at the push itself.

    Args:
        repo_id: ``"user/name"``.
        token: a write token; ``None`` uses huggingface_hub's own lookup (``HF_TOKEN`` or the saved login).

    Returns:
        The user name the token belongs to.

    Raises:
        ValueError: a malformed repo id.
        HubError: offline mode, no token, an invalid or read-only token, a namespace the token cannot write to, or
            the Hub cannot be reached.
    """
    _check_repo_id(repo_id)
    if _offline():
        raise HubError(f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset it to push")
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError

    try:
        info = HfApi(token=token).whoami(cache=True)
    except LocalTokenNotFoundError:
        raise HubError(
            f"cannot push to {repo_id}: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise HubError(_auth_message(repo_id, e)) from None
        raise HubError(f"cannot push to {repo_id}: the Hub answered HTTP {status} ({_first_line(e)})") from None
    except (OSError, HTTPError) as e:  # connection errors
        raise HubError(
            f"cannot push to {repo_id}: the Hub at {constants.ENDPOINT} cannot be reached ({_first_line(e)})"
        ) from None
    user = info.get("name")
    namespace = repo_id.split("/")[0]
    orgs = {org.get("name"): org for org in info.get("orgs") or []}
    access = (info.get("auth") or {}).get("accessToken") or {}
    fix = "create a token with write access at https://huggingface.co/settings/tokens and set HF_TOKEN"
    if access.get("role") == "read":
        raise HubError(f"cannot push to {repo_id}: the token of {user!r} is read-only; {fix}")
    if namespace != user and namespace not in orgs:
        raise HubError(
            f"cannot push to {repo_id}: the token belongs to {user!r}, who is not {namespace!r} nor a member of it"
        )
    if namespace in orgs and orgs[namespace].get("roleInOrg") == "read":
        raise HubError(f"cannot push to {repo_id}: {user!r} has only the read role in {namespace!r}")
    if access.get("role") == "fineGrained":
        scoped = (access.get("fineGrained") or {}).get("scoped") or []
        writable = [
            entry
            for entry in scoped
            if (entry.get("entity") or {}).get("name") in (namespace, repo_id)
            and any("write" in permission for permission in entry.get("permissions") or [])
        ]
        if not writable:
            raise HubError(f"cannot push to {repo_id}: the fine-grained token cannot write to {namespace!r}; {fix}")
    return user


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"invalid repo_id {repo_id!r}: {_first_line(e)}") from None


def _check_finite_folder(folder: Path, repo_id: str) -> None:
    """Refuse to push weights that do not load or hold NaN/inf (read one tensor at a time)."""
    from safetensors import SafetensorError, safe_open

    path = folder / "model.safetensors"
    bad, dtypes = [], {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = f.get_tensor(name)
                dtypes[name] = tensor.new_empty(0)  # dtype only: for the count of floating tensors
                bad += non_finite_tensors({name: tensor})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot push {path}: it is damaged or truncated ({_first_line(e)})") from None
    if bad:
        raise ValueError(f"refusing to push {folder} to {repo_id}: {_non_finite_summary(bad, dtypes)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _auth_message(repo_id: str, e: BaseException) -> str:
    return (
        f"not authorised to push to {repo_id}: log in with `hf auth login` or set HF_TOKEN to a token with write "
        f"access to that namespace ({_first_line(e)})"
    )
