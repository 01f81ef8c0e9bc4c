"""Reproduce the paper's Table 1 in miniature, on real data, offline: Fashion-MNIST and a small VGG.

    .venv/bin/python recipes/reproduce_table1.py                 # Table 1 (~40 min on 2 cores)
    .venv/bin/python recipes/reproduce_table1.py --quick         # pipeline check (~1 min idle), not a conclusion
    .venv/bin/python recipes/reproduce_table1.py --train-sizes 3000,12000,54000   # where does ICL help?
    .venv/bin/python recipes/reproduce_table1.py --report-only results/table1_fashion_mnist.json

Every number comes from the code paths users run: each model is trained by ``recipes/train_icl.py``
(``train_icl.main([...])``, in this process; its run folder under ``--out``/runs/), and evaluated by
``timm-icl eval`` on the exported model (``timm_icl.cli.main([...])``: ``evaluate_robustness``, noise seeded per
image, per-image correctness kept). Tables, plots, intervals and paired tests come from ``timm_icl.eval``.

The protocol (the paper's, scaled down; every choice the paper leaves open is below):
1. Carve a validation split (6,000 images, fixed seed) out of the 60,000 training images; the remaining 54,000
   (in a fixed random order) are the fitting data, written once as parquet under ``--out``/runs/<name>/data. The
   test set (10,000 images) is only used for the final table.
2. Train the reference (``vgg_tiny``: vgg16's layout with ``pre_logits.fc1/fc2``) on clean images.
3. Lambda sweep {0.125, 0.1, 0.075, 0.05, 0.025} for each constraint (ICL, MSE, AB) with seed 0, selected on the
   validation split by the mean top-1 over the ten distortion conditions (``--lambdas extended`` adds 0.3, 1, 3;
   ``--lambdas 0.025,0.1,1`` any grid).
4. With the selected lambdas, fine-tune plain / MSE / ICL / AB from the reference for several seeds. Within a seed
   every method sees the same data order and the same distortion draws.
5. Evaluate every model on the test set, clean and under each condition (noise seed 0), and write
   ``results/table1_fashion_mnist.{md,json,png}``: mean ± std over seeds, 95% intervals, and paired tests against
   plain fine-tuning on the same images (per-image accuracy averaged over seeds and sigmas).

``--train-sizes 3000,12000,54000`` runs the whole protocol (reference, lambda sweep, seeds) on the first N fitting
images for each N and writes ``results/train_size_sweep.{md,json,png}``: the ICL - fine-tuning gain on noise and
blur against the training-set size, with 95% intervals and paired tests (``--shared-reference`` trains one
reference on all 54,000 fitting images instead: a practitioner's pretrained model, fine-tuned on less data; it is
the 54,000-image protocol's own reference, the same run folder; ``--reference own,shared`` runs both).
``--name when_icl_helps`` writes the report under another stem; the report is rewritten after each round of seeds, so a
stopped invocation leaves a partial one (labelled so), and the next invocation reuses every finished run. Every
protocol's lambda sweep runs first, then the seeds round by round across the protocols (the report rewritten after
each round); seed 0 of a constraint is its sweep run at the selected lambda (same arguments: the same run).

Distortions: the paper's sigmas are meant for 224 px ImageNet images; for 28 px images the set is
``timm_icl.SMALL_IMAGE_DISTORTIONS`` (noise 30..150, blur 1..3 px with the paper's kernel rule), chosen so that the
clean reference falls from mild to severe across the five levels of each type (the report shows it).

Open choices (paper silent): one model per method trained on noise and blur together, one condition drawn
uniformly per image, noise clamped to [0, 1], reflect-101 blur borders, no crop (28 px images are used whole), SGD
with momentum 0.9 (timm's ``momentum`` optimizer), weight decay 5e-4 (not on biases and norms, timm's default).
The fine-tuning schedule is ``--ft-sched``: ``constant`` by default (the paper names none: a constant rate), ``cosine``,
or ``constant,cosine`` (every protocol under both: the schedule contrast); the reference always trains with cosine
and is shared by the schedules. The paper's learning rate 0.001 is for an ImageNet-trained VGG-16 over 40 epochs;
here fine-tuning runs a few epochs, so it uses 0.01 (``--ft-lr``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

RECIPES = Path(__file__).resolve().parent
sys.path.insert(0, str(RECIPES))

import train_icl  # noqa: E402  (the training recipe, imported: one training loop)

import timm_icl  # noqa: E402
from timm_icl import cli, parse_distortions  # noqa: E402
from timm_icl.data.fashion_mnist import CLASS_NAMES, fashion_mnist_root, load_fashion_mnist, local_files_available  # noqa: E402
from timm_icl.eval import (  # noqa: E402
    compare_runs,
    format_comparison,
    format_table,
    load_results,
    plot_accuracy_vs_sigma,
    summarize,
)
from timm_icl.eval.results_io import pack_result, unpack_result  # noqa: E402
from timm_icl.utils.files import atomic_write_text  # noqa: E402
from timm_icl.utils.jsonio import canonical_json  # noqa: E402

NAMES = {
    "none": "Fine-tuning",
    "icl": "ICL (proposed)",
    "mse": "MSE",
    "ab": "AB (Heo et al.)",
    "jsd": "JSD (AugMix)",
    "icl+jsd": "ICL + JSD",
}
SPLIT_SEED = 12345
SCHEDULES = ("constant", "cosine")  # fine-tuning schedules (timm's --sched); the reference trains with cosine
LAMBDA_GRIDS = {"paper": "0.125,0.1,0.075,0.05,0.025", "extended": "0.125,0.1,0.075,0.05,0.025,0.3,1,3"}


# ---------------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small subsets, 1 epoch, 2 lambdas, 2 seeds: a check")
    parser.add_argument("--model", default="vgg_tiny")
    parser.add_argument("--distortions", default="small", help="distortion set text, or 'small' (28 px) / 'paper'")
    parser.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds per method (>= 3 for the sweep)")
    parser.add_argument("--ref-epochs", type=int, default=8)
    parser.add_argument("--ref-lr", type=float, default=0.05)
    parser.add_argument("--ref-batch-size", type=int, default=128)
    parser.add_argument("--ft-epochs", type=int, default=3)
    parser.add_argument("--ft-lr", type=float, default=0.01)
    parser.add_argument(
        "--ft-sched",
        default="constant",
        help="fine-tuning learning-rate schedule: constant (the paper's: no schedule named), cosine, or both "
        "(constant,cosine: every protocol under each, for the schedule contrast); the reference is always cosine",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="fine-tuning batch (the paper's)")
    parser.add_argument(
        "--lambdas",
        default="paper",
        help="lambda grid for the validation sweep: values (0.025,0.1,1), 'paper' (0.125,0.1,0.075,0.05,0.025) or "
        "'extended' (the paper's plus 0.3,1,3)",
    )
    parser.add_argument(
        "--constraints", default="icl,mse,ab", help="any of icl, mse, ab, jsd (timm's AugMix JSD), icl+jsd (both)"
    )
    parser.add_argument("--jsd-lambdas", default="1,3,12", help="the JSD constraint's grid (AugMix / timm: 12)")
    parser.add_argument(
        "--icl-jsd-lambdas",
        default=None,
        help="icl+jsd: the grid of its ICL lambda (default: --lambdas); its JSD weight is the one jsd selected on "
        "validation when jsd is in --constraints, else --jsd-weight",
    )
    parser.add_argument("--jsd-weight", type=float, default=12.0, help="icl+jsd's JSD weight without a jsd sweep")
    parser.add_argument("--val-size", type=int, default=6000)
    parser.add_argument("--test-size", type=int, default=None, help="first N test images (default: all 10,000)")
    parser.add_argument("--train-sizes", default=None, help="e.g. 3000,12000,54000: the training-set-size sweep")
    parser.add_argument(
        "--reference",
        default="own",
        help="own: a reference trained on each size's N images; shared: one reference on all fitting images "
        "(a practitioner's pretrained model, fine-tuned on less data); own,shared: both",
    )
    parser.add_argument("--shared-reference", action="store_true", help="the same as --reference shared")
    parser.add_argument("--name", default=None, help="report file stem under OUT (default: by mode)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="reports here, run folders in OUT/runs/")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--report-only", type=Path, default=None, help="rebuild the Markdown and plot from a JSON")
    return parser


def parse_settings(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.lambdas = LAMBDA_GRIDS.get(args.lambdas, args.lambdas)
    if args.shared_reference:
        args.reference = "shared"
    args.ft_scheds = parse_list(args.ft_sched, "--ft-sched", SCHEDULES)
    constraints = parse_list(args.constraints, "--constraints", tuple(c for c in NAMES if c != "none"))
    if "icl+jsd" in constraints and "jsd" in constraints:  # jsd's sweep first: icl+jsd takes its selected weight
        constraints.remove("icl+jsd")
        constraints.insert(constraints.index("jsd") + 1, "icl+jsd")
    args.constraints = ",".join(constraints)
    args.references = parse_list(args.reference, "--reference", ("own", "shared"))
    try:
        lambdas = [float(v) for v in args.lambdas.split(",")]
    except ValueError:
        sys.exit(f"error: --lambdas {args.lambdas!r}: comma-separated numbers, 'paper' or 'extended'")
    if any(lam <= 0 for lam in lambdas):
        sys.exit(f"error: --lambdas {args.lambdas!r}: every lambda must be > 0 (lambda 0 is plain fine-tuning)")
    if args.quick:  # the pipeline end to end on small subsets: checks the code, not the conclusion
        args.seeds, args.ref_epochs, args.ft_epochs = 2, 2, 1
        args.lambdas = "0.1,0.05" if args.lambdas == LAMBDA_GRIDS["paper"] else args.lambdas
        args.val_size, args.test_size = 150, args.test_size or 300
        args.constraints = "icl,mse" if args.constraints == "icl,mse,ab" else args.constraints
    sizes = [int(s) for s in args.train_sizes.split(",")] if args.train_sizes else None
    args.sizes = sizes or [600 if args.quick else 60000 - args.val_size]
    args.mode = "train_sizes" if sizes else "table1"
    args.reused = []  # run folders taken from an earlier invocation (train_run)
    if args.mode == "train_sizes" and args.seeds < 3 and not args.quick:
        sys.exit("error: the training-set-size sweep needs --seeds 3 or more (paired tests over seeds)")
    if max(args.sizes) > 60000 - args.val_size:
        sys.exit(f"error: --train-sizes up to {60000 - args.val_size} (60,000 minus the validation split)")
    return args


def parse_list(text: str, option: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated choice list, in the order given, each value once."""
    values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        sys.exit(f"error: {option} {text!r}: choose from {', '.join(allowed)} (comma-separated for several)")
    return values


