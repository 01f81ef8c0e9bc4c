"""The Table-1 reproduction through the shared pipeline: --quick trains with the recipe and evaluates with
`timm-icl eval`, so its numbers are the ones `timm-icl eval` gives on the saved models; the training-set-size
report computes its gains with timm_icl.eval.stats' paired tests."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from timm_icl import cli
from timm_icl.eval import compare_runs, load_results, summarize
from timm_icl.eval.results_io import unpack_result

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
                "train_seconds": {"sweep_icl_l0.1": 30.0, "none_s0": 20.0, "icl_s0": 25.0},
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
        row = next(
            line for line in md.splitlines() if line.startswith(f"| {record['train_size']} | own | cosine | ICL")
        )
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[7] == f"{100 * g['mean_difference']:+.2f} [{100 * g['low']:+.2f}, {100 * g['high']:+.2f}]"
        assert float(cells[8]) < 1e-3  # a 10-20 point gain on 400 images x 3 seeds
        # per-seed deltas: each seed's ICL noise mean minus the fine-tuning run's of the same seed
        per_seed = [
            summarize(a["conditions"])["noise"] - summarize(b["conditions"])["noise"]
            for a, b in zip(record["runs"]["icl"], record["runs"]["none"])
        ]
        t_p = scipy.stats.ttest_1samp(per_seed, 0.0).pvalue  # the seeds' t-test, df 2
        assert cells[9] == ", ".join(f"{100 * d:+.2f}" for d in per_seed) + f" (3/3, t p {t_p:.2g})"
    assert "ICL step time / plain: 1.25x" in md
    assert "Training wall time per run (s, this machine, shared CPU): icl_s0 25; none_s0 20; sweep_icl_l0.1 30." in md
    # the report written during a run (insertion-ordered dicts) = the one rebuilt from the sorted JSON file
    assert reproduce_table1.write_reports(payload, tmp_path / "direct.json") == md
    # records written before --ft-sched (no "ft_sched") were fine-tuned with cosine, and every heading says so
    assert "fine-tuning lr schedule cosine" in md and "schedule constant" not in md


def _lrs(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["lr"]) for r in records if r.get("kind") == "train"]


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="Fashion-MNIST not installed (bash .ci/setup)")
def test_ft_sched_reaches_the_training_runs(tmp_path):
    """--ft-sched constant keeps the fine-tuning learning rate at --ft-lr for every step; cosine decays it along
    timm's cosine; the reference trains with cosine either way (read back from each run's metrics.jsonl)."""
    args = reproduce_table1.parse_settings(["--quick", "--out", str(tmp_path), "--train-sizes", "600"])
    args.ref_epochs, args.ft_epochs, args.ft_lr = 1, 3, 0.02
    data = reproduce_table1.prepare_data(args, tmp_path / "data")
    ref = reproduce_table1.train_run(args, data, tmp_path / "ref", size=128, constraint="none")
    runs = {}
    for sched in ("constant", "cosine"):
        runs[sched] = tmp_path / sched
        kw = dict(size=192, constraint="icl", lam=0.1, init=ref, sched=sched)
        reproduce_table1.train_run(args, data, runs[sched], **kw)
        train_argv = json.loads((runs[sched] / "reuse.json").read_text())["train"]  # the reuse key
        assert train_argv[train_argv.index("--sched") + 1] == sched
        assert json.loads((runs[sched] / "wall.json").read_text())["train_seconds"] > 0
    constant, cosine = _lrs(runs["constant"]), _lrs(runs["cosine"])
    # 192 images, batch 64: 3 steps per epoch, 9 steps, logged at the end of each epoch
    assert [s for s, _ in constant] == [s for s, _ in cosine] == [3, 6, 9]
    assert [lr for _, lr in constant] == [0.02, 0.02, 0.02]
    for step, lr in cosine:  # the rate step `step` used: timm's cosine at step - 1 of 9, down to min-lr 0
        assert lr == pytest.approx(0.5 * 0.02 * (1 + math.cos(math.pi * (step - 1) / 9)), rel=1e-6)
    assert cosine[-1][1] < 0.001
    ref_argv = json.loads((tmp_path / "ref" / "reuse.json").read_text())["train"]
    assert ref_argv[ref_argv.index("--sched") + 1] == "cosine"  # the reference: cosine whatever the fine-tuning's
    # the same schedule again is reused; the schedule is in the reuse key (checked above), so another is not
    reproduce_table1.train_run(
        args, data, runs["constant"], size=192, constraint="icl", lam=0.1, init=ref, sched="constant"
    )
    assert args.reused == [str(runs["constant"])]


def test_protocol_plan_by_reference_and_schedule(tmp_path, monkeypatch):
    """--ft-sched constant,cosine --reference own,shared: one protocol per (reference, size, schedule); the schedule
    reaches every fine-tuning run, each schedule has its own run folders, the shared reference is the largest
    size's own reference (one run folder), and the report states every protocol's schedule."""
    calls = []
    rng = np.random.default_rng(1)

    def fake_train(
        args, data_dir, run_dir, *, size, constraint, lam=None, seed=0, init=None, sched="cosine", jsd_weight=None
    ):
        calls.append({"dir": run_dir, "size": size, "constraint": constraint, "init": init, "sched": sched})
        (run_dir / "model").mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "images_per_s": 100.0}) + "\n")
        return run_dir / "model"

    monkeypatch.setattr(reproduce_table1, "train_run", fake_train)
    monkeypatch.setattr(reproduce_table1, "prepare_data", lambda args, d: d)
    monkeypatch.setattr(reproduce_table1, "evaluate_run", lambda *a: _fake_result(rng, 0.5))
    argv = ["--train-sizes", "3000,54000", "--seeds", "3", "--constraints", "icl,jsd", "--lambdas", "0.1,3"]
    argv += ["--jsd-lambdas", "12"]
    argv += ["--ft-sched", "constant,cosine", "--reference", "own,shared", "--name", "contrast", "--out", str(tmp_path)]
    assert reproduce_table1.main(argv) == 0
    references = [c for c in calls if c["init"] is None]
    fine_tuning = [c for c in calls if c["init"] is not None]
    assert {c["dir"].relative_to(tmp_path).as_posix() for c in references} == {
        "runs/fashion_mnist/n3000/reference",
        "runs/fashion_mnist/n54000/reference",
    }
    assert all(c["sched"] == c["dir"].parent.name for c in fine_tuning)  # runs/.../<size>/<sched>/<run>
    # 3 settings (54k shared = 54k own: the same folders) x 2 schedules x (3 sweep runs + 3 fine-tuning seeds + 2
    # seeds of each constraint: seed 0 is its sweep run at the selected lambda, the same arguments)
    assert len({c["dir"] for c in fine_tuning}) == 3 * 2 * (2 + 1 + 3 + 2 * 2)
    first = json.loads((tmp_path / "contrast.json").read_text())["protocols"][0]
    lam = f"{first['selected_lambda']['icl']:g}"
    assert [Path(d).name for d in first["run_dirs"]["icl"]] == [f"sweep_icl_l{lam}", "icl_s1", "icl_s2"]
    assert [Path(d).name for d in first["run_dirs"]["none"]] == ["none_s0", "none_s1", "none_s2"]
    shared_3k = [c for c in fine_tuning if c["dir"].parts[-3] == "n3000_ref54000"]
    assert shared_3k and all(c["init"].parent.name == "reference" and "n54000" in str(c["init"]) for c in shared_3k)
    saved = json.loads((tmp_path / "contrast.json").read_text())
    plan = [(r["reference_size"], r["train_size"], r["ft_sched"]) for r in saved["protocols"]]
    assert plan == [
        (3000, 3000, "constant"),
        (3000, 3000, "cosine"),
        (54000, 54000, "constant"),
        (54000, 54000, "cosine"),
        (54000, 3000, "constant"),
        (54000, 3000, "cosine"),
    ]  # the shared reference at 54,000 images is the own-reference protocol: not twice
    md = (tmp_path / "contrast.md").read_text()
    assert md.count("fine-tuning lr schedule constant") == md.count("fine-tuning lr schedule cosine") == 3
    assert "| 3000 | shared (54000) | constant | ICL (proposed) |" in md
    assert "## The schedule itself: cosine - constant" in md and "PARTIAL" not in md
    assert "| jsd | - | - | " in md and "| JSD (AugMix) | 12 |" in md  # JSD swept on its own grid
    assert (tmp_path / "contrast.png").stat().st_size > 10_000


def test_icl_plus_jsd_takes_the_jsd_weight_selected_on_validation(tmp_path, monkeypatch):
    """--constraints icl+jsd,jsd: jsd's sweep runs first (whatever the order given), icl+jsd sweeps its ICL lambda on
    --icl-jsd-lambdas with the JSD weight jsd selected, every icl+jsd run (sweep and seeds) trains with that weight,
    and the report names it."""
    calls = []
    scores = {("jsd", 3.0): 0.7, ("jsd", 12.0): 0.6, ("icl+jsd", 0.3): 0.8, ("icl+jsd", 1.0): 0.5}

    def fake_train(
        args, data_dir, run_dir, *, size, constraint, lam=None, seed=0, init=None, sched="cosine", jsd_weight=None
    ):
        calls.append((run_dir.name, constraint, lam, jsd_weight))
        (run_dir / "model").mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "images_per_s": 100.0}) + "\n")
        return run_dir / "model"

    def fake_eval(args, model_dir, dataset, split, size):
        run = model_dir.parent.name
        key = next((k for k in scores if run == f"sweep_{k[0]}_l{k[1]:g}"), None)
        result = _fake_result(np.random.default_rng(len(run)), 0.5)
        if split == "validation" and key:  # the lambda-selection score: the distorted conditions' mean
            for c in result["conditions"].values():
                c["top1"] = scores[key]
        return result

    monkeypatch.setattr(reproduce_table1, "train_run", fake_train)
    monkeypatch.setattr(reproduce_table1, "prepare_data", lambda args, d: d)
    monkeypatch.setattr(reproduce_table1, "evaluate_run", fake_eval)
    argv = ["--train-sizes", "12000", "--seeds", "3", "--constraints", "icl+jsd,jsd", "--jsd-lambdas", "3,12"]
    argv += ["--icl-jsd-lambdas", "0.3,1", "--name", "combined", "--out", str(tmp_path)]
    assert reproduce_table1.main(argv) == 0
    sweeps = list(dict.fromkeys(c[0] for c in calls if c[0].startswith("sweep_")))  # seed 0 is the sweep's run
    assert sweeps == ["sweep_jsd_l3", "sweep_jsd_l12", "sweep_icl+jsd_l0.3", "sweep_icl+jsd_l1"]
    combined = [c for c in calls if c[1] == "icl+jsd"]
    assert {c[0] for c in combined} == {"sweep_icl+jsd_l0.3", "sweep_icl+jsd_l1", "icl+jsd_s1", "icl+jsd_s2"}
    assert all(c[3] == 3.0 for c in combined)  # the weight jsd selected on validation
    assert all(c[3] is None for c in calls if c[1] != "icl+jsd")
    record = json.loads((tmp_path / "combined.json").read_text())["protocols"][0]
    assert record["selected_lambda"] == {"none": 0.0, "jsd": 3.0, "icl+jsd": 0.3} and record["jsd_weight"] == 3.0
    md = (tmp_path / "combined.md").read_text()
    assert "| 12000 | own | constant | ICL + JSD (JSD weight 3) | 0.3 |" in md


def test_train_run_passes_the_jsd_weight_to_the_recipe(tmp_path):
    """A real icl+jsd run: the recipe trains CE + lambda ICL + jsd_weight JSD and records both weights."""
    args = reproduce_table1.parse_settings(["--quick", "--out", str(tmp_path), "--train-sizes", "600"])
    args.ref_epochs, args.ft_epochs = 1, 1
    data = reproduce_table1.prepare_data(args, tmp_path / "data")
    ref = reproduce_table1.train_run(args, data, tmp_path / "ref", size=64, constraint="none")
    kw = dict(size=64, constraint="icl+jsd", lam=0.3, init=ref, sched="constant", jsd_weight=5.0)
    model = reproduce_table1.train_run(args, data, tmp_path / "combined", **kw)
    train_argv = json.loads((tmp_path / "combined" / "reuse.json").read_text())["train"]
    assert train_argv[train_argv.index("--jsd-weight") + 1] == "5.0"
    icl = json.loads((model / "config.json").read_text())["icl"]
    assert (icl["method"], icl["lambda"], icl["jsd_weight"]) == ("icl+jsd", 0.3, 5.0)
    assert icl["reference"].startswith("a frozen copy")
    records = [json.loads(x) for x in (tmp_path / "combined" / "metrics.jsonl").read_text().splitlines() if x]
    assert any(r.get("constraint_loss", 0) > 0 for r in records)


def test_settings_errors_and_grids():
    parse = reproduce_table1.parse_settings
    assert parse(["--lambdas", "extended"]).lambdas == "0.125,0.1,0.075,0.05,0.025,0.3,1,3"
    assert parse(["--lambdas", "0.1"]).jsd_lambdas == "1,3,12"  # JSD's own grid (AugMix's alpha 12)
    assert parse([]).ft_scheds == ["constant"] and parse(["--shared-reference"]).references == ["shared"]
    assert parse(["--constraints", "icl+jsd,icl,jsd"]).constraints == "icl,jsd,icl+jsd"  # jsd's weight first
    for argv, message in (
        (["--ft-sched", "linear"], "--ft-sched 'linear': choose from constant, cosine"),
        (["--reference", "mine"], "--reference 'mine': choose from own, shared"),
        (["--lambdas", "0.1,x"], "comma-separated numbers"),
        (["--lambdas", "0,1"], "every lambda must be > 0"),
        (["--constraints", "icl,augmix"], "--constraints 'icl,augmix': choose from icl, mse, ab, jsd, icl\\+jsd"),
    ):
        with pytest.raises(SystemExit, match=message):
            parse(argv)


def test_stopped_invocation_leaves_a_partial_report_with_whole_seed_rounds(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)

    def fake_train(
        args, data_dir, run_dir, *, size, constraint, lam=None, seed=0, init=None, sched="cosine", jsd_weight=None
    ):
        if seed == 1 and sched == "cosine":
            raise KeyboardInterrupt  # stopped during the second round of seeds
        (run_dir / "model").mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "images_per_s": 100.0}) + "\n")
        return run_dir / "model"

    monkeypatch.setattr(reproduce_table1, "train_run", fake_train)
    monkeypatch.setattr(reproduce_table1, "prepare_data", lambda args, d: d)
    monkeypatch.setattr(reproduce_table1, "evaluate_run", lambda *a: _fake_result(rng, 0.5))
    argv = ["--train-sizes", "12000", "--seeds", "3", "--constraints", "icl", "--lambdas", "0.1,1"]
    argv += ["--ft-sched", "constant,cosine", "--name", "partial", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        reproduce_table1.main(argv)
    saved = json.loads((tmp_path / "partial.json").read_text())
    assert [len(r["runs"]["icl"]) for r in saved["protocols"]] == [1, 1]  # round 0 of both schedules
    assert "(PARTIAL: 1 of 3 seeds finished in every protocol)" in (tmp_path / "partial.md").read_text()
