"""Plots of evaluation results: accuracy against distortion strength (:func:`plot_accuracy_vs_sigma`).

What a reader sees at a glance:

- one panel per kind, the kinds of one family (noise, blur, weather, digital, then any other) on one row;
- ImageNet-C's corruptions on their levels 1-5; Gaussian noise and blur at ImageNet-C's sigmas on the same levels,
  each tick labelled with its sigma; the paper's sets (other sigmas) against sigma itself; clean at 0;
- every model in the same colour in every panel, the baseline (``reference``) dashed black, one legend for the figure;
- a shaded 95% interval over the images around each line (Wilson for one run, the per-image interval for seeds) and,
  with seeds, error bars of their sample standard deviation; the legend's title says how many images.

Example:
    >>> plot_accuracy_vs_sigma({"fine-tune": r0, "ICL": [r1_seed0, r1_seed1]}, "acc.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .stats import Result, as_runs, condition_names, mean_interval, mean_std, registered_kinds, wilson_interval

__all__ = [
    "plot_accuracy_vs_sigma",
    "imagenet_c_level",
    "at_imagenet_c_levels",
    "kind_title",
    "distortion_panel_title",
    "distortion_grid_title",
]

_FAMILY_ORDER = ("noise", "blur", "weather", "digital")
_LEVEL_UNIT = "ImageNet-C level"
_SIGMA_UNITS = {"noise": "0-255", "blur": "px"}
_NAMES = {"noise": "Gaussian noise", "blur": "Gaussian blur", "jpeg": "JPEG", "jpeg_quality": "JPEG quality"}


def _imagenet_c_sigmas() -> dict[str, tuple[float, ...]]:
    from ..distortions import IMAGENET_C_DISTORTIONS

    return {k: tuple(c.sigma for c in IMAGENET_C_DISTORTIONS.of_kind(k)) for k in ("noise", "blur")}


def imagenet_c_level(kind: str, sigma: float) -> int | None:
    """ImageNet-C's level (1-5) of a Gaussian ``noise`` or ``blur`` sigma, or None if it is not one of its five."""
    sigmas = _imagenet_c_sigmas().get(kind, ())
    return next((i + 1 for i, s in enumerate(sigmas) if math.isclose(s, sigma, abs_tol=1e-3)), None)


def at_imagenet_c_levels(kind: str, sigmas: Sequence[float]) -> bool:
    """Whether every sigma of a Gaussian ``noise``/``blur`` kind is one of ImageNet-C's five (then it is drawn on
    levels); the paper's blur 2..10 shares 2, 4 and 6 with ImageNet-C's but is not its set."""
    return bool(sigmas) and kind in _SIGMA_UNITS and all(imagenet_c_level(kind, s) for s in sigmas)


def kind_title(kind: str) -> str:
    """A kind's name for a reader: ``"Gaussian noise"``, ``"shot noise"``, ``"JPEG"``."""
    return _NAMES.get(kind, kind.replace("_", " "))


def distortion_panel_title(condition: Any, at_levels: bool = False) -> str:
    """One condition's strength, short enough for a thumbnail (its kind labels the row): ``"σ=20 (0-255)"``,
    ``"level 1: σ=20.4 (0-255)"`` when its kind is at ImageNet-C's sigmas (``at_levels``), ``"level 3"``,
    ``"JPEG quality 25"``, ``"clean"``."""
    kind, sigma = condition.kind, condition.sigma
    if kind == "clean":
        return "clean"
    if kind in _SIGMA_UNITS:
        level = imagenet_c_level(kind, sigma) if at_levels else None
        text = f"σ={sigma:g}" + (" (0-255)" if kind == "noise" else " px")
        return f"level {level}: {text}" if level else text
    unit = registered_kinds()[kind].unit if kind in registered_kinds() else ""
    if unit == _LEVEL_UNIT:
        return f"level {sigma:g}"
    return f"{unit} {sigma:g}" if unit else f"{sigma:g}"


_SET_NAMES = {
    "paper": "the paper's noise and blur",
    "imagenet-c": "ImageNet-C's Gaussian noise and blur, levels 1-5",
    "imagenet-c-10": "10 ImageNet-C corruptions, levels 1-5",
    "small": "noise and blur for 28 px images",
}


def distortion_grid_title(image_name: str, size: int, spec: str | None, distortions: Any) -> str:
    """The distort grid's title: the image, its size and the set by name (each row names its kind, so the whole
    spec is not repeated), wrapped to two short lines at most."""
    key = (spec or "paper").strip().lower().replace("_", "-")
    key = {"default": "paper", "imagenetc": "imagenet-c", "28px": "small", "fashion-mnist": "small"}.get(key, key)
    kinds = distortions.kinds()
    if key in _SET_NAMES:
        what = f"{key} ({_SET_NAMES[key]})"
    else:
        what = spec if spec and len(spec) <= 50 else f"{len(distortions)} conditions of {len(kinds)} kinds"
    return f"{image_name}, {size} px: {what}"


