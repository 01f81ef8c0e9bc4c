"""Robustness evaluation: numbers equal a hand-computed loop, reproducible JSON, table and plot."""

import json

import pytest
import timm
import torch

import timm_icl  # noqa: F401  (registers vgg_tiny)
from timm_icl.distortions import Distortion, gaussian_blur, gaussian_noise, parse_distortions
from timm_icl.distortions.counter_rng import CounterRNG
from timm_icl.eval import format_table, load_results, plot_accuracy_vs_sigma, save_results
from timm_icl.eval.evaluate import distort, evaluate_robustness

DISTORTIONS = "noise:30,90 blur:1,2"


MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def model_and_data():
    # A small conv net whose predictions do depend on pixel detail (a random-init VGG predicts one class for
    # every random image, which would make the distortions invisible in the numbers).
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 26 * 26, 10)
    ).eval()
    images = torch.rand(22, 3, 28, 28)
    with torch.no_grad():
        pred = model(_normalize(images)).argmax(1)
    labels = pred.clone()
    labels[::3] = (pred[::3] + 1) % 10  # some clean mistakes too
    return model, images, labels


def _normalize(x):
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _loader(images, labels, batch_size):
    return [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size)]


def test_numbers_equal_hand_computed_loop(model_and_data):
    model, images, labels = model_and_data
    results = evaluate_robustness(model, _loader(images, labels, 5), DISTORTIONS, seed=3, mean=MEAN, std=STD)

    conditions = [Distortion("clean")] + list(parse_distortions(DISTORTIONS))
    assert list(results["conditions"]) == ["clean", "noise30", "noise90", "blur1", "blur2"]
    for ci, cond in enumerate(conditions):
        top1 = top5 = 0
        per_image = []
        for j in range(len(images)):  # one image at a time, distortion functions called directly
            x = images[j : j + 1]
            if cond.kind == "noise":
                # the counter-based generator: the numbers of image j under condition ci, whatever the batch
                x = gaussian_noise(x, cond.sigma, generator=CounterRNG(3, ci, torch.tensor([j])))
            elif cond.kind == "blur":
                x = gaussian_blur(x, cond.sigma)
            with torch.no_grad():
                logits = model(_normalize(x))[0]
            ranked = logits.argsort(descending=True).tolist()
            top1 += ranked[0] == labels[j].item()
            top5 += labels[j].item() in ranked[:5]
            per_image.append(int(ranked[0] == labels[j].item()))
        got = results["conditions"][cond.name]
        assert got["correct"] == top1 and got["count"] == len(images)
        assert got["top1"] == pytest.approx(top1 / len(images))
        assert got["top5"] == pytest.approx(top5 / len(images))
        assert results["per_image"][cond.name] == per_image
    # the distortions must actually matter for this test to mean anything
    assert results["conditions"]["noise90"]["top1"] < results["conditions"]["clean"]["top1"]
    s = results["summary"]
    c = results["conditions"]
    assert s["clean"] == c["clean"]["top1"]
    assert s["noise"] == pytest.approx((c["noise30"]["top1"] + c["noise90"]["top1"]) / 2)
    assert s["blur"] == pytest.approx((c["blur1"]["top1"] + c["blur2"]["top1"]) / 2)


def test_two_runs_identical_json_any_batch_size(model_and_data, tmp_path):
    model, images, labels = model_and_data
    a = evaluate_robustness(model, _loader(images, labels, 4), DISTORTIONS, seed=0, mean=MEAN, std=STD)
    b = evaluate_robustness(model, _loader(images, labels, 4), DISTORTIONS, seed=0, mean=MEAN, std=STD)
    c = evaluate_robustness(model, _loader(images, labels, 22), DISTORTIONS, seed=0, mean=MEAN, std=STD)
    pa, pb, pc = (
        save_results(a, tmp_path / "a.json"),
        save_results(b, tmp_path / "b.json"),
        save_results(c, tmp_path / "c.json"),
    )
    assert pa.read_bytes() == pb.read_bytes() == pc.read_bytes()
    assert load_results(pa) == json.loads(json.dumps(a))  # per-image bits unpacked again
    # the seed matters: another seed draws other noise for the same image
    noise = Distortion("noise", 30)
    x0 = distort(images[:2], noise, seed=0, condition_index=1)
    x1 = distort(images[:2], noise, seed=1, condition_index=1)
    assert not torch.equal(x0, x1)
    assert torch.equal(x0[1:], distort(images[1:2], noise, seed=0, condition_index=1, image_indices=[1]))