def stem_of(args: argparse.Namespace) -> str:
    if args.name:
        return args.name + ("_quick" * args.quick)
    return ("train_size_sweep" if args.mode == "train_sizes" else "table1_fashion_mnist") + ("_quick" * args.quick)


# ---------------------------------------------------------------------------------------------------------------------
# data: the validation split carved out of Fashion-MNIST's training images, as parquet the recipe reads
# ---------------------------------------------------------------------------------------------------------------------
def prepare_data(args: argparse.Namespace, data_dir: Path) -> Path:
    """``data_dir/{train,validation}.parquet``: the fitting images (all 54,000 in a fixed random order, so every
    training-set size is a prefix of the same file; ``--quick``: only the first max(sizes)) and the validation
    split. Written once: a later call with the same split reuses the files (runs read them while another run of
    this script may be writing its report)."""
    import datasets
    from PIL import Image

    if not (local_files_available("train") and local_files_available("test")):
        sys.exit(
            f"Fashion-MNIST not found in {fashion_mnist_root()}; install it with "
            "`apt-get install dataset-fashion-mnist` (or run `bash .ci/setup`), or set TIMM_ICL_FASHION_MNIST"
        )
    fitting = max(args.sizes) if args.quick else 60000 - args.val_size
    key = {"split_seed": SPLIT_SEED, "val_size": args.val_size, "fitting_images": fitting}
    files = [data_dir / "train.parquet", data_dir / "validation.parquet"]
    if finished(data_dir / "reuse.json", key) and all(f.exists() for f in files):
        return data_dir
    (data_dir / "reuse.json").unlink(missing_ok=True)
    images, labels = load_fashion_mnist("train")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED)).numpy()
    splits = {"validation": order[: args.val_size], "train": order[args.val_size :][:fitting]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, index in splits.items():
        rows = {"image": [Image.fromarray(images[i]) for i in index], "label": labels[index].tolist()}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(data_dir / f"{split}.parquet"))
    mark_finished(data_dir / "reuse.json", key)
    return data_dir


