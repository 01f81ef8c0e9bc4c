"""Comparing evaluation runs: 95% confidence intervals and McNemar's paired test on per-image correctness.

The paper's margins (ICL vs MSE: +0.29 points on noise, +0.10 on blur over 50,000 images) are close to one
standard error of a top-1 accuracy, so a table of single numbers cannot say which method is better. Runs
evaluated on the same images with the same noise seed (``timm-icl eval`` does this) can be compared pairwise:
McNemar's test looks only at the images one model gets right and the other wrong.

Example:
    >>> print(format_comparison({"fine-tune": r0, "ICL": r1}, baseline="fine-tune"))   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "wilson_interval",
    "mean_interval",
    "mcnemar_test",
    "paired_z_test",
    "group_correctness",
    "format_comparison",
]

Z95 = 1.959963984540054


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


def group_correctness(results: Mapping[str, Any], group: str) -> list[list[int]]:
    """Per-image lists of the conditions in ``group`` (``"clean"``, ``"noise"``, ``"blur"`` or a condition name)."""
    if "per_image" not in results:
        raise ValueError("these results have no per-image correctness; re-run `timm-icl eval` (it keeps them)")
    conds = results["conditions"]
    names = [n for n, c in conds.items() if c["kind"] == group] if group in ("clean", "noise", "blur") else [group]
    return [results["per_image"][n] for n in names if n in results["per_image"]]


def _group_stats(results: Mapping[str, Any], group: str) -> tuple[float, float, float] | None:
    conds = results["conditions"]
    names = [n for n, c in conds.items() if c["kind"] == group]
    if not names:
        return None
    if "per_image" in results:
        lists = group_correctness(results, group)
        per_image = [sum(v) / len(v) for v in zip(*lists)]
        return mean_interval(per_image)
    if len(names) == 1:  # counts only: Wilson interval of the single condition
        c = conds[names[0]]
        return (c["top1"], *wilson_interval(c["correct"], c["count"]))
    return sum(conds[n]["top1"] for n in names) / len(names), math.nan, math.nan


def _cell(stats: tuple[float, float, float] | None, digits: int) -> str:
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


def per_condition_names(results: Mapping[str, Any]) -> list[str]:
    """Names of the distorted conditions (not clean), in evaluation order."""
    kinds = {"noise": 0, "blur": 1}
    distorted = [
        (kinds.get(c["kind"], 2), c["sigma"], n) for n, c in results["conditions"].items() if c["kind"] != "clean"
    ]
    return [n for _, _, n in sorted(distorted)]  # JSON files have sorted keys: restore (kind, sigma) order


def paired_z_test(a_lists: Sequence[Sequence[int]], b_lists: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Two-sided paired z-test on per-image scores averaged over several conditions.

    Args:
        a_lists, b_lists: ``[condition][image]`` 0/1 correctness of two runs on the same images.

    Returns:
        ``{"mean_difference", "z", "p_value", "test": "paired z"}``; ``p_value`` 1.0 when every difference is 0.
    """
    if len(a_lists) != len(b_lists) or any(len(x) != len(y) for x, y in zip(a_lists, b_lists)):
        raise ValueError("paired test needs the same conditions and images in both runs")
    diffs = [(sum(a) - sum(b)) / len(a_lists) for a, b in zip(zip(*a_lists), zip(*b_lists))]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    if var == 0.0:
        return {"mean_difference": mean, "z": 0.0, "p_value": 1.0, "test": "paired z"}
    z = mean / math.sqrt(var / n)
    return {"mean_difference": mean, "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2)), "test": "paired z"}


def format_comparison(
    results_by_name: Mapping[str, Mapping[str, Any]],
    *,
    baseline: str | None = None,
    digits: int = 4,
    per_condition: bool = False,
) -> str:
    """Markdown: top-1 with 95% intervals per run, then McNemar's test of each run against the baseline.

    Args:
        results_by_name: ``{run name: evaluate_robustness result}`` (per-image lists needed for the paired test).
        baseline: run every other run is tested against (default: the first).
        digits: decimals.
        per_condition: also test every single condition (McNemar), not only clean / noise / blur.
    """
    if not results_by_name:
        raise ValueError("nothing to compare")
    names = list(results_by_name)
    baseline = baseline if baseline is not None else names[0]
    if baseline not in results_by_name:
        raise ValueError(f"baseline {baseline!r} is not one of the runs: {', '.join(names)}")
    groups = ("clean", "noise", "blur")
    lines = [
        "| run | images | clean top-1 [95% CI] | noise mean [95% CI] | blur mean [95% CI] |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for name, res in results_by_name.items():
        count = next(iter(res["conditions"].values()))["count"]
        cells = [_cell(_group_stats(res, g), digits) for g in groups]
        lines.append(f"| {name} | {count} | " + " | ".join(cells) + " |")

    others = [n for n in names if n != baseline]
    if others:
        base = results_by_name[baseline]
        lines += [
            "",
            f"Paired tests against **{baseline}** on the same images: McNemar (exact) for one condition; for the "
            "noise and blur groups a paired z-test on each image's accuracy averaged over the group's sigmas (the "
            "sigmas of one image are not independent trials, so pooling them into one McNemar test would overstate "
            "significance).",
            "",
            "| run | group | delta top-1 | right only here | right only in baseline | test | p-value |",
            "| --- | --- | ---: | ---: | ---: | --- | ---: |",
        ]
        for name in others:
            res = results_by_name[name]
            for group in list(groups) + (per_condition_names(res) if per_condition else []):
                try:
                    mine_lists, theirs_lists = group_correctness(res, group), group_correctness(base, group)
                    if not mine_lists:
                        continue
                    mine = [x for v in mine_lists for x in v]
                    theirs = [x for v in theirs_lists for x in v]
                    test = mcnemar_test(mine, theirs)  # also checks that the images pair up
                    if len(mine_lists) > 1:
                        test.update(paired_z_test(mine_lists, theirs_lists))
                except ValueError as e:
                    lines.append(f"| {name} | {group} | - | - | - | - | n/a: {e} |")
                    continue
                delta = (sum(mine) - sum(theirs)) / max(1, len(mine))
                counts = f"{test['a_only']} | {test['b_only']}"
                kind = test.get("test", "McNemar " + test["method"])
                lines.append(f"| {name} | {group} | {delta:+.{digits}f} | {counts} | {kind} | {_p(test['p_value'])} |")
    return "\n".join(lines)