def test_default_set_is_papers_and_topk_options(model_and_data):
    _, images, labels = model_and_data
    model = timm.create_model("vgg_tiny", num_classes=10)  # mean/std from its pretrained_cfg
    res = evaluate_robustness(model, _loader(images[:4], labels[:4], 4), topk=(1,), per_image=False)
    assert list(res["conditions"]) == ["clean"] + [f"noise{s}" for s in (20, 40, 60, 80, 100)] + [
        f"blur{s}" for s in (2, 4, 6, 8, 10)
    ]
    assert "per_image" not in res and "top5" not in res["conditions"]["clean"]
    assert res["distortions"] == "noise:20,40,60,80,100 blur:2,4,6,8,10"
    # the ImageNet-C set keeps its own blur kernels (2*ceil(4*sigma)+1), wider than these 28 px images
    res_c = evaluate_robustness(model, _loader(images[:4], labels[:4], 4), "imagenet-c", per_image=False)
    assert list(res_c["conditions"])[1:] == ["noise20.4", "noise30.6", "noise45.9", "noise66.3", "noise96.9"] + [
        f"blur{s}" for s in (1, 2, 3, 4, 6)
    ]
    assert all(c["count"] == 4 for c in res_c["conditions"].values())


def test_bad_batches_give_clear_errors(model_and_data):
    model, images, labels = model_and_data
    with pytest.raises(ValueError, match=r"no pretrained_cfg mean/std .*pass mean=... and std=..."):
        evaluate_robustness(model, [(images[:2], labels[:2])], "noise:20")  # a model built by hand: no guess
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        evaluate_robustness(model, [(images[:2, :1], labels[:2])], "noise:20", mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="tuples"):
        evaluate_robustness(model, [images[:2]], "noise:20", mean=MEAN, std=STD)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        evaluate_robustness(model, [(images[:2], torch.tensor([3, 10]))], "noise:20", mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="no images"):
        evaluate_robustness(model, [], "noise:20", mean=MEAN, std=STD)


def _fake(clean, noise, blur):
    conds = {"clean": {"kind": "clean", "sigma": 0.0, "top1": clean}}
    conds.update({f"noise{s}": {"kind": "noise", "sigma": float(s), "top1": v} for s, v in zip((20, 40), noise)})
    conds.update({f"blur{s}": {"kind": "blur", "sigma": float(s), "top1": v} for s, v in zip((2, 4), blur)})
    return {"conditions": conds}


def test_format_table_paper_layout():
    table = format_table(
        {"Fine-tuning": _fake(0.6744, (0.6, 0.5), (0.55, 0.45)), "ICL": _fake(0.6769, (0.62, 0.5), (0.5, 0.4))}
    )
    lines = table.splitlines()
    assert lines[0] == "| method | clean | noise mean | blur mean | noise20 | noise40 | blur2 | blur4 |"
    assert lines[2] == "| Fine-tuning | 0.6744 | 0.5500 | 0.5000 | 0.6000 | 0.5000 | 0.5500 | 0.4500 |"
    assert lines[3].startswith("| ICL | 0.6769 | 0.5600 | 0.4500 |")


