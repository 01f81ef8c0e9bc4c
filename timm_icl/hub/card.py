"""The model card of an exported folder: README.md rendered from its config.json and eval_results.json.

The card is huggingface_hub's ``ModelCard`` from the Jinja2 template ``timm_icl/hub/model_cards/template.md``
(package data): what the model is, the method and its settings, the preprocessing in words, the results table and a
model-index entry per condition (the Hub's evaluation widgets), the plot, and how to load it with timm (and
transformers).

Example:
    >>> print(render_model_card("runs/icl/model", "me/vgg16-icl"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..data import hub_dataset_id, is_fashion_mnist
from ..eval.tables import format_table

__all__ = [
    "render_model_card",
    "card_template",
    "hub_dataset_id",
    "describe_dataset",
    "condition_label",
    "RESULTS_NAME",
    "PLOT_NAME",
]

#: The files of an exported folder that the card reads besides config.json.
RESULTS_NAME = "eval_results.json"
PLOT_NAME = "accuracy_vs_sigma.png"

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
    "icl+jsd": (
        "ICL with AugMix's JSD consistency",
        "Fine-tuning on distorted images with the Intermediate Constraint Loss on one distorted view plus timm's "
        "Jensen-Shannon consistency over [distorted, clean, distorted] views: `loss = CE + lambda * ICL + jsd_weight "
        "* JSD`.",
    ),
    "none": (
        "plain fine-tuning on distorted images",
        "Fine-tuning on distorted images with their labels and cross-entropy only (the paper's baseline, lambda = 0).",
    ),
}


def condition_label(name: str, cond: Mapping[str, Any]) -> str:
    """A condition in words for a metric name: ``clean``, ``gaussian noise sigma 30 (0-255)``, ``gaussian blur sigma
    2 px``, ``jpeg level 3``."""
    kind, sigma = cond.get("kind", name), cond.get("sigma")
    if kind == "clean":
        return "clean"
    if kind == "noise":
        return f"gaussian noise sigma {sigma:g} (0-255)"
    if kind == "blur":
        return f"gaussian blur sigma {sigma:g} px"
    return f"{kind} level {sigma:g}" if sigma is not None else str(kind)


def _eval_results(results: Mapping[str, Any], dataset_type: str, dataset_name: str) -> list:
    """One model-index result (task + dataset + split) whose metrics are the conditions: ``top-1 accuracy, clean``,
    ``top-1 accuracy, gaussian noise sigma 30 (0-255)``, ... (``metric_config`` = the condition's name)."""
    from huggingface_hub import EvalResult

    out = []
    common = dict(
        task_type="image-classification",
        task_name="Image Classification",
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        dataset_split=results.get("split"),  # as evaluated: "test[:500]" for the first 500 images
    )
    for name, cond in results["conditions"].items():
        label = condition_label(name, cond)
        for metric in ("top1", "top5"):
            if cond.get(metric) is None:
                continue
            out.append(
                EvalResult(
                    metric_type="accuracy",
                    metric_name=f"top-{metric[-1]} accuracy, {label}",
                    metric_config=name,
                    metric_value=cond[metric],
                    **common,
                )
            )
    return out


def describe_dataset(spec: str | None) -> dict[str, Any]:
    """What a card may say about a dataset spec, without local paths: ``{"name", "source", "hub_id"}``. ``source``
    is ``"hub"``, ``"fashion-mnist"`` (the local IDX files of the Hub's dataset), ``"webdataset"``, ``"parquet"``,
    ``"imagefolder"`` or ``"local"``; ``name`` a Hub id or a local folder's own name."""
    if not spec:
        return {"name": None, "source": None, "hub_id": None}
    if is_fashion_mnist(spec):
        return {"name": "Fashion-MNIST", "source": "fashion-mnist", "hub_id": hub_dataset_id(spec)}
    hub_id = hub_dataset_id(spec)
    if hub_id is not None:
        return {"name": hub_id, "source": "hub", "hub_id": hub_id}
    path = Path(spec).expanduser()
    name = path.resolve().name if path.exists() else path.name
    source = "local"
    if path.is_dir():
        if any(path.rglob("*.tar")):
            source = "webdataset"
        elif any(path.rglob("*.parquet")):
            source = "parquet"
        else:
            source = "imagefolder"
    return {"name": name or "local data", "source": source, "hub_id": None}


_SOURCE_WORDS = {
    "webdataset": "a local webdataset (tar shards)",
    "parquet": "local parquet files",
    "imagefolder": "a local image folder",
    "local": "local data",
}


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
    source = icl.get("dataset_source")
    local_data = source not in (None, "hub", "fashion-mnist")
    # an export records a local folder by its name only (dataset_source says what it is); older ones: the spec
    described = describe_dataset(icl.get("dataset")) if not local_data else {"name": icl.get("dataset")}
    dataset_id = icl["dataset_hub_id"] if "dataset_hub_id" in icl else described.get("hub_id")
    source = source or described.get("source")
    local_data = source not in (None, "hub", "fashion-mnist")
    dataset_name = described.get("name") or "evaluation set"
    base_model = icl.get("base_model")
    if base_model and base_model.startswith("hf-hub:"):
        base_model = base_model[len("hf-hub:") :]
    elif base_model and "/" not in base_model:
        base_model = _hub_id_of_timm_name(base_model) or base_model  # "vgg16" -> "timm/vgg16.tv_in1k"
    method = (icl.get("method") or "icl").lower()
    method_title, method_text = _METHODS.get(method, (method, ""))
    tags = ["timm", "image-classification", "robustness", "timm-icl"]
    kinds = (results or {}).get("conditions", {})
    for kind in sorted({c.get("kind") for c in kinds.values()} - {"clean", None}):
        tags.append({"noise": "gaussian-noise", "blur": "gaussian-blur"}.get(kind, kind.replace("_", "-")))
    if method == "icl":
        tags.append("intermediate-constraint-loss")
    license_id = icl.get("license")  # only what the exporter stated; never the architecture's tag
    card_data = ModelCardData(
        library_name="timm",
        model_name=model_name,
        base_model=base_model if base_model and "/" in base_model else None,
        datasets=[dataset_id] if dataset_id else None,
        license=license_id,
        pipeline_tag="image-classification",
        tags=tags,
        metrics=["accuracy"] if results else None,
        eval_results=(
            _eval_results(results, dataset_id or source or "local", dataset_name if not local_data else
                          f"{dataset_name} ({_SOURCE_WORDS.get(source, 'local data')}, not on the Hub)")
            if results
            else None
        ),
    )  # fmt: skip
    length_keys = ("epochs", "steps", "epochs_completed")
    skip = (
        "model_name",
        "dataset",
        "dataset_hub_id",
        "dataset_source",
        "base_model",
        "license",
        "method",
        "starting_weights",
        "weights_origin",
        "reference",
        *length_keys,
    )
    hyperparameters = [("method", method)] + [(k, _format_value(v)) for k, v in icl.items() if k not in skip]
    if any(k in icl for k in length_keys):
        hyperparameters.append(("training length", _training_length(icl)))
    pcfg = config.get("pretrained_cfg", {})
    input_size = pcfg.get("input_size", [3, 224, 224])
    eval_text = ""
    if results:
        split = results.get("split")
        eval_text = (
            f"Top-1 accuracy on {results.get('num_samples', '?')} images of {dataset_name}"
            + (f", split `{split}`" if split else "")
            + f", clean and under each condition (distortions `{results.get('distortions', '')}`, noise seed "
            f"{results.get('seed', 0)}; reproduce with `timm-icl eval`)."
        )
    # never a local path in a card: an exported folder is named by its own name until it is pushed
    load_id = f"hf-hub:{repo_id}" if repo_id else f"local-dir:path/to/{Path(shown_as or folder).name}"
    start = icl.get("starting_weights") or (f"`{base_model}`" if base_model else None)
    if icl.get("reference"):
        reference_text = f"The constraint's reference network is {icl['reference']}."
    elif method in ("icl", "mse", "ab", "icl+jsd"):
        reference_text = "The constraint's reference network is a frozen copy of the starting weights."
    else:
        reference_text = f"The `{method}` objective uses no frozen reference network."
    if local_data:
        data_words = f"{_SOURCE_WORDS.get(source, 'local data')} named `{dataset_name}` (not on the Hub)"
    else:
        data_words = f"{dataset_name}" + (f" (`{dataset_id}`)" if dataset_id and dataset_id != dataset_name else "")
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
        start_text=start or "weights that were not recorded",
        base_model_text="none on the Hub" + (f" (started from {start})" if start else ""),
        reference_text=reference_text,
        license=license_id,
        dataset_text=(
            f"Fine-tuned and evaluated on {data_words}; every training image distorted with one condition drawn "
            "from the training distortion set."
            if icl.get("dataset")
            else "Not recorded."
        ),
        load_id=load_id,
        hub_id=repo_id or f"path/to/{Path(shown_as or folder).name}",
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
