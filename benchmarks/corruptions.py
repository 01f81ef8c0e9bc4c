"""Speed of timm_icl's camera corruptions against the reference, imagecorruptions, on real photos, in one run.

Per corruption (ImageNet-C level 3 by default), a batch of 224 x 224 crops of ``skimage.data`` photos:

- reference: ``imagecorruptions.corrupt`` on each uint8 HWC image in turn (what a user of that package does);
- timm_icl: the uint8 batch to float on the device, the registered function on the whole batch at once.

The two alternate (reference first in odd rounds, timm_icl first in even rounds), each timed alone; the figure
is the median time per image of each and their ratio (reference / timm_icl: above 1, timm_icl is faster),
measured in this one run. CPU runs use one thread on both sides (``torch.set_num_threads(1)``,
``cv2.setNumThreads(1)``) unless ``--threads`` says otherwise; ``--device cuda`` times timm_icl on the GPU
(synchronised) against the same CPU reference.

    python benchmarks/corruptions.py                    # ~2 min on one core
    python benchmarks/corruptions.py --rounds 3 --batch 4 --json /tmp/c.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import numpy as np
import torch

from timm_icl.distortions import Distortion

REFERENCE_NAMES = {
    "noise": "gaussian_noise",
    "shot_noise": "shot_noise",
    "impulse_noise": "impulse_noise",
    "defocus_blur": "defocus_blur",
    "motion_blur": "motion_blur",
    "zoom_blur": "zoom_blur",
    "brightness": "brightness",
    "contrast": "contrast",
    "pixelate": "pixelate",
    "jpeg": "jpeg_compression",
}
NOISE_SIGMA = {1: 20.4, 2: 30.6, 3: 45.9, 4: 66.3, 5: 96.9}  # ImageNet-C's gaussian_noise std x 255


def photos(batch: int) -> np.ndarray:
    """``batch`` centre crops 224 x 224 of skimage's colour photos (cycled), uint8 ``[N, 224, 224, 3]``."""
    import skimage.data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"]
    crops = []
    for i in range(batch):
        image = getattr(skimage.data, names[i % len(names)])()[..., :3]
        h, w = image.shape[:2]
        shift = 8 * (i // len(names))
        top, left = (h - 224) // 2 + shift, (w - 224) // 2
        crops.append(image[top : top + 224, left : left + 224])
    return np.ascontiguousarray(np.stack(crops))


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level", type=int, default=3, choices=range(1, 6))
    parser.add_argument("--batch", type=int, default=8, help="images per timing")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="threads of torch and OpenCV on the CPU")
    parser.add_argument("--only", nargs="*", default=None, help="corruptions to time (default: all ten)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import cv2
        from imagecorruptions import corrupt
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    images = photos(args.batch)
    batch_u8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    rows = []
    for kind in args.only or list(REFERENCE_NAMES):
        condition = Distortion(kind, NOISE_SIGMA[args.level] if kind == "noise" else args.level)
        generator = torch.Generator(device=device).manual_seed(0)

        def reference(name: str = REFERENCE_NAMES[kind]) -> None:
            for image in images:
                corrupt(image, corruption_name=name, severity=args.level)

        def ours(condition: Distortion = condition, generator: torch.Generator = generator) -> None:
            x = batch_u8.to(device).float() / 255
            condition(x, generator=generator)
            sync()

        ours()  # warm-up: kernel caches, lazy imports
        reference()
        ref_times, our_times = [], []
        for r in range(args.rounds):
            order = [(reference, ref_times), (ours, our_times)]
            for fn, times in order if r % 2 == 0 else order[::-1]:
                times.append(_time(fn) / args.batch)
        ref_ms, our_ms = 1e3 * statistics.median(ref_times), 1e3 * statistics.median(our_times)
        rows.append({"corruption": kind, "reference_ms": ref_ms, "timm_icl_ms": our_ms, "ratio": ref_ms / our_ms})
        print(f"{kind:14s} reference {ref_ms:8.2f} ms/image  timm_icl {our_ms:8.2f} ms/image  x{ref_ms / our_ms:.2f}")

    header = (
        f"level {args.level}, {args.batch} photos 224x224, {args.rounds} alternating rounds, median ms per image; "
        f"timm_icl on {device} ({args.threads} thread(s) on CPU), reference imagecorruptions on CPU "
        f"({args.threads} thread(s)); torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print("\n" + header + "\n")
    print("| corruption | imagecorruptions ms/image | timm_icl ms/image | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['corruption']} | {row['reference_ms']:.2f} | {row['timm_icl_ms']:.2f} | {row['ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": header, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