# ---------------------------------------------------------------------------------------------------------------------
# one training run (the recipe) and one evaluation (timm-icl eval)
# ---------------------------------------------------------------------------------------------------------------------
def train_run(
    args: argparse.Namespace,
    data_dir: Path,
    run_dir: Path,
    *,
    size: int,
    constraint: str,
    lam: float | None = None,
    seed: int = 0,
    init: Path | None = None,
    sched: str = "cosine",
    jsd_weight: float | None = None,
) -> Path:
    """Train one model with ``train_icl.main``; ``init=None`` trains the reference on clean images (always with a
    cosine schedule), else fine-tunes ``init`` with the learning-rate schedule ``sched`` (timm's ``--sched``).
    Returns the exported model folder (``run_dir/model``); the training's wall time goes to ``run_dir/wall.json``."""
    sched = "cosine" if init is None else sched
    common = ["--dataset", str(data_dir), "--train-split", "train", "--val-split", "none"]
    common += ["--max-train-samples", str(size), "--opt", "momentum", "--momentum", "0.9", "--weight-decay", "5e-4"]
    common += ["--sched", sched, "--seed", str(seed), "--num-workers", "0", "--checkpoint-every-epochs", "0"]
    common += ["--output-dir", str(run_dir), "--log-every", "20", "--distortions", args.distortions]
    if init is None:  # the reference: plain training on clean images
        argv = ["--model", args.model, "--no-pretrained", "--num-classes", str(len(CLASS_NAMES))]
        argv += ["--constraint", "none", "--clean-fraction", "1.0", "--epochs", str(args.ref_epochs)]
        argv += ["--lr", str(args.ref_lr), "--batch-size", str(args.ref_batch_size)]
    else:
        argv = ["--init-checkpoint", str(init), "--constraint", constraint, "--epochs", str(args.ft_epochs)]
        argv += ["--lr", str(args.ft_lr), "--batch-size", str(args.batch_size)]
        argv += ["--constraint-weight", str(lam)] if lam is not None and constraint != "none" else []
        argv += ["--jsd-weight", str(jsd_weight)] if constraint == "icl+jsd" else []
    key = {"train": common + argv, "split_seed": SPLIT_SEED, "val_size": args.val_size}
    if finished(run_dir / "reuse.json", key) and (run_dir / "model").is_dir():
        print(f"[reuse] {run_dir.name}: finished earlier with the same arguments", flush=True)
        args.reused.append(str(run_dir))
        return run_dir / "model"
    if run_dir.exists():  # an unfinished or different run: start it again from nothing
        shutil.rmtree(run_dir)
    print(f"[train] {run_dir}", flush=True)
    start = time.perf_counter()
    code = train_icl.main(common + argv)
    if not code.finished:  # a signal stopped it (exit 0 for SIGTERM): never recorded as finished
        print(f"[stopped] {run_dir}: training stopped before its end, nothing recorded; rerun to train it", flush=True)
        sys.exit(int(code))
    (run_dir / "wall.json").write_text(json.dumps({"train_seconds": time.perf_counter() - start}))
    mark_finished(run_dir / "reuse.json", key)
    return run_dir / "model"


