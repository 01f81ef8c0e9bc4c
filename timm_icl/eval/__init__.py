"""Evaluation: accuracy under every condition of a distortion set (:mod:`.evaluate`), the results file format,
statistics, tables and plots (:mod:`.results`), and the firing-pattern analysis (:mod:`.analysis`)."""

from .evaluate import distort, evaluate_robustness, noise_seed, resolve_mean_std
from .results import (
    compare_runs,
    format_comparison,
    format_corruption_table,
    format_table,
    group_correctness,
    load_results,
    mcnemar_test,
    mean_corruption_error,
    mean_interval,
    paired_z_test,
    plot_accuracy_vs_sigma,
    save_results,
    summarize,
    wilson_interval,
)

__all__ = [
    "distort",
    "evaluate_robustness",
    "noise_seed",
    "resolve_mean_std",
    "compare_runs",
    "format_comparison",
    "format_corruption_table",
    "format_table",
    "group_correctness",
    "load_results",
    "mcnemar_test",
    "mean_corruption_error",
    "mean_interval",
    "paired_z_test",
    "plot_accuracy_vs_sigma",
    "save_results",
    "summarize",
    "wilson_interval",
]
