"""Evaluation results: save and load, group means, tables, plots, 95% intervals and paired tests, in one place.

A *result* is what :func:`~timm_icl.eval.evaluate.evaluate_robustness` returns (and ``timm-icl eval -o`` writes)::

    {"conditions": {name: {"kind", "sigma", "top1", "top5", "correct", "count"}},
     "summary": {"clean", "noise", "blur"}, "per_image": {name: [0/1, ...]}, "distortions", "seed", "num_samples"}

Every function here that takes ``results_by_name`` accepts, per name, one result or a list of results (one per
training seed, evaluated on the same images): tables then print mean ± std over the seeds, plots draw error bars,
and paired tests average each image's correctness over the seeds (and, for a group, over its sigmas).

Why paired tests: the paper's margins (ICL vs MSE: +0.29 points on noise, +0.10 on blur over 50,000 images) are
close to one standard error of a top-1 accuracy, so a table of single numbers cannot say which method is better.
Runs evaluated on the same images with the same noise seed can be compared pairwise: McNemar's test looks only at
the images one model gets right and the other wrong.

Files: :func:`save_results` writes canonical JSON (sorted keys: identical results, identical bytes) with the
per-image correctness packed as bits (``target_cache.pack_bits``, hex text: 10,000 images take 2.5 kB per
condition); :func:`load_results` unpacks them, and also reads files with plain 0/1 lists.

Example:
    >>> print(format_table({"fine-tune": r0, "ICL": r1}))                         # doctest: +SKIP
    >>> print(format_comparison({"fine-tune": r0, "ICL": r1}, baseline="fine-tune"))   # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..target_cache import pack_bits, unpack_bits

__all__ = [
    "summarize",
    "mean_corruption_error",
    "format_corruption_table",
    "sort_conditions",
    "condition_names",
    "group_correctness",
    "wilson_interval",
    "mean_interval",
    "mcnemar_test",
    "paired_z_test",
    "compare_runs",
    "format_table",
    "format_comparison",
    "plot_accuracy_vs_sigma",
    "save_results",
    "load_results",
    "pack_result",
    "unpack_result",
    "pack_correctness",
    "unpack_correctness",
    "json_safe",
    "canonical_json",
]

Z95 = 1.959963984540054
GROUPS = ("clean", "noise", "blur")
_KIND_ORDER = {"clean": 0, "noise": 1, "blur": 2}
PACKED_ENCODING = "packbits-hex"

Result = Mapping[str, Any]


# ---------------------------------------------------------------------------------------------------------------------
# conditions: order and group means
# ---------------------------------------------------------------------------------------------------------------------
def sort_conditions(conditions: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Condition names in evaluation order: clean, noise by sigma, blur by sigma, other kinds last.

    JSON files have sorted keys (``blur1`` before ``noise30``); this restores the order the tables print.
    """

    def key(n: str) -> tuple:
        kind = conditions[n]["kind"]
        # other kinds (camera corruptions) last, each kind's severities together
        return (_KIND_ORDER.get(kind, 3), "" if kind in _KIND_ORDER else kind, conditions[n]["sigma"], n)

    return sorted(conditions, key=key)


def condition_names(conditions: Mapping[str, Mapping[str, Any]], group: str) -> list[str]:
    """Names of the conditions in ``group``: a kind (``"clean"``, ``"noise"``, ``"blur"``, ``"jpeg"``, ...; condition
    names end in a number, kind names never do) or one condition's name."""
    if group in GROUPS or any(c["kind"] == group for c in conditions.values()):
        return [n for n in sort_conditions(conditions) if conditions[n]["kind"] == group]
    return [group] if group in conditions else []


def _registered_kinds() -> dict:
    """``{name: DistortionSpec}`` of the kinds registered now (families and units for tables and plots)."""
    from ..distortions import distortion_names, get_distortion

    return {name: get_distortion(name) for name in distortion_names()}


def summarize(conditions: Mapping[str, Mapping[str, Any]], metric: str = "top1") -> dict[str, float | None]:
    """``{"clean", "noise", "blur"}``: the clean accuracy and the mean over each kind's sigmas (``None`` if absent).

    Args:
        conditions: a result's ``"conditions"``.
        metric: ``"top1"`` (the paper's) or ``"top5"``.
    """
    summary: dict[str, float | None] = {}
    for group in GROUPS:
        values = [conditions[n].get(metric) for n in condition_names(conditions, group)]
        values = [v for v in values if v is not None]
        summary[group] = sum(values) / len(values) if values else None
    for kind in dict.fromkeys(c["kind"] for c in conditions.values()):  # other registered kinds (jpeg, ...): appended
        if kind not in GROUPS:
            values = [c.get(metric) for c in conditions.values() if c["kind"] == kind and c.get(metric) is not None]
            summary[kind] = sum(values) / len(values) if values else None
    return summary


