"""The Table-1 reproduction in --quick mode, run as a user would: checks the pipeline end to end (not the
conclusion): files written, numbers in range and consistent between the JSON and the Markdown."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="Fashion-MNIST not installed (bash .ci/setup)")
def test_reproduce_table1_quick(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes/reproduce_table1.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,  # ~1 min on an idle 2-core machine; generous for a loaded one
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "table1_fashion_mnist_quick.json").read_text())
    md = (tmp_path / "table1_fashion_mnist_quick.md").read_text()
    assert (tmp_path / "table1_fashion_mnist_quick.png").stat().st_size > 10_000
    assert set(saved["runs"]) == {"none", "icl", "mse", "ab"} and all(len(r) == 2 for r in saved["runs"].values())
    # lambdas come from the sweep on the validation split, and the selected one is the best there
    for constraint, scores in saved["sweep"].items():
        assert saved["selected_lambda"][constraint] == float(max(scores, key=scores.get))
    # a reference trained for one epoch on 6,000 images is far above chance (10%) on clean test images
    assert saved["reference_test"]["clean"] > 0.5
    sys.path.insert(0, str(ROOT / "recipes"))
    from reproduce_table1 import unpack_bits

    assert saved["per_image_count"] == 2000
    for method, runs in saved["runs"].items():
        for run, per_image in zip(runs, saved["per_image"][method]):
            clean = unpack_bits(per_image["clean"], saved["per_image_count"])
            assert len(clean) == 2000 and set(clean) <= {0, 1}
            assert run["top1"]["clean"] == pytest.approx(sum(clean) / 2000)
    # the Markdown reports the JSON's mean for ICL's clean accuracy
    icl_clean = 100 * saved["table"]["icl"]["clean"]["mean"]
    assert f"{icl_clean:.2f} ±" in md
