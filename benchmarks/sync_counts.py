"""Sync-forcing ops (and host reads / host data) per ICLTask training step and per evaluation batch, on CPU.

Counted with :class:`timm_icl.utils.sync_debug.SyncCounter`, the same detector the tests use. One warm-up step
first (tables and matrices are cached per device on first use), then one counted step, forward and backward.

    python benchmarks/sync_counts.py            # vgg_tiny, 32 px, batch 32; evaluation: 2 batches of 16
"""

from __future__ import annotations

import argparse
import json

import timm
import torch

import timm_icl  # noqa: F401  (registers vgg_tiny)
from timm_icl import ICLTask, evaluate_robustness
from timm_icl.utils.sync_debug import SyncCounter


def step_counts(distortions: str, batch: int, size: int) -> dict:
    torch.manual_seed(0)
    task = ICLTask(timm.create_model("vgg_tiny", num_classes=10), distortions=distortions, seed=0)
    images = (torch.rand(batch, 3, size, size) * 255).to(torch.uint8)
    labels = torch.randint(0, 10, (batch,))
    task(images, labels)["loss"].backward()
    with SyncCounter() as sync:
        task(images, labels)["loss"].backward()
    return {"syncs": sync.syncs, "host_reads": sync.host_reads, "host_data": sync.host_data, "total": sync.total}


def eval_counts(distortions: str, batches: int, batch: int, size: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model("vgg_tiny", num_classes=10)
    data = [((torch.rand(batch, 3, size, size) * 255).to(torch.uint8), torch.randint(0, 10, (batch,)))] * batches
    evaluate_robustness(model, data[:1], distortions, per_image=False)
    with SyncCounter() as sync:
        evaluate_robustness(model, data, distortions, per_image=False)
    return {"syncs": sync.syncs, "host_reads": sync.host_reads, "host_data": sync.host_data, "total": sync.total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = {"step": {}, "evaluation (2 batches of 16)": {}}
    for name in ("paper", "small", "imagenet-c-10"):
        out["step"][name] = step_counts(name, args.batch, args.size)
        print(f"step {name:14s}", out["step"][name], flush=True)
    for name in ("paper", "imagenet-c-10"):
        out["evaluation (2 batches of 16)"][name] = eval_counts(name, 2, 16, args.size)
        print(f"eval {name:14s}", out["evaluation (2 batches of 16)"][name], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