def _runs(value: Result | Sequence[Result]) -> list[Result]:
    """One result or a list of results (one per seed) -> a list."""
    return [value] if isinstance(value, Mapping) else list(value)


def group_correctness(results: Result | Sequence[Result], group: str) -> list[list[int]]:
    """``[run x condition][image]`` 0/1 correctness of the conditions in ``group``, over every run given."""
    lists = []
    for res in _runs(results):
        if "per_image" not in res:
            raise ValueError("these results have no per-image correctness; re-run `timm-icl eval` (it keeps them)")
        lists += [res["per_image"][n] for n in condition_names(res["conditions"], group) if n in res["per_image"]]
    return lists


# ---------------------------------------------------------------------------------------------------------------------
# intervals and paired tests
# ---------------------------------------------------------------------------------------------------------------------
def wilson_interval(correct: int, count: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); ``(nan, nan)`` when ``count`` is 0."""
    if count <= 0:
        return math.nan, math.nan
    p = correct / count
    denom = 1 + z * z / count
    centre = (p + z * z / (2 * count)) / denom
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(per_image_scores: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean and normal 95% interval of per-image scores in [0, 1] (e.g. an image's accuracy averaged over sigmas).

    Averaging within an image first keeps the interval honest: the five noise conditions of one image are not
    five independent trials.

    Returns:
        ``(mean, low, high)``.
    """
    n = len(per_image_scores)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(per_image_scores) / n
    if n == 1:
        return mean, math.nan, math.nan
    var = sum((s - mean) ** 2 for s in per_image_scores) / (n - 1)
    half = z * math.sqrt(var / n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def mcnemar_test(a: Sequence[int], b: Sequence[int]) -> dict[str, Any]:
    """McNemar's test on paired 0/1 correctness of two models on the same items.

    Args:
        a, b: per-item correctness (same length, same order).

    Returns:
        ``{"a_only": n01, "b_only": n10, "n": len, "p_value", "method"}``: ``a_only`` counts items only ``a``
        gets right. Exact two-sided binomial test for up to 5,000 discordant pairs, else the chi-square
        statistic with continuity correction.
    """
    if len(a) != len(b):
        raise ValueError(f"paired test needs the same images in both runs: {len(a)} vs {len(b)} per-image results")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    n = a_only + b_only
    if n == 0:
        p, method = 1.0, "exact"
    elif n <= 5000:
        k = min(a_only, b_only)
        log_terms = [
            math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)
        ]
        top = max(log_terms)
        tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
        p, method = min(1.0, 2 * tail), "exact"
    else:
        stat = (abs(a_only - b_only) - 1) ** 2 / n
        p, method = math.erfc(math.sqrt(stat / 2)), "chi2-cc"
    return {"a_only": a_only, "b_only": b_only, "n": len(a), "p_value": p, "method": method}


def paired_z_test(
    a_lists: Sequence[Sequence[int]], b_lists: Sequence[Sequence[int]], z95: float = Z95
) -> dict[str, Any]:
    """Two-sided paired z-test on per-image scores averaged over several conditions (and/or seeds).

    Args:
        a_lists, b_lists: ``[condition][image]`` 0/1 correctness of two runs on the same images (conditions may
            also be the same condition under several training seeds).

    Returns:
        ``{"mean_difference", "low", "high", "z", "p_value", "test": "paired z"}``: the mean over images of
        (a's score - b's score) with its 95% interval; ``p_value`` 1.0 when every difference is 0.
    """
    if len(a_lists) != len(b_lists) or any(len(x) != len(y) for x, y in zip(a_lists, b_lists)):
        raise ValueError("paired test needs the same conditions and images in both runs")
    diffs = [(sum(a) - sum(b)) / len(a_lists) for a, b in zip(zip(*a_lists), zip(*b_lists))]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    if var == 0.0:
        return {"mean_difference": mean, "low": mean, "high": mean, "z": 0.0, "p_value": 1.0, "test": "paired z"}
    se = math.sqrt(var / n)
    z = mean / se
    return {
        "mean_difference": mean,
        "low": mean - z95 * se,
        "high": mean + z95 * se,
        "z": z,
        "p_value": math.erfc(abs(z) / math.sqrt(2)),
        "test": "paired z",
    }


