"""vgg16 training throughput on one GPU: plain fine-tuning vs ICL, fp32 vs bf16, eager vs torch.compile.

Synthetic data (random images in [0, 1], random labels) at 224 px, batch 64 by default, so the numbers
measure the model and the loss, not the data pipeline. For each configuration: images/s (median of
timed windows, after warm-up) and peak GPU memory; ratios ICL / plain are computed within one run.
Sized to finish in under 8 minutes on one H100 (about 4 min measured budget plus compile time).

    python benchmarks/gpu_vgg16_throughput.py --out benchmarks/gpu_vgg16.json
"""

import argparse
import gc
import json
import platform
import statistics
import time

import timm
import torch

import timm_icl


def measure(constraint: str, precision: str, compiled: bool, args) -> dict:
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = timm.create_model("vgg16", num_classes=1000).to(device).to(memory_format=torch.channels_last)
    task = timm_icl.ICLTask(model, constraint=constraint, seed=0, device=device)
    if compiled:
        task.compile()
    opt = torch.optim.SGD(task.trainable_module.parameters(), lr=1e-3, momentum=0.9)
    images = torch.rand(args.batch_size, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch_size,), device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            out = task(images, target)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        rates.append(args.batch_size * args.steps / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"images_per_s": statistics.median(rates), "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile configurations")
    parser.add_argument("--out", default="benchmarks/gpu_vgg16.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True
    rows = []
    for compiled in (False,) if args.no_compile else (False, True):
        for precision in ("fp32", "bf16"):
            for constraint in ("none", "icl"):
                r = measure(constraint, precision, compiled, args)
                gc.collect()
                torch.cuda.empty_cache()
                r.update(constraint=constraint, precision=precision, compiled=compiled)
                rows.append(r)
                print(
                    f"{'compile' if compiled else 'eager':7s} {precision} {constraint:4s} "
                    f"{r['images_per_s']:8.1f} img/s  peak {r['peak_gib']:.2f} GiB",
                    flush=True,
                )
    by_key = {(r["compiled"], r["precision"], r["constraint"]): r for r in rows}
    print("\n| mode | precision | plain img/s | ICL img/s | ICL/plain time | plain GiB | ICL GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (compiled, precision, constraint), r in by_key.items():
        if constraint != "none":
            continue
        icl = by_key[(compiled, precision, "icl")]
        print(
            f"| {'compile' if compiled else 'eager'} | {precision} | {r['images_per_s']:.0f} | "
            f"{icl['images_per_s']:.0f} | {r['images_per_s'] / icl['images_per_s']:.2f}x | "
            f"{r['peak_gib']:.1f} | {icl['peak_gib']:.1f} |"
        )
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "batch_size": args.batch_size,
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{meta['gpu']}: wrote {args.out}")


if __name__ == "__main__":
    main()