def finished(marker: Path, key: dict) -> bool:
    """Whether ``marker`` records ``key``: the run (or evaluation) ran to its end with these exact arguments."""
    try:
        return json.loads(marker.read_text()) == json.loads(json.dumps(key))
    except (OSError, ValueError):
        return False


def mark_finished(marker: Path, key: dict) -> None:
    """Write ``key`` to ``marker`` atomically, after the work it describes is complete."""
    atomic_write_text(marker, json.dumps(key))


def evaluate_run(args: argparse.Namespace, model_dir: Path, dataset: str, split: str, size: int | None) -> dict:
    """``timm-icl eval`` on an exported model (in this process); writes ``<run>/<split>.json`` and returns it."""
    out = model_dir.parent / f"{split}.json"
    argv = ["eval", str(model_dir), "--dataset", dataset, "--split", split, "--distortions", args.distortions]
    argv += ["--seed", "0", "--batch-size", "250", "-o", str(out), "-q"]
    argv += ["--max-samples", str(size)] if size else []
    marker = out.with_name(f"{split}.reuse.json")  # in the run folder: retraining the model removes it
    if not (finished(marker, {"eval": argv}) and out.exists()):
        if cli.main(argv) != 0:
            raise SystemExit(f"error: timm-icl eval failed on {model_dir}")
        mark_finished(marker, {"eval": argv})
    return load_results(out)


def train_seconds(run_dir: Path) -> float | None:
    """Wall time of a run's training (``wall.json``, written when it finished; None for older runs)."""
    try:
        return float(json.loads((run_dir / "wall.json").read_text())["train_seconds"])
    except (OSError, ValueError, KeyError):
        return None


def images_per_second(run_dir: Path) -> float | None:
    """Training throughput of a run: the last train record of its metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r and r.get("kind", "train") == "train"]
    return rates[-1] if rates else None


def distorted_mean(result: dict) -> float:
    """The lambda-selection score: mean top-1 over every distortion condition (not clean)."""
    return statistics.fmean(c["top1"] for c in result["conditions"].values() if c["kind"] != "clean")


# ---------------------------------------------------------------------------------------------------------------------
# the protocol at one training-set size
# ---------------------------------------------------------------------------------------------------------------------
def run_protocol(
    args: argparse.Namespace,
    data_dir: Path,
    runs: Path,
    size: int,
    reference: Path | None,
    sched: str = "constant",
    reference_size: int | None = None,
) -> dict:
    """One whole protocol: :func:`start_protocol`, then :func:`run_seed` for ``args.seeds`` seeds."""
    record = start_protocol(args, data_dir, runs, size, reference, sched, reference_size)
    for seed in range(args.seeds):
        run_seed(args, data_dir, record, seed)
    return record


def start_protocol(
    args: argparse.Namespace,
    data_dir: Path,
    runs: Path,
    size: int,
    reference: Path | None,
    sched: str = "constant",
    reference_size: int | None = None,
) -> dict:
    """Reference (unless given: trained on ``reference_size`` images) and the lambda sweep on validation (seed 0),
    fine-tuning with the schedule ``sched``. Returns the protocol's record, its seeds still to run."""
    constraints = [c for c in args.constraints.split(",") if c]
    runs = runs / f"n{size}"
    if reference is None:
        reference = train_run(args, data_dir, runs / "reference", size=size, constraint="none")
    elif reference_size != size:  # a shared reference: its fine-tuning runs apart from the own-reference ones
        runs = runs.with_name(f"n{size}_ref{reference_size}")
    runs = runs / sched  # the reference is shared by the schedules, the fine-tuning runs are not
    record: dict = {"train_size": size, "reference_model": str(reference), "ft_sched": sched}
    record.update(reference_size=reference_size or size, run_folder=str(runs), train_seconds={}, images_per_s={})
    record["reference_val"] = evaluate_run(args, reference, str(data_dir), "validation", None)
    record["reference_test"] = evaluate_run(args, reference, "fashion-mnist", "test", args.test_size)

    sweep: dict[str, dict[str, float]] = {}
    selected: dict[str, float] = {"none": 0.0}
    grids = {"jsd": args.jsd_lambdas, "icl+jsd": getattr(args, "icl_jsd_lambdas", None) or args.lambdas}
    for constraint in constraints:
        sweep[constraint] = {}
        if constraint == "icl+jsd":  # the JSD weight jsd selected on validation (its sweep ran just before)
            record["jsd_weight"] = selected.get("jsd", getattr(args, "jsd_weight", 12.0))
        for lam in [float(v) for v in grids.get(constraint, args.lambdas).split(",")]:
            run_dir = runs / f"sweep_{constraint}_l{lam:g}"
            model = train_run(
                args,
                data_dir,
                run_dir,
                size=size,
                constraint=constraint,
                lam=lam,
                init=reference,
                sched=sched,
                jsd_weight=record.get("jsd_weight") if constraint == "icl+jsd" else None,
            )
            record["train_seconds"][run_dir.name] = train_seconds(run_dir)
            score = distorted_mean(evaluate_run(args, model, str(data_dir), "validation", None))
            sweep[constraint][f"{lam:g}"] = score
            print(
                f"[sweep n={size} {sched}] {constraint} lambda {lam:g}: validation distorted top-1 {score:.4f}",
                flush=True,
            )
        selected[constraint] = float(max(sweep[constraint], key=sweep[constraint].get))
        print(f"[sweep n={size} {sched}] {constraint}: lambda {selected[constraint]:g} (paper: icl 0.1, mse 0.05)")
    record.update(sweep=sweep, selected_lambda=selected)
    record["runs"] = {m: [] for m in ["none"] + constraints}
    record["run_dirs"] = {m: [] for m in record["runs"]}
    return record


