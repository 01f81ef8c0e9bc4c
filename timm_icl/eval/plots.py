"""Plots of evaluation results: accuracy against distortion strength (:func:`plot_accuracy_vs_sigma`).

Example:
    >>> plot_accuracy_vs_sigma({"fine-tune": r0, "ICL": [r1_seed0, r1_seed1]}, "acc.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .stats import GROUPS, Result, as_runs, condition_names, mean_std, registered_kinds

__all__ = ["plot_accuracy_vs_sigma"]


def plot_accuracy_vs_sigma(
    results_by_name: Mapping[str, Result | Sequence[Result]],
    path: str | Path,
    *,
    metric: str = "top1",
    title: str | None = None,
    reference: Result | None = None,
) -> Path:
    """PNG of accuracy against sigma, one line per model (error bars: std over seeds), one panel per kind.

    Each line starts at sigma 0 with the clean accuracy. ``reference`` (e.g. the model before fine-tuning) is drawn
    dashed. Uses matplotlib's Agg backend (no display).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'timm-icl[plot]'") from None
    if not results_by_name:
        raise ValueError("plot_accuracy_vs_sigma needs at least one result")
    all_runs = [r for v in results_by_name.values() for r in as_runs(v)]
    _REGISTRY = registered_kinds()

    present = dict.fromkeys(c["kind"] for r in all_runs for c in r["conditions"].values())
    # noise and blur first, then every other kind (camera corruptions) grouped by family, one panel each
    others = sorted((k for k in present if k not in GROUPS), key=lambda k: _REGISTRY[k].family if k in _REGISTRY else k)
    kinds = [k for k in ("noise", "blur") if k in present] + others
    kinds = kinds or ["noise"]
    ncols = min(len(kinds), 5)
    nrows = math.ceil(len(kinds) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(kinds) :]:
        ax.set_visible(False)
    units = {"noise": "noise sigma (0-255 pixel units)", "blur": "blur sigma (pixels)"}
    units.update({k: f"severity ({_REGISTRY[k].unit or 'value'})" for k in others if k in _REGISTRY})
    lines = ([("reference", reference, {"linestyle": "--", "color": "k"})] if reference is not None else []) + [
        (method, value, {}) for method, value in results_by_name.items()
    ]
    for ax, kind in zip(axes.flat, kinds):
        for method, value, style in lines:
            runs = as_runs(value)
            names = condition_names(runs[0]["conditions"], "clean") + condition_names(runs[0]["conditions"], kind)
            names = [n for n in names if all(n in r["conditions"] for r in runs)]
            if not names:
                continue
            xs = [runs[0]["conditions"][n]["sigma"] if n != "clean" else 0.0 for n in names]
            stats = [mean_std([r["conditions"][n][metric] for r in runs]) for n in names]
            ys, errs = [m for m, _ in stats], [s for _, s in stats]
            if len(runs) > 1:
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=method, **style)
            else:
                ax.plot(xs, ys, marker="o", label=method, **style)
        ax.set_xlabel(units.get(kind, "severity"))
        ax.set_ylabel(f"top-{metric[3:]} accuracy" if metric.startswith("top") else metric)
        family = _REGISTRY[kind].family if kind in _REGISTRY else ""
        ax.set_title(f"Gaussian {kind}" if kind in GROUPS else f"{kind} ({family})" if family != kind else kind)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
