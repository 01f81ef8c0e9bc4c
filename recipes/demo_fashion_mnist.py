"""The main job, offline on a laptop CPU: ICL on Fashion-MNIST with vgg_tiny, end to end, in a few minutes.

    python recipes/demo_fashion_mnist.py                 # reference, ICL fine-tune, plain fine-tune, table
    python recipes/demo_fashion_mnist.py --no-finetune   # skip the plain fine-tuning baseline

No pretrained vgg_tiny weights exist, so the demo runs the real recipe (recipes/train_icl.py) three times:

1. the reference: vgg_tiny trained on clean images (constraint none, clean_fraction 1.0);
2. ICL fine-tuning of that reference on noisy/blurred images (lambda 0.1, alpha 100, pre_logits.fc1/fc2);
3. plain fine-tuning (lambda 0) with the same settings, the paper's baseline;

then prints top-1 accuracy on the 10,000 test images, clean and under each distortion, in the paper's layout.
The distortions are the paper's set scaled to 28 px images (timm_icl.distortions.SMALL_IMAGE_DISTORTIONS; see
recipes/configs/fashion_mnist_vgg_tiny_reference.yaml). Runs land in --output-dir (default runs/fashion_mnist);
each holds config.yaml, metrics.jsonl, eval.json and model/ (a timm folder: ``local-dir:``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent
CONFIGS = RECIPES / "configs"


def run_recipe(config: Path, output_dir: Path, *extra: str) -> dict:
    """Run recipes/train_icl.py with ``config`` into ``output_dir`` (one process); returns its eval.json."""
    cmd = [sys.executable, str(RECIPES / "train_icl.py"), "-c", str(config), "--output-dir", str(output_dir), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    # One thread: on a small shared CPU, two threads spinning against other work ran 3x slower than one (measured).
    env.setdefault("OMP_NUM_THREADS", "1")
    subprocess.run(cmd, check=True, env=env)
    return json.loads((output_dir / "eval.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/fashion_mnist", help="where the three runs go")
    parser.add_argument("--no-finetune", action="store_true", help="skip the plain fine-tuning baseline")
    parser.add_argument("--reference-epochs", type=int, default=None, help="default: the config's (3)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the config's, 2)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="use a subset of the training set")
    parser.add_argument("--max-val-samples", type=int, default=None, help="evaluate on a subset of the test set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    out = Path(args.output_dir)
    common = ["--seed", str(args.seed)]
    if args.max_train_samples:
        common += ["--max-train-samples", str(args.max_train_samples)]
        print(f"note: training on the first {args.max_train_samples} of 60,000 training images")
    if args.max_val_samples:
        common += ["--max-val-samples", str(args.max_val_samples)]
        print(f"note: evaluating on the first {args.max_val_samples} of 10,000 test images")
    fine_tune = list(common) + (["--epochs", str(args.epochs)] if args.epochs else [])
    fine_tune += ["--init-checkpoint", str(out / "reference" / "model")]

    results = {}
    print("\n== 1/3 reference: vgg_tiny on clean images ==", flush=True)
    reference_args = common + (["--epochs", str(args.reference_epochs)] if args.reference_epochs else [])
    results["Reference (clean training)"] = run_recipe(
        CONFIGS / "fashion_mnist_vgg_tiny_reference.yaml", out / "reference", *reference_args
    )
    if not args.no_finetune:
        print("\n== 2/3 plain fine-tuning (lambda 0) on distorted images ==", flush=True)
        results["Fine-tuning"] = run_recipe(
            CONFIGS / "fashion_mnist_vgg_tiny_icl.yaml", out / "finetune", "--constraint", "none", *fine_tune
        )
    print(f"\n== {2 if args.no_finetune else 3}/{2 if args.no_finetune else 3} ICL fine-tuning ==", flush=True)
    results["ICL (lambda 0.1)"] = run_recipe(CONFIGS / "fashion_mnist_vgg_tiny_icl.yaml", out / "icl", *fine_tune)

    from timm_icl import format_table, plot_accuracy_vs_sigma

    table = format_table(results)
    minutes = (time.perf_counter() - start) / 60
    count = next(iter(results.values()))["conditions"]["clean"]["count"]
    print(f"\nFashion-MNIST test set ({count} images), top-1; noise sigma on the 0-255 scale, blur sigma in px:\n")
    print(table)
    (out / "table.md").write_text(table + "\n")
    try:
        plot_accuracy_vs_sigma(results, out / "accuracy_vs_sigma.png")
    except ImportError:  # matplotlib is optional
        pass
    print(f"\nwall time {minutes:.1f} min; runs, table.md and accuracy_vs_sigma.png in {out}/")
    print(f"load a model: timm.create_model('local-dir:{out / 'icl' / 'model'}', pretrained=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