def run_seed(args: argparse.Namespace, data_dir: Path, record: dict, seed: int) -> dict:
    """Every method of a started protocol with one seed, evaluated on the test set. Seed 0 of a constraint is the
    sweep's run at the selected lambda (the same arguments, so the same run: not trained twice)."""
    runs, reference = Path(record["run_folder"]), Path(record["reference_model"])
    for method in record["runs"]:
        lam = record["selected_lambda"][method]
        run_dir = runs / (f"sweep_{method}_l{lam:g}" if seed == 0 and method != "none" else f"{method}_s{seed}")
        model = train_run(
            args,
            data_dir,
            run_dir,
            size=record["train_size"],
            constraint=method,
            lam=lam,
            seed=seed,
            init=reference,
            sched=record["ft_sched"],
            jsd_weight=record.get("jsd_weight") if method == "icl+jsd" else None,
        )
        record["train_seconds"][f"{method}_s{seed}"] = train_seconds(run_dir)
        record["runs"][method].append(evaluate_run(args, model, "fashion-mnist", "test", args.test_size))
        record["run_dirs"][method].append(str(run_dir))
        rates = [r for r in map(images_per_second, map(Path, record["run_dirs"][method])) if r]
        if rates:
            record["images_per_s"][method] = statistics.median(rates)
    return record


# ---------------------------------------------------------------------------------------------------------------------
# reports (timm_icl.eval: tables, paired tests, plots)
# ---------------------------------------------------------------------------------------------------------------------
def display_name(method: str, record: dict) -> str:
    """The method in words; icl+jsd with the JSD weight it trained with."""
    jsd = f" (JSD weight {record['jsd_weight']:g})" if method == "icl+jsd" and "jsd_weight" in record else ""
    return NAMES.get(method, method) + jsd


def method_name(method: str, record: dict) -> str:
    lam = record["selected_lambda"][method]
    return display_name(method, record) + (f", λ={lam:g}" if method != "none" else "")


def in_order(keys) -> list[str]:
    """Methods in report order (NAMES'), whatever order a JSON file (sorted keys) gave them."""
    return sorted(keys, key=lambda m: (list(NAMES).index(m) if m in NAMES else len(NAMES), m))


def by_name(record: dict) -> dict[str, list[dict]]:
    return {method_name(m, record): record["runs"][m] for m in in_order(record["runs"])}


def schedule_of(record: dict) -> str:
    """The fine-tuning schedule of a record; records written before ``--ft-sched`` existed used cosine."""
    return record.get("ft_sched", "cosine")


def reference_of(record: dict) -> str:
    """``own`` (a reference trained on the same N images) or ``shared (N)`` (one on more images)."""
    size = record.get("reference_size", record["train_size"])
    return "own" if size == record["train_size"] else f"shared ({size})"


def setting(record: dict) -> str:
    """One protocol's setting in words, for headings."""
    reference = reference_of(record)
    reference = "own reference" if reference == "own" else f"reference on {record['reference_size']} images"
    return f"{record['train_size']} training images, {reference}, fine-tuning lr schedule {schedule_of(record)}"


def protocol_report(config: dict, record: dict, level: str = "##") -> list[str]:
    """Markdown of one protocol: the table, paired tests, the sweep, the distortion check, cost."""
    named = by_name(record)
    lines = [
        f"{level} Test-set top-1 (%), {len(next(iter(named.values())))} seeds, {setting(record)}",
        "",
        format_table({"reference (no fine-tuning)": record["reference_test"], **named}, digits=2, percent=True),
        "",
        "Cells: mean ± std over seeds (clean, noise and blur means), mean over seeds (each sigma).",
        "",
        f"{level}# Intervals and paired tests against plain fine-tuning (schedule {schedule_of(record)})",
        "",
        format_comparison(named, baseline=method_name("none", record)),
        "",
        f"{level}# Lambda sweep (validation split, seed 0, mean top-1 % over the distortion conditions, "
        f"schedule {schedule_of(record)})",
        "",
    ]
    if record["sweep"]:
        lams = sorted({k for scores in record["sweep"].values() for k in scores}, key=float)  # grids may differ
        lines += ["| constraint | " + " | ".join(lams) + " | selected |", "| --- |" + " ---: |" * (len(lams) + 1)]
        for constraint in in_order(record["sweep"]):
            scores = record["sweep"][constraint]
            cells = " | ".join(f"{100 * scores[k]:.2f}" if k in scores else "-" for k in lams)
            lines.append(f"| {constraint} | {cells} | {record['selected_lambda'][constraint]:g} |")
    lines += [
        "",
        f"{level}# The distortion protocol at 28 px: the reference on the validation split falls from mild to severe",
        "",
        format_table({"reference (validation)": record["reference_val"]}, digits=1, percent=True),
        "",
    ]
    speed = record.get("images_per_s", {})
    if speed:
        text = ", ".join(f"{NAMES.get(m, m)} {speed[m]:.0f}" for m in in_order(speed))
        ratio = f"; ICL step time / plain: {speed['none'] / speed['icl']:.2f}x" if "icl" in speed else ""
        lines += [f"Training throughput (img/s, median over seeds, this machine): {text}{ratio}.", ""]
    walls = {k: v for k, v in record.get("train_seconds", {}).items() if v is not None}
    if walls:
        text = "; ".join(f"{k} {walls[k]:.0f}" for k in sorted(walls))  # sorted: the JSON file sorts its keys
        lines += [f"Training wall time per run (s, this machine, shared CPU): {text}.", ""]
    return lines


