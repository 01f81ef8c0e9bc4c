"""Evaluation results (timm_icl.eval.stats, tables, plots, results_io): one condition order, one group mean,
packed per-image bits, seed-aware tables, tests and plots."""

import json
import math

import numpy as np
import pytest
import torch

from timm_icl.eval import plots, results_io, stats, tables
from timm_icl.utils.bits import pack_bits


def _result(clean, noise, blur, per_image=None, count=8):
    """A result with conditions noise20/noise40 and blur2/blur4 in JSON's (sorted) key order."""
    conds = {"clean": {"kind": "clean", "sigma": 0.0, "top1": clean, "correct": round(clean * count), "count": count}}
    for kind, values, sigmas in (("noise", noise, (20, 40)), ("blur", blur, (2, 4))):
        for s, v in zip(sigmas, values):
            conds[f"{kind}{s}"] = {
                "kind": kind,
                "sigma": float(s),
                "top1": v,
                "correct": round(v * count),
                "count": count,
            }
    res = {"conditions": dict(sorted(conds.items())), "num_samples": count}
    res["summary"] = stats.summarize(res["conditions"])
    if per_image is not None:
        res["per_image"] = per_image
    return res


def test_condition_order_and_group_means():
    res = _result(0.9, (0.6, 0.5), (0.7, 0.3))
    assert list(res["conditions"])[:2] == ["blur2", "blur4"]  # JSON order
    assert stats.sort_conditions(res["conditions"]) == ["clean", "noise20", "noise40", "blur2", "blur4"]
    assert stats.condition_names(res["conditions"], "blur") == ["blur2", "blur4"]
    assert stats.condition_names(res["conditions"], "noise40") == ["noise40"]
    assert stats.summarize(res["conditions"]) == pytest.approx({"clean": 0.9, "noise": 0.55, "blur": 0.5})
    assert stats.summarize({"clean": res["conditions"]["clean"]}) == {"clean": 0.9, "noise": None, "blur": None}


def test_packed_bits_are_target_caches_and_round_trip():
    bits = [1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0]
    packed = results_io.pack_correctness(bits)
    assert packed == np.packbits(np.array(bits, dtype=np.uint8)).tobytes().hex() == "b1c0"
    assert bytes.fromhex(packed) == pack_bits(torch.tensor([bits])).numpy().tobytes()
    assert results_io.unpack_correctness(packed, len(bits)) == bits
    assert results_io.unpack_correctness(results_io.pack_correctness([]), 0) == []
    with pytest.raises(ValueError, match="16 bits, 17 images"):
        results_io.unpack_correctness(packed, 17)


def test_save_load_packs_per_image_and_reads_plain_lists(tmp_path):
    rng = np.random.default_rng(0)
    per_image = {n: rng.integers(0, 2, 1001).tolist() for n in ("clean", "noise20", "noise40", "blur2", "blur4")}
    res = _result(0.5, (0.4, 0.3), (0.45, 0.2), per_image, count=1001)
    path = results_io.save_results(res, tmp_path / "r.json")
    raw = json.loads(path.read_text())
    assert raw["per_image_encoding"] == "packbits-hex" and len(raw["per_image"]["clean"]) == 2 * 126  # 1001 bits
    assert results_io.load_results(path) == json.loads(json.dumps(res))
    assert (
        results_io.save_results(results_io.load_results(path), tmp_path / "again.json").read_bytes()
        == path.read_bytes()
    )
    (tmp_path / "plain.json").write_text(json.dumps(res))  # files written before packing hold 0/1 lists
    assert results_io.load_results(tmp_path / "plain.json")["per_image"] == per_image
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({"eval": res}))
    assert results_io.load_results(tmp_path / "run")["summary"] == res["summary"]
    with pytest.raises(ValueError, match="not an evaluation result"):
        results_io.load_results(tmp_path / "x.json") if (tmp_path / "x.json").write_text("[1]") else None
    with pytest.raises(ValueError, match="no results file"):
        results_io.load_results(tmp_path / "missing.json")


def test_format_table_single_and_seeds():
    table = tables.format_table(
        {"FT": _result(0.6744, (0.6, 0.5), (0.55, 0.45)), "ICL": _result(0.6769, (0.62, 0.5), (0.5, 0.4))}
    )
    lines = table.splitlines()
    assert lines[0] == "| method | clean | noise mean | blur mean | noise20 | noise40 | blur2 | blur4 |"
    assert lines[2] == "| FT | 0.6744 | 0.5500 | 0.5000 | 0.6000 | 0.5000 | 0.5500 | 0.4500 |"
    seeds = [_result(0.70, (0.6, 0.5), (0.5, 0.4)), _result(0.80, (0.6, 0.7), (0.5, 0.4))]
    row = tables.format_table({"ICL": seeds}, digits=2, percent=True).splitlines()[2]
    # clean: mean 75, sample std 7.07; noise means 55 and 65 -> 60 ± 7.07; per-sigma cells are the mean only
    assert row == "| ICL | 75.00 ± 7.07 | 60.00 ± 7.07 | 45.00 ± 0.00 | 60.00 | 60.00 | 50.00 | 40.00 |"