def _interval(runs: Sequence[Result], name: str) -> tuple[float, float]:
    """95% interval over images of one condition: per-image (seeds averaged first) when kept, else Wilson of one
    run's counts, else (nan, nan)."""
    if all(name in r.get("per_image", {}) for r in runs):
        per_image = [sum(v) / len(v) for v in zip(*(r["per_image"][name] for r in runs))]
        _, low, high = mean_interval(per_image)
        if len(runs) == 1 and not math.isnan(low):  # one run: 0/1 scores, Wilson is the better interval
            return wilson_interval(sum(per_image), len(per_image))
        return low, high
    c = runs[0]["conditions"][name]
    if len(runs) == 1 and "correct" in c and "count" in c:
        return wilson_interval(c["correct"], c["count"])
    return math.nan, math.nan


def _dataset_name(dataset: str) -> str:
    """A local folder by its name (a figure is shared; its path is nobody else's), anything else as given."""
    path = Path(str(dataset))
    return path.name if path.is_absolute() or str(dataset).startswith(".") or path.is_dir() else str(dataset)


def _image_counts(runs_by_name: Mapping[str, Sequence[Result]]) -> str:
    counts = {}
    for name, runs in runs_by_name.items():
        values = {c.get("count") for r in runs for c in r["conditions"].values()} - {None}
        if not values:
            values = {r.get("num_samples") for r in runs} - {None}
        if values:
            counts[name] = "/".join(f"{v:,}" for v in sorted(values))
    if not counts:
        return "number of images not recorded"
    where = {
        f"{_dataset_name(r['dataset'])} {r.get('split')}"
        for rs in runs_by_name.values()
        for r in rs
        if r.get("dataset")
    }
    on = f" of {where.pop()}" if len(where) == 1 else ""
    if len(set(counts.values())) == 1:
        return f"{next(iter(counts.values()))} images{on} per condition"
    return "images per condition: " + ", ".join(f"{n} {c}" for n, c in counts.items())


def _layout(kinds: list[str], registry: Mapping[str, Any], text_order: list[str]) -> tuple[list[list[str]], bool]:
    """Rows of panels and whether each row is a family: one row per family (noise, blur, weather, digital, others),
    the Gaussian kind first in its family, then the evaluated set's order; rows of up to five panels when every
    family has one kind."""
    rank = {k: i for i, k in enumerate(text_order)}
    families: dict[str, list[str]] = {}
    for kind in sorted(kinds, key=lambda k: (k not in ("noise", "blur"), rank.get(k, len(rank)), k)):
        family = registry[kind].family if kind in registry else kind
        families.setdefault(family, []).append(kind)
    order = [f for f in _FAMILY_ORDER if f in families] + [f for f in families if f not in _FAMILY_ORDER]
    rows = [families[f] for f in order]
    if max(len(r) for r in rows) == 1:
        flat = [r[0] for r in rows]
        return [flat[i : i + 5] for i in range(0, len(flat), 5)], False
    return rows, True