def gains(record: dict, constraint: str = "icl") -> dict[str, dict]:
    """``{group: compare_runs(constraint runs, fine-tuning runs, group)}`` for clean, noise and blur."""
    return {g: compare_runs(record["runs"][constraint], record["runs"]["none"], g) for g in ("clean", "noise", "blur")}


def seed_deltas(record: dict, constraint: str, group: str) -> list[float]:
    """Per seed: the constraint run's mean top-1 on ``group`` minus the fine-tuning run's of the same seed."""
    return [
        summarize(a["conditions"])[group] - summarize(b["conditions"])[group]
        for a, b in zip(record["runs"][constraint], record["runs"]["none"])
    ]


def seeds_t_test(deltas: list[float]) -> float | None:
    """Two-sided one-sample t-test of per-seed deltas against 0 (df = seeds - 1): does the gain hold over training
    runs? (The paired z-test over images treats the trained models as fixed.) None below 2 seeds or without
    scipy."""
    if len(deltas) < 2:
        return None
    try:
        from scipy import stats
    except ImportError:
        return None
    sd = statistics.stdev(deltas)
    if sd == 0:
        return 1.0 if statistics.fmean(deltas) == 0 else 0.0
    t = statistics.fmean(deltas) / (sd / len(deltas) ** 0.5)
    return float(2 * stats.t.sf(abs(t), len(deltas) - 1))


def seeds_cell(deltas: list[float], better: str) -> str:
    """``+0.57, -0.30, +1.28 (2/3, t p 0.37)``: per-seed deltas in points, seeds better, the seeds' t-test."""
    p = seeds_t_test(deltas)
    return ", ".join(f"{100 * d:+.2f}" for d in deltas) + f" ({better}" + (f", t p {p:.2g})" if p is not None else ")")


def gains_table(records: list[dict]) -> str:
    """Markdown: constraint - fine-tuning in top-1 points per training-set size, reference and fine-tuning schedule:
    95% intervals, p-values, and the per-seed deltas (seeds better in brackets)."""
    lines = [
        "| training images | reference | fine-tuning schedule | constraint | λ | clean Δ [95% CI] | p (clean) "
        "| noise Δ [95% CI] | p (noise) | per-seed Δ noise (better) | blur Δ [95% CI] | p (blur) "
        "| per-seed Δ blur (better) |",
        "| ---: | --- | --- | --- | ---: | --- | ---: | --- | ---: | --- | --- | ---: | --- |",
    ]
    for record in records:
        for constraint in in_order(m for m in record["runs"] if m != "none"):
            g = gains(record, constraint)
            cell = {
                k: f"{100 * v['mean_difference']:+.2f} [{100 * v['low']:+.2f}, {100 * v['high']:+.2f}]"
                for k, v in g.items()
            }
            seeds = {
                k: seeds_cell(seed_deltas(record, constraint, k), f"{g[k]['runs_better']}/{g[k]['runs']}")
                for k in ("noise", "blur")
            }
            lines.append(
                f"| {record['train_size']} | {reference_of(record)} | {schedule_of(record)} | "
                f"{display_name(constraint, record)} | {record['selected_lambda'][constraint]:g} | {cell['clean']} | "
                f"{g['clean']['p_value']:.3g} | {cell['noise']} | {g['noise']['p_value']:.3g} | {seeds['noise']} | "
                f"{cell['blur']} | {g['blur']['p_value']:.3g} | {seeds['blur']} |"
            )
    return "\n".join(lines)