def test_plot_writes_png(tmp_path):
    path = plot_accuracy_vs_sigma(
        {"a": _fake(0.9, (0.8, 0.6), (0.7, 0.5)), "b": _fake(0.9, (0.85, 0.7), (0.75, 0.6))}, tmp_path / "p.png"
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


_TWO_PROCESS_SCRIPT = r"""
import json, sys, torch
from accelerate import Accelerator
from timm_icl.eval.evaluate import evaluate_robustness
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 10)
)
images, labels = torch.rand(23, 3, 16, 16), torch.randint(0, 10, (23,))
rank, world = accelerator.process_index, accelerator.num_processes
# round-robin shard (what a DistributedSampler without shuffling gives): rank r sees images r, r + world, ...
shard = [(images[i::world][j : j + 4], labels[i::world][j : j + 4]) for i in [rank] for j in range(0, 12, 4)]
res = evaluate_robustness(model, shard, "noise:50 blur:1", accelerator=accelerator, mean=(0.5,) * 3, std=(0.5,) * 3)
single = evaluate_robustness(model, [(images, labels)], "noise:50 blur:1", mean=(0.5,) * 3, std=(0.5,) * 3)
if accelerator.is_main_process:
    json.dump({"multi": res, "single": single, "world": world}, open(sys.argv[1], "w"))
accelerator.end_training()  # destroy the gloo group before exit (else rank 0 can abort at teardown)
"""


def test_two_processes_give_exact_counts(tmp_path):
    """Two gloo processes, each on half the images: counts summed exactly, same numbers as one process."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port, so parallel test runs do not collide on 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*cmd, str(script), str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["world"] == 2
    multi, single = data["multi"], data["single"]
    assert multi["num_samples"] == single["num_samples"] == 23
    for name, cond in single["conditions"].items():
        assert multi["conditions"][name]["correct"] == cond["correct"]
        assert multi["conditions"][name]["top1"] == cond["top1"]
        # gathered in rank order: rank 0's images (0, 2, 4, ...) then rank 1's (1, 3, ...)
        order = list(range(0, 23, 2)) + list(range(1, 23, 2))
        assert multi["per_image"][name] == [single["per_image"][name][i] for i in order]


def test_statistics_match_references():
    from scipy.stats import binomtest

    from timm_icl.eval import format_comparison, mcnemar_test, paired_z_test, wilson_interval

    low, high = wilson_interval(80, 100)
    assert (round(low, 4), round(high, 4)) == (0.7112, 0.8666)  # textbook Wilson interval for 80/100
    a = [1] * 10 + [0] * 3 + [1] * 50 + [0] * 7
    b = [0] * 10 + [1] * 3 + [1] * 50 + [0] * 7
    test = mcnemar_test(a, b)
    assert (test["a_only"], test["b_only"]) == (10, 3)
    assert test["p_value"] == pytest.approx(binomtest(3, 13, 0.5).pvalue, rel=1e-12)
    big_a, big_b = [1] * 4000 + [0] * 3000, [0] * 4000 + [1] * 3000  # 7000 discordant pairs: chi-square branch
    assert mcnemar_test(big_a, big_b)["p_value"] == pytest.approx(binomtest(3000, 7000, 0.5).pvalue, rel=0.05)
    with pytest.raises(ValueError, match="same images"):
        mcnemar_test([1, 0], [1])
    # identical runs: no difference, p = 1
    assert paired_z_test([[1, 0, 1]], [[1, 0, 1]])["p_value"] == 1.0
    z = paired_z_test([[1, 1, 1, 0], [1, 1, 0, 0]], [[0, 1, 1, 0], [0, 1, 0, 0]])
    assert z["mean_difference"] == pytest.approx(0.25)

    res = {
        "conditions": {
            "clean": {"kind": "clean", "sigma": 0.0, "top1": 0.5, "correct": 2, "count": 4},
            "noise20": {"kind": "noise", "sigma": 20.0, "top1": 0.25, "correct": 1, "count": 4},
        },
        "per_image": {"clean": [1, 1, 0, 0], "noise20": [1, 0, 0, 0]},
    }
    text = format_comparison({"a": res, "b": res})
    assert "| a | 4 | 0.5000 [" in text and "| b | clean | +0.0000 | 0 | 0 | McNemar exact | 1.000 |" in text


@pytest.mark.parametrize("distortions", ["paper", "imagenet-c-10"])
def test_evaluation_syncs_constant_per_batch_and_batch_size_independent(distortions):
    """No per-image work: the sync-forcing ops and host reads of a whole evaluation grow by a constant per batch
    (0 for the paper's set; the JPEG codec's 2 host reads per jpeg condition for imagenet-c-10), whatever the batch
    size; and the numbers at batch 4 and 16 are identical (counter-based noise per image)."""
    from timm_icl.utils.sync_debug import SyncCounter

    torch.manual_seed(0)
    model = timm.create_model("vgg_tiny", num_classes=10)
    images = (torch.rand(32, 3, 32, 32) * 255).to(torch.uint8)
    labels = torch.randint(0, 10, (32,))
    evaluate_robustness(model, _loader(images[:4], labels[:4], 4), distortions)  # tables cached per device
    totals, results = {}, {}
    for batch in (4, 16):
        for n in (1, 2):
            with SyncCounter() as sync:
                results[batch, n] = evaluate_robustness(model, _loader(images[: n * batch], labels, batch), distortions)
            totals[batch, n] = (sync.syncs, sync.host_reads + sync.host_data)
    per_batch = 0 if distortions == "paper" else 10  # 5 jpeg levels x (images to the host, qualities read)
    for batch in (4, 16):
        assert totals[batch, 2][0] == totals[batch, 1][0]  # no sync-forcing op inside the loop
        assert totals[batch, 2][1] - totals[batch, 1][1] == per_batch
    assert totals[4, 1] == totals[16, 1]  # the same constant for 4 or 16 images a batch
    four = evaluate_robustness(model, _loader(images, labels, 4), distortions)
    sixteen = evaluate_robustness(model, _loader(images, labels, 16), distortions)
    assert four["conditions"] == sixteen["conditions"] and four["per_image"] == sixteen["per_image"]


def test_counter_rng_draws_have_their_distributions_and_ignore_the_batch():
    """CounterRNG: uniforms in (0, 1) with mean 1/2 and variance 1/12, normals N(0, 1), Poisson mean = variance =
    rate; an image's numbers are the same alone or in a batch, and each draw is a new field."""
    index = torch.arange(64)
    rng = CounterRNG(7, 2, index)
    u = rng.uniform((64, 3, 32, 32), torch.float64)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    z = rng.normal((64, 3, 32, 32), torch.float64)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    for rate in (0.5, 3.0, 60.0):
        k = rng.poisson(torch.full((64, 3, 32, 32), rate), max_rate=60.0)
        assert torch.equal(k, k.round()) and float(k.min()) >= 0
        assert abs(float(k.mean()) / rate - 1) < 0.02 and abs(float(k.var()) / rate - 1) < 0.05
    alone = CounterRNG(7, 2, index[5:6]).uniform((1, 3, 32, 32), torch.float64)
    assert torch.equal(alone[0], CounterRNG(7, 2, index).uniform((64, 3, 32, 32), torch.float64)[5])
    assert not torch.equal(u, rng.uniform((64, 3, 32, 32), torch.float64))