def plot_accuracy_vs_sigma(
    results_by_name: Mapping[str, Result | Sequence[Result]],
    path: str | Path,
    *,
    metric: str = "top1",
    title: str | None = None,
    reference: Result | Sequence[Result] | None = None,
    reference_name: str = "reference",
) -> Path:
    """PNG of accuracy against distortion strength, one line per model, one panel per kind (see the module text).

    Args:
        results_by_name: ``{name: result}`` or ``{name: [result per seed]}``.
        path: where the PNG goes.
        metric: ``"top1"`` or ``"top5"``.
        title: figure title (wrapped to the figure's width).
        reference: a baseline (e.g. the model before fine-tuning, ``timm-icl eval --baseline``), drawn dashed black.
        reference_name: its legend label.

    Uses matplotlib's Agg backend (no display).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'timm-icl[plot]'") from None
    if not results_by_name:
        raise ValueError("plot_accuracy_vs_sigma needs at least one result")
    registry = registered_kinds()
    lines: list[tuple[str, list[Result], dict]] = []
    if reference is not None:
        lines.append((reference_name, as_runs(reference), {"linestyle": "--", "color": "k"}))
    for i, (name, value) in enumerate(results_by_name.items()):
        lines.append((name, as_runs(value), {"color": f"C{i}"}))
    all_runs = [r for _, runs, _ in lines for r in runs]

    present = list(dict.fromkeys(c["kind"] for r in all_runs for c in r["conditions"].values() if c["kind"] != "clean"))
    text_order = [g.partition(":")[0] for r in all_runs for g in str(r.get("distortions", "")).split()]
    rows, by_family = _layout(present, registry, list(dict.fromkeys(text_order))) if present else ([["noise"]], False)

    def sigmas_of(kind: str) -> list[float]:
        return sorted({c["sigma"] for r in all_runs for c in r["conditions"].values() if c["kind"] == kind})

    # levels on every panel when any ImageNet-C corruption is drawn, or when noise/blur are at ImageNet-C's sigmas
    gaussian = [k for k in present if k in _SIGMA_UNITS]
    at_levels = {k: at_imagenet_c_levels(k, sigmas_of(k)) for k in gaussian}
    level_kinds = [k for k in present if k in registry and registry[k].unit == _LEVEL_UNIT]
    use_levels = bool(level_kinds) or (bool(gaussian) and all(at_levels.values()))

    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(3.6 * ncols, 3.0 * len(rows) + 1.2), squeeze=False, sharey=True, layout="constrained"
    )
    ylabel = f"top-{metric[3:]} accuracy" if metric.startswith("top") else metric
    seeds = max(len(runs) for _, runs, _ in lines)
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(row):
                ax.set_visible(False)
                continue
            kind = row[c]
            levels = use_levels and (kind in level_kinds or at_levels.get(kind, False))
            for label, runs, style in lines:
                names = condition_names(runs[0]["conditions"], "clean") + condition_names(runs[0]["conditions"], kind)
                names = [n for n in names if all(n in x["conditions"] for x in runs)]
                if len(names) <= (1 if "clean" in names else 0):
                    continue
                sig = [runs[0]["conditions"][n]["sigma"] if n != "clean" else 0.0 for n in names]
                xs = [imagenet_c_level(kind, s) or 0 for s in sig] if levels and kind in _SIGMA_UNITS else sig
                stats = [mean_std([x["conditions"][n][metric] for x in runs]) for n in names]
                ys, errs = [m for m, _ in stats], [s for _, s in stats]
                if len(runs) > 1:
                    ax.errorbar(xs, ys, yerr=errs, marker="o", ms=4, capsize=3, label=label, **style)
                else:
                    ax.plot(xs, ys, marker="o", ms=4, label=label, **style)
                if metric == "top1":
                    low, high = zip(*(_interval(runs, n) for n in names))
                    if not any(math.isnan(v) for v in low):
                        ax.fill_between(xs, low, high, color=style["color"], alpha=0.15, linewidth=0)
            if levels:
                ticks = [0, 1, 2, 3, 4, 5]
                if kind in _SIGMA_UNITS:
                    by_level = {imagenet_c_level(kind, s): s for s in sigmas_of(kind)}
                    tick_labels = ["clean"] + [f"{t}\n{by_level[t]:g}" if t in by_level else str(t) for t in ticks[1:]]
                    ax.set_xlabel(f"ImageNet-C level (below: σ, {_SIGMA_UNITS[kind]})")
                else:
                    tick_labels = ["clean"] + [str(t) for t in ticks[1:]]
                    ax.set_xlabel("ImageNet-C level")
                ax.set_xticks(ticks, tick_labels)
            elif kind in _SIGMA_UNITS:
                ax.set_xlabel(f"{kind} sigma ({registry[kind].unit})")
            else:
                unit = registry[kind].unit if kind in registry else ""
                ax.set_xlabel(f"severity ({unit})" if unit else "severity")
            ax.set_title(kind_title(kind))
            if c == 0:
                family = registry[row[0]].family if row[0] in registry else row[0]
                ax.set_ylabel(f"{family}\n{ylabel}" if by_family else ylabel)
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)

    # one legend for the figure: every line's handle once, the reference first; its title: what the figure rests on
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    note = _image_counts({label: runs for label, runs, _ in lines})
    if metric == "top1":
        note += "; shaded: 95% interval over the images"
    if seeds > 1:
        note += "; bars: std over a model's seeds"
    labels = [label for label, _, _ in lines if label in handles]
    seed_counts = {label: len(runs) for label, runs, _ in lines}
    shown = [f"{label} ({seed_counts[label]} seeds)" if seed_counts[label] > 1 else label for label in labels]
    width_chars = int(fig.get_figwidth() * 72 / (9 * 0.55))  # ~ characters of 9 pt text across the figure
    fig.legend(
        [handles[label] for label in labels],
        shown,
        loc="outside lower center",
        ncols=min(len(labels), 4),
        title="\n".join(textwrap.wrap(note, width_chars)),
        title_fontsize=9,
        fontsize=9,
        frameon=False,
    )
    if title:
        width_chars = int(fig.get_figwidth() * 72 / (12 * 0.6))  # ~ characters of a 12 pt title across the figure
        fig.suptitle("\n".join(textwrap.wrap(title, width_chars)), fontsize=12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