def schedule_table(records: list[dict]) -> str:
    """Markdown: each run's mean top-1 under constant vs cosine fine-tuning (per method, seed-averaged), where a
    setting ran under both: which schedule a user should pick, before any constraint."""
    lines = [
        "| training images | reference | method | group | constant | cosine | cosine - constant [95% CI] | p "
        "| per-seed cosine - constant (better) |",
        "| ---: | --- | --- | --- | ---: | ---: | --- | ---: | --- |",
    ]
    settings: dict[tuple, dict[str, dict]] = {}
    for record in records:
        settings.setdefault((record["train_size"], reference_of(record)), {})[schedule_of(record)] = record
    for (size, reference), by_sched in settings.items():
        if not {"constant", "cosine"} <= set(by_sched):
            continue
        constant, cosine = by_sched["constant"], by_sched["cosine"]
        for method in in_order(set(constant["runs"]) & set(cosine["runs"])):
            for group in ("clean", "noise", "blur"):
                g = compare_runs(cosine["runs"][method], constant["runs"][method], group)
                mean = {
                    k: statistics.fmean(summarize(r["conditions"])[group] for r in rec["runs"][method])
                    for k, rec in by_sched.items()
                }
                lines.append(
                    f"| {size} | {reference} | {method_name(method, constant)}"
                    + (f" / {cosine['selected_lambda'][method]:g}" if method != "none" else "")
                    + f" | {group} | {100 * mean['constant']:.2f} | "
                    f"{100 * mean['cosine']:.2f} | {100 * g['mean_difference']:+.2f} [{100 * g['low']:+.2f}, "
                    f"{100 * g['high']:+.2f}] | {g['p_value']:.3g} | "
                    + seeds_cell(
                        [
                            summarize(a["conditions"])[group] - summarize(b["conditions"])[group]
                            for a, b in zip(cosine["runs"][method], constant["runs"][method])
                        ],
                        f"{g['runs_better']}/{g['runs']}",
                    )
                    + " |"
                )
    return "\n".join(lines) if len(lines) > 2 else ""


