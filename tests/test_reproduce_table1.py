"""The Table-1 reproduction through the shared pipeline: --quick trains with the recipe and evaluates with
`timm-icl eval`, so its numbers are the ones `timm-icl eval` gives on the saved models; the training-set-size
report computes its gains with timm_icl.eval.results' paired tests."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from timm_icl import cli
from timm_icl.eval.results import compare_runs, load_results, summarize, unpack_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

import reproduce_table1  # noqa: E402


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="Fashion-MNIST not installed (bash .ci/setup)")
def test_quick_numbers_are_timm_icl_eval_numbers(tmp_path, capsys):
    assert reproduce_table1.main(["--quick", "--out", str(tmp_path), "--threads", "2"]) == 0
    stem = tmp_path / "table1_fashion_mnist_quick"
    saved = json.loads(stem.with_suffix(".json").read_text())
    md = stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").stat().st_size > 10_000
    (record,) = saved["protocols"]
    runs = {m: [unpack_result(r) for r in rs] for m, rs in record["runs"].items()}
    assert set(runs) == {"none", "icl", "mse"} and all(len(r) == 2 for r in runs.values())
    # lambdas come from the sweep on the validation split, and the selected one is the best there
    for constraint, scores in record["sweep"].items():
        assert record["selected_lambda"][constraint] == float(max(scores, key=scores.get))
    # a reference trained for two epochs on 600 images is far above chance (10%) on clean test images
    reference = unpack_result(record["reference_test"])
    assert reference["conditions"]["clean"]["top1"] > 0.25 and reference["num_samples"] == 300

    # the same numbers from `timm-icl eval` on the saved models, with another batch size
    for result in (runs["icl"][1], reference):
        out = tmp_path / "again.json"
        argv = ["eval", result["model"], "--dataset", "fashion-mnist", "--split", "test", "--max-samples", "300"]
        assert cli.main(argv + ["--distortions", "small", "--batch-size", "64", "-o", str(out), "-q"]) == 0
        again = load_results(out)
        assert again["conditions"] == result["conditions"] and again["per_image"] == result["per_image"]
    capsys.readouterr()

    # the Markdown reports the JSON's mean for ICL's clean accuracy (mean ± std over the seeds, in %)
    clean = [r["conditions"]["clean"]["top1"] for r in runs["icl"]]
    assert f"{100 * np.mean(clean):.2f} ± {100 * np.std(clean, ddof=1):.2f}" in md
    # a second invocation with the same arguments reuses every finished model and evaluation: same numbers
    saved_json = stem.with_suffix(".json").read_text()
    assert reproduce_table1.main(["--quick", "--out", str(tmp_path), "--threads", "2"]) == 0
    again_payload = json.loads(stem.with_suffix(".json").read_text())
    assert len(again_payload["reused_runs"]) == 1 + 2 * 2 + 2 * 3  # reference, 2 lambdas x 2, 2 seeds x 3 methods
    assert again_payload["protocols"] == json.loads(saved_json)["protocols"]
    capsys.readouterr()

    # --report-only rebuilds the same report from the JSON alone
    md = stem.with_suffix(".md").read_text()
    before = md
    stem.with_suffix(".md").unlink()
    assert reproduce_table1.main(["--report-only", str(stem.with_suffix(".json"))]) == 0
    assert stem.with_suffix(".md").read_text() == before


def _fake_result(rng, p, n=400):
    names = {"clean": ("clean", 0.0), "noise30": ("noise", 30.0), "noise60": ("noise", 60.0), "blur1": ("blur", 1.0)}
    per_image = {name: (rng.random(n) < p).astype(int).tolist() for name in names}
    conds = {
        name: {
            "kind": k,
            "sigma": s,
            "top1": float(np.mean(per_image[name])),
            "correct": sum(per_image[name]),
            "count": n,
        }
        for name, (k, s) in names.items()
    }
    return {"conditions": conds, "summary": summarize(conds), "per_image": per_image, "num_samples": n}


def test_train_size_report_gains_from_paired_tests(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for size, gain in ((3000, 0.2), (12000, 0.1)):
        records.append(
            {
                "train_size": size,
                "selected_lambda": {"none": 0.0, "icl": 0.1},
                "sweep": {"icl": {"0.1": 0.6, "0.05": 0.55}},
                "reference_test": _fake_result(rng, 0.5),
                "reference_val": _fake_result(rng, 0.5),
                "runs": {
                    "none": [_fake_result(rng, 0.5) for _ in range(3)],
                    "icl": [_fake_result(rng, 0.5 + gain) for _ in range(3)],
                },
                "images_per_s": {"none": 100.0, "icl": 80.0},
            }
        )
    config = {"quick": False, "model": "vgg_tiny", "ref_epochs": 8, "ft_epochs": 3, "batch_size": 64, "ft_lr": 0.01}
    config["val_size"] = 6000
    payload = {"mode": "train_sizes", "config": config, "distortions": "noise:30,60 blur:1", "protocols": records}
    payload.update(machine="test", wall_seconds=60.0)
    path = tmp_path / "train_size_sweep.json"
    path.write_text(json.dumps(reproduce_table1.pack_payload(payload)))
    assert reproduce_table1.main(["--report-only", str(path)]) == 0
    md = path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").stat().st_size > 10_000
    for record in records:
        g = compare_runs(record["runs"]["icl"], record["runs"]["none"], "noise")
        row = next(line for line in md.splitlines() if line.startswith(f"| {record['train_size']} | ICL"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == f"{100 * g['mean_difference']:+.2f} [{100 * g['low']:+.2f}, {100 * g['high']:+.2f}]"
        assert cells[6] == "3/3" and float(cells[5]) < 1e-3  # a 10-20 point gain on 400 images x 3 seeds
    assert "ICL step time / plain: 1.25x" in md
