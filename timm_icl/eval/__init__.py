"""Evaluation: accuracy under every condition of a distortion set (:mod:`.evaluate`), statistics (:mod:`.stats`),
tables (:mod:`.tables`), plots (:mod:`.plots`), the results file (:mod:`.results_io`), and the firing-pattern
analysis (:mod:`.analysis`)."""

from ..data.preprocess import resolve_mean_std
from .evaluate import distort, evaluate_robustness, noise_seed
from .plots import plot_accuracy_vs_sigma
from .results_io import load_results, save_results
from .stats import (
    compare_runs,
    group_correctness,
    mcnemar_test,
    mean_interval,
    paired_z_test,
    summarize,
    wilson_interval,
)
from .tables import format_comparison, format_corruption_table, format_table, mean_corruption_error

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