def plot_gains(records: list[dict], path: Path) -> Path:
    """PNG: constraint - fine-tuning (points, 95% interval) on clean, noise and blur, by setting (training-set size
    and reference) on the x axis, one marker per fine-tuning schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys((r["train_size"], reference_of(r)) for r in records))
    scheds = list(dict.fromkeys(schedule_of(r) for r in records))
    constraints = in_order({m for r in records for m in r["runs"] if m != "none"})
    series = [(c, s) for c in constraints for s in scheds]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), squeeze=False)
    for ax, group in zip(axes[0], ("clean", "noise", "blur")):
        for k, (constraint, sched) in enumerate(series):
            offset = (k - (len(series) - 1) / 2) * 0.12
            points = [
                (settings.index((r["train_size"], reference_of(r))) + offset, gains(r, constraint)[group], r)
                for r in records
                if schedule_of(r) == sched and constraint in r["runs"]
            ]
            if not points:
                continue
            ys = [100 * g["mean_difference"] for _, g, _ in points]
            err = [
                [100 * (g["mean_difference"] - g["low"]) for _, g, _ in points],
                [100 * (g["high"] - g["mean_difference"]) for _, g, _ in points],
            ]
            label = f"{NAMES.get(constraint, constraint)}, {sched} lr"
            ax.errorbar(
                [x for x, _, _ in points], ys, yerr=err, marker="os^v"[k % 4], capsize=3, ls="none", label=label
            )
            for x, g, r in points:
                ax.annotate(
                    f"λ{r['selected_lambda'][constraint]:g}", (x, 100 * g["high"]), fontsize=6, ha="center", va="bottom"
                )
        ax.axhline(0.0, color="k", linewidth=0.8)
        labels = [f"{size:,}" + ("" if ref == "own" else f"\nref {ref[8:-1]}") for size, ref in settings]
        ax.set_xticks(range(len(settings)), labels)
        ax.set_xlim(-0.6, len(settings) - 0.4)
        ax.set_xlabel("training images (reference)")
        ax.set_ylabel(f"{group}: top-1 gain over fine-tuning (points)")
        ax.set_title(f"{group}: mean over sigmas and seeds, 95% CI", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(payload: dict, json_path: Path) -> str:
    """``.md`` and ``.png`` next to ``json_path`` from a payload (results unpacked). Returns the Markdown."""
    config, records = payload["config"], payload["protocols"]
    quick = "  (QUICK MODE: pipeline check only)" if config.get("quick") else ""
    planned, done = payload.get("planned_seeds", 0), min(len(r["runs"]["none"]) for r in records)
    if done < planned:
        quick += f"  (PARTIAL: {done} of {planned} seeds finished in every protocol)"
    scheds = list(dict.fromkeys(schedule_of(r) for r in records))
    grid = ", ".join(sorted({k for r in records for v in r["sweep"].values() for k in v}, key=float))
    setup = (
        f"Distortions `{payload['distortions']}` (the paper's set scaled to 28 px). Reference: {config['ref_epochs']} "
        f"epochs on clean images, cosine schedule; fine-tuning: {config['ft_epochs']} epochs, batch "
        f"{config['batch_size']}, SGD momentum lr {config['ft_lr']}, learning-rate schedule "
        f"{' and '.join(scheds)} (constant: the paper's protocol, which names no schedule); lambda selected on a "
        f"{config['val_size']}-image validation split from {{{grid}}}. Test set: "
        f"{records[0]['reference_test']['num_samples']} images, noise seed 0. Every model trained by "
        "`recipes/train_icl.py` and evaluated by `timm-icl eval`; each run's folder is under runs/."
    )
    reused = len(payload.get("reused_runs", []))
    footer = [
        f"Machine: {payload['machine']}. Wall time of the whole run: {payload['wall_seconds'] / 60:.1f} min "
        "(other jobs shared the CPU)"
        + (
            f"; {reused} trained models were reused from an earlier invocation with the same arguments (their "
            "training time is not in this figure)."
            if reused
            else "."
        ),
        "",
    ]
    if payload["mode"] == "table1" and len(records) == 1:
        record = records[0]
        lines = [f"# Table 1 in miniature: Fashion-MNIST, {config['model']}{quick}", "", setup, ""]
        lines += protocol_report(config, record) + footer
        plot_accuracy_vs_sigma(
            by_name(record), json_path.with_suffix(".png"), reference=record["reference_test"], metric="top1"
        )
    else:
        by = ["training-set size"] + ["fine-tuning schedule"] * (len(scheds) > 1)
        by += ["reference"] * (len({reference_of(r) for r in records}) > 1)
        title = "When does ICL help?" if config.get("name") else "Where does ICL help?"
        lines = [f"# {title} Fashion-MNIST, {config['model']}, by {', '.join(by)}{quick}", "", setup, ""]
        lines += [
            "## Gain over plain fine-tuning (top-1 points), by training-set size, reference and schedule",
            "",
            "Δ = constraint - fine-tuning on the same test images; interval and p from a paired z-test on each "
            "image's accuracy averaged over the group's sigmas and the seeds; per-seed Δ = the constraint run minus "
            "the fine-tuning run of the same seed (same data order and distortion draws), seeds better in brackets, "
            "with `t p`: a one-sample t-test of the per-seed deltas (df = seeds - 1). The z-test's p treats the "
            "trained models as fixed and asks whether they differ on these test images; the seeds' t-test asks "
            "whether the gain holds over training runs, and with 3 seeds it has little power.",
            "",
            gains_table(records),
            "",
        ]
        contrast = schedule_table(records)
        if contrast:
            lines += [
                "## The schedule itself: cosine - constant fine-tuning, per method (top-1 %, mean over seeds)",
                "",
                "Same reference, data order and distortion draws; λ may differ (each schedule selects its own on "
                "validation). Paired z-test over images, seeds paired by seed.",
                "",
                contrast,
                "",
            ]
        for record in records:
            lines += protocol_report(config, record, level="##")
        lines += footer
        plot_gains(records, json_path.with_suffix(".png"))
    markdown = "\n".join(lines)
    json_path.with_suffix(".md").write_text(markdown)
    return markdown


def pack_payload(payload: dict) -> dict:
    """Per-image correctness as packed bits (``timm_icl.eval.results_io.pack_result``) for the JSON file."""
    records = []
    for r in payload["protocols"]:
        packed = {**r, "runs": {m: [pack_result(x) for x in runs] for m, runs in r["runs"].items()}}
        packed.update(reference_test=pack_result(r["reference_test"]), reference_val=pack_result(r["reference_val"]))
        records.append(packed)
    return {**payload, "protocols": records}


def unpack_payload(payload: dict) -> dict:
    records = []
    for r in payload["protocols"]:
        unpacked = {**r, "runs": {m: [unpack_result(x) for x in runs] for m, runs in r["runs"].items()}}
        unpacked.update(
            reference_test=unpack_result(r["reference_test"]), reference_val=unpack_result(r["reference_val"])
        )
        records.append(unpacked)
    return {**payload, "protocols": records}


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_settings(argv)
    if args.report_only is not None:
        payload = unpack_payload(json.loads(args.report_only.read_text()))
        print(write_reports(payload, args.report_only))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    parse_distortions(args.distortions)  # a typo fails here, not after the reference
    # Table 1 and the size sweep share their run folders: the sweep's largest size reuses Table 1's runs (its
    # reference, lambda sweep and first seeds) when they finished with the same arguments.
    runs = args.out / "runs" / ("fashion_mnist_quick" if args.quick else "fashion_mnist")
    data_dir = prepare_data(args, runs / "data")
    print(f"data: training sizes {args.sizes}, validation {args.val_size} images in {data_dir}; test: Fashion-MNIST")
    # the shared reference is the own reference of the largest size (all fitting images): the same run folder
    fitting = max(args.sizes) if args.quick else 60000 - args.val_size
    plan = [(ref, size, sched) for ref in args.references for size in args.sizes for sched in args.ft_scheds]
    plan = [p for p in plan if not (p[0] == "shared" and p[1] == fitting and ("own", *p[1:]) in plan)]  # the same
    json_path = args.out / f"{stem_of(args)}.json"
    records: list[dict] = []
    for ref, size, sched in plan:  # every protocol's reference and lambda sweep first
        shared = None
        if ref == "shared":
            shared = train_run(args, data_dir, runs / f"n{fitting}" / "reference", size=fitting, constraint="none")
        records.append(start_protocol(args, data_dir, runs, size, shared, sched, fitting if shared else None))
    for seed in range(args.seeds):  # then seed by seed across the protocols, the report rewritten after each round:
        for record in records:  # a stopped invocation leaves a partial report with as many seeds in every protocol
            run_seed(args, data_dir, record, seed)
        payload = {
            "mode": args.mode,
            "config": {k: v for k, v in vars(args).items() if k not in ("report_only", "reused")},
            "distortions": parse_distortions(args.distortions).to_text(),
            "protocols": records,
            "planned_seeds": args.seeds,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"timm {__import__('timm').__version__}, timm-icl {timm_icl.__version__}",
            "wall_seconds": time.perf_counter() - wall_start,
            "reused_runs": args.reused,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        json_path.write_text(canonical_json(pack_payload(payload)))
        markdown = write_reports(payload, json_path)
    print(markdown)
    print(f"wrote {json_path.with_suffix('')}.md/.json/.png in {payload['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
