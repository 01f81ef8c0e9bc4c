"""Statistics of evaluation results: condition order and group means, 95% intervals, paired tests.

A *result* is what :func:`~timm_icl.eval.evaluate.evaluate_robustness` returns (and ``timm-icl eval -o`` writes)::

    {"conditions": {name: {"kind", "sigma", "top1", "top5", "correct", "count"}},
     "summary": {"clean", "noise", "blur"}, "per_image": {name: [0/1, ...]}, "distortions", "seed", "num_samples"}

Every function here, in :mod:`.tables` and in :mod:`.plots` that takes results accepts one result or a list of
results (one per training seed, evaluated on the same images): paired tests then average each image's correctness
over the seeds (and, for a group, over its sigmas).

Why paired tests: the paper's margins (ICL vs MSE: +0.29 points on noise, +0.10 on blur over 50,000 images) are
close to one standard error of a top-1 accuracy, so a table of single numbers cannot say which method is better.
Runs evaluated on the same images with the same noise seed can be compared pairwise: McNemar's test looks only at
the images one model gets right and the other wrong.

Example:
    >>> compare_runs(icl_runs, finetune_runs, "noise")["p_value"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "summarize",
    "sort_conditions",
    "condition_names",
    "group_correctness",
    "wilson_interval",
    "mean_interval",
    "mcnemar_test",
    "paired_z_test",
    "compare_runs",
]

Z95 = 1.959963984540054
GROUPS = ("clean", "noise", "blur")
_KIND_ORDER = {"clean": 0, "noise": 1, "blur": 2}

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


def registered_kinds() -> dict:
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


def as_runs(value: Result | Sequence[Result]) -> list[Result]:
    """One result or a list of results (one per seed) -> a list."""
    return [value] if isinstance(value, Mapping) else list(value)


def group_correctness(results: Result | Sequence[Result], group: str) -> list[list[int]]:
    """``[run x condition][image]`` 0/1 correctness of the conditions in ``group``, over every run given."""
    lists = []
    for res in as_runs(results):
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


def group_stats(results: Result | Sequence[Result], group: str) -> tuple[float, float, float] | None:
    """Mean top-1 of ``group`` with a 95% interval: per-image scores when kept, else counts (Wilson) or the mean."""
    runs = as_runs(results)
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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value) of a non-empty sequence."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


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
    a_runs, b_runs = as_runs(a), as_runs(b)
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
