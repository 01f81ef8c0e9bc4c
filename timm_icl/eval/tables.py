"""Markdown tables of evaluation results: the paper's layout (:func:`format_table`), intervals and paired tests
against a baseline (:func:`format_comparison`), and ImageNet-C's corruption errors (:func:`mean_corruption_error`,
:func:`format_corruption_table`).

Each takes, per run name, one result or a list of results (one per training seed, evaluated on the same images):
tables then print mean ± std over the seeds, and paired tests average each image's correctness over the seeds.

Example:
    >>> print(format_table({"fine-tune": r0, "ICL": r1}))                         # doctest: +SKIP
    >>> print(format_comparison({"fine-tune": r0, "ICL": r1}, baseline="fine-tune"))   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .stats import (
    GROUPS,
    Result,
    as_runs,
    compare_runs,
    group_stats,
    mean_std,
    registered_kinds,
    sort_conditions,
    summarize,
)

__all__ = ["format_table", "format_comparison", "mean_corruption_error", "format_corruption_table"]


def _cell_mean_std(values: Sequence[float | None], digits: int, scale: float, with_std: bool) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if with_std and len(values) > 1 else f"{mean:.{digits}f}"


def format_table(
    results_by_name: Mapping[str, Result | Sequence[Result]],
    *,
    metric: str = "top1",
    digits: int = 4,
    percent: bool = False,
) -> str:
    """Markdown table in the paper's layout: method | clean | noise mean | blur mean | each sigma.

    Args:
        results_by_name: ``{method name: result}`` or ``{method name: [result per seed]}`` (cells then show
            mean ± std over the seeds for clean and the group means, the mean for each sigma).
        metric: ``"top1"`` (the paper's) or ``"top5"``; the means are over the same metric.
        digits: decimals (the paper prints 4: 0.6744).
        percent: print percentages (0.6744 -> 67.44 with ``digits=2``).
    """
    if not results_by_name:
        raise ValueError("format_table needs at least one result")
    merged: dict[str, Mapping[str, Any]] = {}
    for value in results_by_name.values():
        for res in as_runs(value):
            for name, c in res["conditions"].items():
                merged.setdefault(name, c)
    columns = [n for n in sort_conditions(merged) if merged[n]["kind"] != "clean"]
    # every other kind (ImageNet-C's, registered ones) gets its mean column too, in the conditions' order
    extra = list(dict.fromkeys(merged[n]["kind"] for n in columns if merged[n]["kind"] not in ("noise", "blur")))
    header = ["method", "clean", "noise mean", "blur mean"] + [f"{k} mean" for k in extra] + columns
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    scale = 100.0 if percent else 1.0
    for method, value in results_by_name.items():
        runs = as_runs(value)
        summaries = [summarize(r["conditions"], metric) for r in runs]
        cells = [method] + [_cell_mean_std([s[g] for s in summaries], digits, scale, True) for g in GROUPS]
        for kind in extra:
            means = []
            for r in runs:
                values = [c.get(metric) for c in r["conditions"].values() if c["kind"] == kind]
                values = [v for v in values if v is not None]
                means.append(sum(values) / len(values) if values else None)
            cells.append(_cell_mean_std(means, digits, scale, True))
        for name in columns:
            values = [r["conditions"][name].get(metric) if name in r["conditions"] else None for r in runs]
            cells.append(_cell_mean_std(values, digits, scale, False))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interval_cell(stats: tuple[float, float, float] | None, digits: int) -> str:
    if stats is None:
        return "-"
    mean, low, high = stats
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _p(p: float) -> str:
    if p < 1e-300:  # below double precision's normal range: erfc underflows to 0
        return "< 1e-300"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def format_comparison(
    results_by_name: Mapping[str, Result | Sequence[Result]],
    *,
    baseline: str | None = None,
    digits: int = 4,
    per_condition: bool = False,
) -> str:
    """Markdown: top-1 with 95% intervals per run, then paired tests of each run against the baseline.

    Args:
        results_by_name: ``{run name: result}`` or ``{run name: [result per seed]}`` (per-image lists needed for
            the tests; with seeds, run ``i`` of a method is paired with run ``i`` of the baseline).
        baseline: run every other run is tested against (default: the first).
        digits: decimals.
        per_condition: also test every single condition, not only clean / noise / blur.
    """
    if not results_by_name:
        raise ValueError("nothing to compare")
    names = list(results_by_name)
    baseline = baseline if baseline is not None else names[0]
    if baseline not in results_by_name:
        raise ValueError(f"baseline {baseline!r} is not one of the runs: {', '.join(names)}")
    seeds = max(len(as_runs(v)) for v in results_by_name.values())
    lines = [
        "| run | images | clean top-1 [95% CI] | noise mean [95% CI] | blur mean [95% CI] |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for name, value in results_by_name.items():
        count = next(iter(as_runs(value)[0]["conditions"].values()))["count"]
        cells = [_interval_cell(group_stats(value, g), digits) for g in GROUPS]
        lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")

    others = [n for n in names if n != baseline]
    if not others:
        return "\n".join(lines)
    base = as_runs(results_by_name[baseline])
    over = "the group's sigmas" + (" and the seeds" if seeds > 1 else "")
    lines += [
        "",
        f"Paired tests against **{baseline}** on the same images: McNemar (exact) for one condition of one run; "
        f"otherwise a paired z-test on each image's accuracy averaged over {over} (the sigmas and seeds of one "
        "image are not independent trials, so pooling them into one McNemar test would overstate significance).",
        "",
        "| run | group | delta top-1 | right only here | right only in baseline | test | p-value | delta 95% CI |"
        + (" runs better |" if seeds > 1 else ""),
        "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |" + (" ---: |" if seeds > 1 else ""),
    ]
    for name in others:
        runs = as_runs(results_by_name[name])
        groups = list(GROUPS) + (
            [n for n in sort_conditions(runs[0]["conditions"]) if n != "clean"] if per_condition else []
        )
        for group in groups:
            try:
                test = compare_runs(runs, base, group)
            except ValueError as e:
                lines.append(f"| {name} | {group} | - | - | - | - | n/a: {e} | - |" + (" - |" if seeds > 1 else ""))
                continue
            if test is None:
                continue
            delta, low, high = test["mean_difference"], test["low"], test["high"]
            row = f"| {name} | {group} | {delta:+.{digits}f} | {test['a_only']} | {test['b_only']} | {test['test']} | "
            row += f"{_p(test['p_value'])} | [{low:+.{digits}f}, {high:+.{digits}f}] |"
            if seeds > 1:
                row += f" {test['runs_better']}/{test['runs']} |"
            lines.append(row)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# corruption benchmark: ImageNet-C's mean corruption error
# ---------------------------------------------------------------------------------------------------------------------
def _condition_means(results: Result | Sequence[Result], metric: str) -> dict[str, dict[str, Any]]:
    """``{condition name: {"kind", "sigma", metric}}`` with the metric averaged over the runs (seeds) given."""
    runs = as_runs(results)
    out: dict[str, dict[str, Any]] = {}
    conditions = runs[0]["conditions"]
    # kinds in the order of the evaluated set's text ("noise:.. shot_noise:.."), not alphabetical as in JSON files
    text_order = [group.partition(":")[0] for group in str(runs[0].get("distortions", "")).split()]
    rank = {kind: i for i, kind in enumerate(["clean"] + text_order)}
    order = sorted(conditions, key=lambda n: (rank.get(conditions[n]["kind"], len(rank)), conditions[n]["sigma"], n))
    for name in order:
        values = [r["conditions"][name][metric] for r in runs if name in r["conditions"]]
        if len(values) == len(runs):
            c = runs[0]["conditions"][name]
            out[name] = {"kind": c["kind"], "sigma": c["sigma"], metric: sum(values) / len(values)}
    return out


def mean_corruption_error(
    results: Result | Sequence[Result], baseline: Result | Sequence[Result], *, metric: str = "top1"
) -> dict[str, Any]:
    """ImageNet-C's corruption errors of ``results`` normalised by a ``baseline`` model's (Hendrycks & Dietterich).

    For each corruption (kind) ``c`` with severities ``s`` and errors ``E = 1 - top-1``::

        CE_c = sum_s E_{s,c} / sum_s E^baseline_{s,c}                  mCE = mean_c CE_c
        relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^baseline_{s,c} - E^baseline_clean)

    Args:
        results, baseline: one result each, or one per seed (accuracies are averaged over the seeds first); the
            baseline must have every condition of ``results``.
        metric: ``"top1"`` (ImageNet-C's) or ``"top5"``.

    Returns:
        ``{"corruptions": {kind: {"top1", "error_sum", "baseline_error_sum", "ce", "relative_ce"}}, "mce",
        "relative_mce", "relative_mce_defined", "relative_undefined", "clean_error", "baseline_clean_error"}``
        (``top1`` is the mean over the kind's severities;
        a relative CE is ``nan`` when the baseline loses nothing on that corruption: its error there is not above
        its clean error, and the relative CE divides by that difference; ``relative_mce`` is then ``nan`` too, and
        ``"relative_undefined"`` names those corruptions and ``"relative_mce_defined"`` averages the others).

    Raises:
        ValueError: a condition is missing from the baseline, or the baseline makes no error on a corruption.
    """
    mine, base = _condition_means(results, metric), _condition_means(baseline, metric)
    missing = [n for n in mine if n not in base]
    if missing:
        raise ValueError(f"the baseline was not evaluated on {', '.join(missing)}; evaluate it on the same set")
    if "clean" not in mine or "clean" not in base:
        raise ValueError("both results need the clean condition (evaluate_robustness always reports it)")
    clean_err, base_clean_err = 1.0 - mine["clean"][metric], 1.0 - base["clean"][metric]
    corruptions: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(c["kind"] for c in mine.values()):
        if kind == "clean":
            continue
        names = [n for n, c in mine.items() if c["kind"] == kind]
        err = sum(1.0 - mine[n][metric] for n in names)
        base_err = sum(1.0 - base[n][metric] for n in names)
        if base_err <= 0:
            raise ValueError(f"the baseline makes no error on {kind}: its corruption error cannot be normalised")
        rel_denominator = base_err - len(names) * base_clean_err
        corruptions[kind] = {
            metric: sum(mine[n][metric] for n in names) / len(names),
            "error_sum": err,
            "baseline_error_sum": base_err,
            "ce": err / base_err,
            "relative_ce": (err - len(names) * clean_err) / rel_denominator if rel_denominator > 0 else math.nan,
        }
    if not corruptions:
        raise ValueError("no corrupted conditions in these results: nothing to compute a corruption error of")
    rel = [c["relative_ce"] for c in corruptions.values()]
    defined = [r for r in rel if not math.isnan(r)]
    return {
        "corruptions": corruptions,
        "mce": sum(c["ce"] for c in corruptions.values()) / len(corruptions),
        "relative_mce": sum(rel) / len(rel),
        "relative_mce_defined": sum(defined) / len(defined) if defined else math.nan,
        "relative_undefined": [k for k, c in corruptions.items() if math.isnan(c["relative_ce"])],
        "clean_error": clean_err,
        "baseline_clean_error": base_clean_err,
    }


def format_corruption_table(
    results_by_name: Mapping[str, Result | Sequence[Result]],
    baseline: Result | Sequence[Result] | None = None,
    *,
    digits: int = 4,
    percent: bool = True,
) -> str:
    """Markdown: per corruption (kind), each run's mean top-1 over the severities and, with a ``baseline``, its
    corruption error (CE); then the clean top-1 and, with a baseline, mCE and relative mCE
    (:func:`mean_corruption_error`).

    CE and mCE print as percentages by default, as ImageNet-C tables do (100 = the baseline's error).
    """
    if not results_by_name:
        raise ValueError("format_corruption_table needs at least one result")
    _REGISTRY = registered_kinds()

    means = {name: _condition_means(value, "top1") for name, value in results_by_name.items()}
    scores = {n: mean_corruption_error(v, baseline) for n, v in results_by_name.items()} if baseline is not None else {}
    cols = ("top-1", "CE") if baseline is not None else ("top-1",)
    scale = 100.0 if percent else 1.0
    kinds = [k for k in dict.fromkeys(c["kind"] for m in means.values() for c in m.values()) if k != "clean"]
    header = ["corruption", "family"] + [f"{name} {col}" for name in means for col in cols]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- |" + " ---: |" * (len(cols) * len(means))]

    def row(label: str, cells: list[str], family: str = "") -> str:
        return "| " + " | ".join([label, family] + cells) + " |"

    for kind in kinds:
        cells = []
        for name, m in means.items():
            values = [c["top1"] for c in m.values() if c["kind"] == kind]
            cells.append(f"{sum(values) / len(values):.{digits}f}" if values else "-")
            if scores:
                c = scores[name]["corruptions"].get(kind)
                cells.append(f"{scale * c['ce']:.1f}" if c else "-")
        lines.append(row(kind, cells, _REGISTRY[kind].family if kind in _REGISTRY else ""))
    pad = [""] if scores else []
    lines.append(
        row("**clean top-1**", [x for m in means.values() for x in [f"{m['clean']['top1']:.{digits}f}"] + pad])
    )
    if scores:
        lines.append(row("**mCE**", [x for s in scores.values() for x in ("", f"{scale * s['mce']:.1f}")]))

        def relative(s: Mapping[str, Any]) -> str:
            return "undefined (see below)" if math.isnan(s["relative_mce"]) else f"{scale * s['relative_mce']:.1f}"

        lines.append(row("**relative mCE**", [x for s in scores.values() for x in ("", relative(s))]))
        undefined = sorted({k for s in scores.values() for k in s["relative_undefined"]})
        if undefined:
            base_clean = 1.0 - next(iter(scores.values()))["baseline_clean_error"]
            others = ", ".join(
                f"{name} {scale * s['relative_mce_defined']:.1f}"
                for name, s in scores.items()
                if not math.isnan(s["relative_mce_defined"])
            )
            lines.append("")
            lines.append(
                "Relative mCE is undefined here: relative CE divides a model's drop from clean accuracy by the "
                f"baseline's, and the baseline loses nothing under {', '.join(undefined)} (its mean top-1 over "
                f"their severities is not below its clean {base_clean:.{digits}f}). "
                + (f"Over the other corruptions: {others}." if others else "No corruption has a relative CE.")
            )
    return "\n".join(lines)