def test_paired_tests_against_scipy_and_seeds():
    from scipy.stats import binomtest, ttest_rel

    a = [1] * 10 + [0] * 3 + [1] * 50 + [0] * 7
    b = [0] * 10 + [1] * 3 + [1] * 50 + [0] * 7
    assert stats.mcnemar_test(a, b)["p_value"] == pytest.approx(binomtest(3, 13, 0.5).pvalue, rel=1e-12)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 2, (3, 400)), rng.integers(0, 2, (3, 400))
    test = stats.paired_z_test(x.tolist(), y.tolist())
    diffs = x.mean(0) - y.mean(0)
    half = 1.959963984540054 * diffs.std(ddof=1) / math.sqrt(400)
    assert test["mean_difference"] == pytest.approx(diffs.mean())
    assert (test["low"], test["high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    # a z-test on 400 images is within a few % of the t-test's p-value
    assert test["p_value"] == pytest.approx(ttest_rel(x.mean(0), y.mean(0)).pvalue, rel=0.05)

    def res(rows):
        names = ("clean", "noise20", "noise40", "blur2", "blur4")
        per_image = {n: r.tolist() for n, r in zip(names, rows)}
        return _result(
            *[float(np.mean(r)) for r in rows[:1]], tuple(rows[1:3].mean(1)), tuple(rows[3:].mean(1)), per_image, 400
        )

    base = [res(rng.integers(0, 2, (5, 400))) for _ in range(3)]
    better = [res(np.maximum(rng.integers(0, 2, (5, 400)), rng.integers(0, 2, (5, 400)))) for _ in range(3)]
    text = tables.format_comparison({"FT": base, "ICL": better}, baseline="FT")
    row = next(line for line in text.splitlines() if line.startswith("| ICL | noise |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    expected = stats.paired_z_test(stats.group_correctness(better, "noise"), stats.group_correctness(base, "noise"))
    assert float(cells[2]) == pytest.approx(expected["mean_difference"], abs=5e-5) and float(cells[2]) > 0.15
    assert cells[5] == "paired z" and cells[8] == "3/3"
    with pytest.raises(ValueError, match="baseline 'x'"):
        tables.format_comparison({"FT": base}, baseline="x")


def test_plot_with_seeds_and_reference(tmp_path, monkeypatch):
    """What is drawn, read back from matplotlib's objects: one panel per kind starting at sigma 0 with the clean
    accuracy, the seeds' mean with their sample std as error bars, the reference dashed."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
    seeds = [_result(0.9, (0.8, 0.6), (0.7, 0.5)), _result(0.92, (0.82, 0.62), (0.71, 0.52))]
    path = plots.plot_accuracy_vs_sigma(
        {"a": seeds, "b": _result(0.9, (0.85, 0.7), (0.75, 0.6))},
        tmp_path / "p.png",
        reference=_result(0.95, (0.5, 0.2), (0.4, 0.1)),
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    noise, blur = [ax for ax in fig.axes if ax.get_visible()]
    assert (noise.get_title(), blur.get_title()) == ("Gaussian noise", "Gaussian blur")
    assert noise.get_xlabel() == "noise sigma (0-255 pixel units)" and blur.get_xlabel() == "blur sigma (pixels)"
    assert noise.get_ylabel() == "top-1 accuracy" and noise.get_ylim() == (0.0, 1.0)
    drawn = {label: handle for handle, label in zip(*noise.get_legend_handles_labels())}
    assert sorted(drawn) == ["a", "b", "reference"]
    reference, a, b = drawn["reference"], drawn["a"], drawn["b"]
    assert list(reference.get_xdata()) == [0.0, 20.0, 40.0] and list(reference.get_ydata()) == [0.95, 0.5, 0.2]
    assert reference.get_linestyle() == "--" and reference.get_color() == "k"
    line, _, (bars,) = a.lines  # an errorbar: the mean line, its caps, the bars
    assert list(line.get_xdata()) == [0.0, 20.0, 40.0]
    assert list(line.get_ydata()) == pytest.approx([0.91, 0.81, 0.61])
    std = 0.02 / math.sqrt(2)  # sample std of two seeds 0.02 apart
    assert [seg[1][1] - seg[0][1] for seg in bars.get_segments()] == pytest.approx([2 * std] * 3)
    assert list(b.get_ydata()) == [0.9, 0.85, 0.7] and b.get_linestyle() == "-"
    a_blur = dict(zip(*reversed(blur.get_legend_handles_labels())))["a"]
    assert list(a_blur.lines[0].get_xdata()) == [0.0, 2.0, 4.0]
    assert list(a_blur.lines[0].get_ydata()) == pytest.approx([0.91, 0.705, 0.51])
