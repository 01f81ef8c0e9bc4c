"""Images/s per core of this project's streamed wds loader vs timm's own loading stack, on ImageNet-sized JPEGs.

    OMP_NUM_THREADS=1 python benchmarks/loader_imagenet_wds.py [--images 512] [--workers 1] [--rounds 3]

Fixture (written once under --root): ``--images`` JPEGs of about 500x375 at quality 90, cut and resized from
scikit-image's photographs (astronaut, coffee, chelsea, rocket, ...), stored twice: as webdataset shards in the
``timm/imagenet-1k-wds`` layout (``<key>.jpg``, ``<key>.cls``, ``<key>.json``; 64 images per shard) and as an
image folder (``class/xxx.jpg``) for timm's folder reader (timm's wds reader needs the ``webdataset`` package).

Both produce uint8 ``[B, 3, 224, 224]`` batches with the same crop (vgg16's: resize 256, centre crop 224,
bilinear) and no normalisation:

- ours: ``timm_icl.data.create_loader(root, "train", streaming=True, ...)`` (``timm_icl.data.stream``);
- timm: ``timm.data.create_dataset("", root=folder)`` + ``timm.data.create_loader(..., use_prefetcher=True)``
  with its ``PrefetchLoader`` unwrapped (``.loader``: uint8 batches from ``fast_collate``, before normalising).

Rounds alternate (ours, timm, ours, ...) in one process, each a full pass; images/s per core = images/s divided
by the cores doing the decoding (``max(1, workers)``). Prints one JSON line per round and a summary.

Measured 2026-11-27 on this project's 2-core AMD EPYC (shared, load ~4-5), 1,536 images, 1 worker, 3 rounds:
timm_icl 209.3 images/s per core (212.1, 191.2, 209.3), timm 217.1 (217.1, 202.7, 219.9): 0.96x timm's, within
the noise of the shared machine (512 images: 181.0 vs 190.9, 0.95x). Feeding vgg16: timm's published training
rate for vgg16 on an RTX 3090 with AMP is 465 images/s (batch 384; results/benchmark-train-amp-nchw-pt112-
cu113-rtx3090.csv in huggingface/pytorch-image-models), so about 465 / 209 = 2.2 such cores per RTX 3090 for
plain fine-tuning, fewer for ICL with a live reference (an extra forward per step lowers the GPU's rate). No GPU
was available to measure the rate of this project's own step (benchmarks/gpu_vgg16_throughput.py does).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "motorcycle_left",
          "motorcycle_right", "retina", "cat", "colorwheel", "logo")  # fmt: skip


def make_fixture(root: Path, n: int, per_shard: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """``(wds_root, folder_root)`` holding the same ``n`` JPEGs (about 500x375, quality 90)."""
    import skimage.data
    from PIL import Image

    wds, folder = root / "wds", root / "folder"
    if (root / "done").exists():
        return wds, folder
    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a photo that needs a download (pooch) offline: skip it
            continue
        if image.ndim == 3 and image.shape[2] >= 3 and min(image.shape[:2]) >= 256:
            photos.append(Image.fromarray(image[..., :3].astype(np.uint8)))
    (wds / "train").mkdir(parents=True, exist_ok=True)
    tar = None
    for k in range(n):
        if k % per_shard == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(wds / "train" / f"imagenet1k-train-{k // per_shard:04d}.tar", "w")
        photo = photos[k % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (500, 375) if rng.random() < 0.7 else (375, 500)
        image = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        label, key = k % 10, f"n{k:08d}"
        data = {"jpg": buf.getvalue(), "cls": str(label).encode(), "json": json.dumps({"label": label}).encode()}
        for ext, payload in data.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        (folder / f"class{label}" / f"{key}.jpg").write_bytes(buf.getvalue())
    tar.close()
    (root / "done").touch()
    return wds, folder


def ours(wds: Path, batch: int, workers: int):
    import timm

    from timm_icl.data import create_loader
    from timm_icl.data.preprocess import resolve_preprocessing

    config = resolve_preprocessing(timm.create_model("vgg16", pretrained=False))
    loader, _ = create_loader(str(wds), "train", data_config=config, batch_size=batch, num_workers=workers,
                              streaming=True)  # fmt: skip
    return loader


def timms(folder: Path, batch: int, workers: int):
    import timm.data
    import torch

    dataset = timm.data.create_dataset("", root=str(folder), split="train")
    loader = timm.data.create_loader(dataset, input_size=(3, 224, 224), batch_size=batch, crop_pct=0.875,
                                     interpolation="bilinear", num_workers=workers, use_prefetcher=True,
                                     device=torch.device("cpu"), persistent_workers=False)  # fmt: skip
    return loader.loader  # the DataLoader under PrefetchLoader: uint8 batches, no normalisation


def one_pass(loader) -> tuple[int, float, tuple]:
    tic, n, shape = time.perf_counter(), 0, None
    for images, labels in loader:
        n += len(labels)
        shape = (tuple(images.shape), str(images.dtype))
    return n, time.perf_counter() - tic, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/tmp/timm_icl_loader_bench")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    wds, folder = make_fixture(Path(args.root) / f"n{args.images}", args.images)
    loaders = {
        "timm_icl": ours(wds, args.batch_size, args.workers),
        "timm": timms(folder, args.batch_size, args.workers),
    }
    cores = max(1, args.workers)
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    for r in range(args.rounds):
        for name, loader in loaders.items():
            n, seconds, shape = one_pass(loader)
            rates[name].append(n / seconds / cores)
            print(json.dumps({"round": r, "loader": name, "images": n, "seconds": round(seconds, 3),
                              "images_per_s_per_core": round(n / seconds / cores, 1), "batch": shape}))  # fmt: skip
    summary = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    summary["ratio_timm_icl_over_timm"] = round(summary["timm_icl"] / summary["timm"], 3)
    print(json.dumps({"median_images_per_s_per_core": summary, "workers": args.workers, "images": args.images}))


if __name__ == "__main__":
    main()