def _group_stats(results: Result | Sequence[Result], group: str) -> tuple[float, float, float] | None:
    """Mean top-1 of ``group`` with a 95% interval: per-image scores when kept, else counts (Wilson) or the mean."""
    runs = _runs(results)
    if not condition_names(runs[0]["conditions"], group):
        return None
    if all("per_image" in r for r in runs):
        lists = group_correctness(runs, group)
        return mean_interval([sum(v) / len(v) for v in zip(*lists)])
    if len(runs) == 1 and len(condition_names(runs[0]["conditions"], group)) == 1:  # counts only: Wilson
        c = runs[0]["conditions"][condition_names(runs[0]["conditions"], group)[0]]
        return (c["top1"], *wilson_interval(c["correct"], c["count"]))
    means = [summarize(r["conditions"])[group] for r in runs]
    return sum(means) / len(means), math.nan, math.nan


# ---------------------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def _cell_mean_std(values: Sequence[float | None], digits: int, scale: float, with_std: bool) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    mean, std = _mean_std([scale * v for v in values])
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
        for res in _runs(value):
            for name, c in res["conditions"].items():
                merged.setdefault(name, c)
    columns = [n for n in sort_conditions(merged) if merged[n]["kind"] != "clean"]
    header = ["method", "clean", "noise mean", "blur mean"] + columns
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    scale = 100.0 if percent else 1.0
    for method, value in results_by_name.items():
        runs = _runs(value)
        summaries = [summarize(r["conditions"], metric) for r in runs]
        cells = [method] + [_cell_mean_std([s[g] for s in summaries], digits, scale, True) for g in GROUPS]
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
    seeds = max(len(_runs(v)) for v in results_by_name.values())
    lines = [
        "| run | images | clean top-1 [95% CI] | noise mean [95% CI] | blur mean [95% CI] |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for name, value in results_by_name.items():
        count = next(iter(_runs(value)[0]["conditions"].values()))["count"]
        cells = [_interval_cell(_group_stats(value, g), digits) for g in GROUPS]
        lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")

    others = [n for n in names if n != baseline]
    if not others:
        return "\n".join(lines)
    base = _runs(results_by_name[baseline])
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
        runs = _runs(results_by_name[name])
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


def compare_runs(a: Result | Sequence[Result], b: Result | Sequence[Result], group: str) -> dict[str, Any] | None:
    """Paired comparison of ``a`` against ``b`` (one result each, or one per seed, run ``i`` paired with run ``i``)
    on ``group`` (``"clean"``, ``"noise"``, ``"blur"`` or a condition's name).

    Returns:
        ``{"mean_difference", "low", "high"`` (a - b in top-1, 95% interval over images), ``"p_value"``, ``"test"``
        (McNemar's exact test for one condition of one run, else the paired z-test of :func:`paired_z_test`),
        ``"a_only", "b_only"`` (pooled counts of images only one side gets right), ``"runs_better"`` (runs whose
        accuracy on the group beats their partner's), ``"runs"``}; ``None`` when the group is absent.

    Raises:
        ValueError: the runs do not pair up (other images, conditions or number of runs).
    """
    a_runs, b_runs = _runs(a), _runs(b)
    if len(a_runs) != len(b_runs):
        raise ValueError(f"{len(a_runs)} runs vs {len(b_runs)} in the baseline")
    a_lists, b_lists = group_correctness(a_runs, group), group_correctness(b_runs, group)
    if not a_lists:
        return None
    test = mcnemar_test([x for v in a_lists for x in v], [x for v in b_lists for x in v])  # checks the pairing
    mcnemar_p = test["p_value"]
    test.update(paired_z_test(a_lists, b_lists))  # the mean difference and its interval
    if len(a_lists) == 1:  # one condition of one run: McNemar's exact test
        test.update(test="McNemar " + test["method"], p_value=mcnemar_p)
    better = [_mean(group_correctness(x, group)) > _mean(group_correctness(y, group)) for x, y in zip(a_runs, b_runs)]
    test.update(runs_better=sum(better), runs=len(better))
    return test


def _mean(lists: Sequence[Sequence[int]]) -> float:
    total = sum(len(v) for v in lists)
    return sum(sum(v) for v in lists) / total if total else math.nan


# ---------------------------------------------------------------------------------------------------------------------
# corruption benchmark: ImageNet-C's mean corruption error
# ---------------------------------------------------------------------------------------------------------------------
def _condition_means(results: Result | Sequence[Result], metric: str) -> dict[str, dict[str, Any]]:
    """``{condition name: {"kind", "sigma", metric}}`` with the metric averaged over the runs (seeds) given."""
    runs = _runs(results)
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
        "relative_mce", "clean_error", "baseline_clean_error"}`` (``top1`` is the mean over the kind's severities;
        a relative CE is ``nan`` when the baseline loses nothing on that corruption).

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
    return {
        "corruptions": corruptions,
        "mce": sum(c["ce"] for c in corruptions.values()) / len(corruptions),
        "relative_mce": sum(rel) / len(rel),
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
    _REGISTRY = _registered_kinds()

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
        lines.append(
            row("**relative mCE**", [x for s in scores.values() for x in ("", f"{scale * s['relative_mce']:.1f}")])
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------------------------------
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
    all_runs = [r for v in results_by_name.values() for r in _runs(v)]
    _REGISTRY = _registered_kinds()

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
            runs = _runs(value)
            names = condition_names(runs[0]["conditions"], "clean") + condition_names(runs[0]["conditions"], kind)
            names = [n for n in names if all(n in r["conditions"] for r in runs)]
            if not names:
                continue
            xs = [runs[0]["conditions"][n]["sigma"] if n != "clean" else 0.0 for n in names]
            stats = [_mean_std([r["conditions"][n][metric] for r in runs]) for n in names]
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


# ---------------------------------------------------------------------------------------------------------------------
# files: canonical JSON, per-image correctness as packed bits
# ---------------------------------------------------------------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """A JSON-serialisable copy: mappings with str keys, tuples -> lists, tensors/arrays -> lists, numpy scalars
    -> Python numbers, objects with ``to_text()`` (a DistortionSet) -> their text, anything else -> ``str``."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) or hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return json_safe(value.tolist())
    if hasattr(value, "to_text"):
        return value.to_text()
    return str(value)


def canonical_json(value: Any, *, indent: int | None = 1) -> str:
    """``json_safe(value)`` as JSON with sorted keys and a final newline: equal values give equal bytes."""
    return json.dumps(json_safe(value), indent=indent, sort_keys=True) + "\n"


def pack_correctness(correct: Sequence[int]) -> str:
    """Per-image 0/1 correctness -> hex text of the bits packed by ``target_cache.pack_bits`` (8 images a byte)."""
    bits = torch.as_tensor(list(correct), dtype=torch.uint8).view(1, -1)
    return pack_bits(bits)[0].numpy().tobytes().hex()


def unpack_correctness(packed: str, count: int) -> list[int]:
    """Inverse of :func:`pack_correctness`: the first ``count`` bits as a list of 0/1 ints."""
    raw = bytes.fromhex(packed)
    if len(raw) * 8 < count:
        raise ValueError(f"packed correctness holds {len(raw) * 8} bits, {count} images expected")
    row = torch.tensor(list(raw), dtype=torch.uint8).view(1, -1)
    return unpack_bits(row, (count,))[0].to(torch.int64).tolist()


def pack_result(results: Result) -> dict:
    """A copy of a result as stored in files: per-image lists packed as bits (see :func:`pack_correctness`)."""
    data = dict(results)
    if "per_image" in data:
        data["per_image"] = {name: pack_correctness(v) for name, v in data["per_image"].items()}
        data["per_image_encoding"] = PACKED_ENCODING
    return data


def unpack_result(data: Mapping[str, Any]) -> dict:
    """Inverse of :func:`pack_result` (results with plain 0/1 lists pass through)."""
    data = dict(data)
    encoding = data.pop("per_image_encoding", None)
    if encoding is not None and encoding != PACKED_ENCODING:
        raise ValueError(f"unknown per-image encoding {encoding!r} (written by a newer timm-icl?)")
    if "per_image" in data:
        count = data.get("num_samples") or next(iter(data["conditions"].values()))["count"]
        data["per_image"] = {
            name: unpack_correctness(v, count) if isinstance(v, str) else v for name, v in data["per_image"].items()
        }
    return data


def save_results(results: Result, path: str | Path) -> Path:
    """Write a result as canonical JSON (identical results give identical files), per-image lists packed as bits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(canonical_json(pack_result(results)))
    return path


def load_results(path: str | Path) -> dict:
    """Read a result written by :func:`save_results` (or ``timm-icl eval -o``, or a run's eval.json); per-image
    correctness comes back as 0/1 lists. A file that is not a result gives one clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no results file at {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "eval" in data and "conditions" not in data:
        data = data["eval"]
    if not isinstance(data, dict) or "conditions" not in data:
        raise ValueError(f"{path} is not an evaluation result (no 'conditions' key)")
    try:
        return unpack_result(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
