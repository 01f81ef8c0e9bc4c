"""timm-icl benchmark suite: one command, every figure a ratio measured within one run.

    python benchmarks/run.py                      # CPU, this machine: writes benchmarks/RESULTS.md + results.json
    python benchmarks/run.py --quick              # tiny repeat counts, for development
    python benchmarks/run.py --device cuda ...    # see benchmarks/gpu.py for the one-GPU sizing

Method: within a section the variants are run in turn (A, B, C, A, B, C, ...), each repeat timed alone,
and the figure is the median over repeats, so slow drifts of a shared machine hit every variant alike.
Ratios are to the section's baseline (plain fine-tuning, torchvision's blur, PIL decoding, eleven passes).

Sections:
- ``train``: one SGD step (forward + backward + update) of ICL vs plain fine-tuning, reference in fp32,
  under bf16 autocast, as a bf16 copy (with the fraction of flipped target bits), and with cached targets
  (no reference forward at all); plus the cost of the constraint loss alone (default layers vs every conv).
- ``memory``: peak memory of the same variants (CPU: peak RSS of a fresh subprocess; GPU: max allocated).
- ``malloc``: a vgg16 ICL step in subprocesses with and without glibc's allocator thresholds raised.
- ``distortions``: noise and blur on 64x3x224x224 vs torchvision, kornia, OpenCV, PIL; max abs diff to a
  float64 scipy.ndimage reference (mode='mirror', the same kernel).
- ``data``: images/s on one core decoding ~500x375 JPEGs + resize 256 + centre crop 224.
- ``eval``: the eleven conditions with one decode per image vs eleven decoding passes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "1073741824",
}


# -- helpers -------------------------------------------------------------------------------------------
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def alternate(fns: dict, repeats: int, device="cpu", warmup: int = 1) -> dict:
    """Time each callable ``repeats`` times, interleaved; returns ``{name: median seconds}`` (+ all samples)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        # rotate the order every round so that no variant always runs right after the same other one
        for name in names[i % len(names) :] + names[: i % len(names)]:
            fn = fns[name]
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    # CPU time of this process (all threads) is recorded beside wall time: on a shared machine it is not
    # inflated by the time other processes hold the cores, so it is the more robust of the two there.
    return {
        k: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "cpu_median_s": statistics.median(cpu[k]),
            "samples_s": [round(x, 5) for x in v],
        }
        for k, v in samples.items()
    }


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["ram_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


# -- training step -------------------------------------------------------------------------------------
TRAIN_VARIANTS = ("plain", "icl_fp32", "icl_fp32_channels_last", "icl_bf16_autocast", "icl_bf16_copy", "icl_cached")


def build_step(model_name: str, image_size: int, batch: int, variant: str, device: str, seed: int = 0):
    """Return ``(step, task, info)``: one SGD step of ``variant`` on a fixed synthetic batch."""
    import timm

    import timm_icl
    from timm_icl.target_cache import TargetCache

    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=10 if model_name.startswith("vgg_") else 1000).to(device)
    constraint = "none" if variant == "plain" else "icl"
    kw = {"reference_dtype": torch.bfloat16} if variant == "icl_bf16_copy" else {}
    if variant == "icl_fp32_channels_last":
        kw["reference_channels_last"] = True
    task = timm_icl.ICLTask(model, constraint=constraint, seed=0, device=torch.device(device), **kw)
    task.train()
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, image_size, image_size, generator=g).to(device)
    labels = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    opt = torch.optim.SGD(task.trainable_module.parameters(), lr=1e-4, momentum=0.9)
    info = {}
    cached = None
    if variant == "icl_cached":
        pre = {"image_size": image_size, "synthetic": True}
        cache = TargetCache.build(task, [(list(range(batch)), images)], preprocessing=pre)
        info["cache_bytes_per_image"] = cache.nbytes_per_image
        task.release_reference()  # with a cache the reference copy is never needed
        ids = list(range(batch))
        cached = cache
    autocast = variant == "icl_bf16_autocast"
    if autocast:  # bf16 autocast only around the reference; the student stays fp32 like the plain baseline
        plain_targets = task.reference_targets

        def ref_autocast(x):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                return plain_targets(x)

        task.reference_targets = ref_autocast

    def step():
        targets = cached.lookup(ids, device=device) if cached is not None else None
        out = task(images, labels, reference_targets=targets)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # frees the gradients while the other variants run

    return step, task, info, images


def flip_rate(model_name, image_size, batch, variant, device) -> float:
    """Fraction of target bits of a reduced-precision reference that differ from the fp32 reference's."""
    import timm

    import timm_icl

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10 if model_name.startswith("vgg_") else 1000).to(device)
    ref32 = timm_icl.ICLTask(model, constraint="icl", seed=0, device=torch.device(device))
    images = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)).to(device)
    a = ref32.reference_targets(images)
    if variant == "icl_bf16_copy":
        b = timm_icl.ICLTask(model, constraint="icl", seed=0, reference_dtype=torch.bfloat16).reference_targets(images)
    elif variant == "icl_fp32_channels_last":
        b = timm_icl.ICLTask(model, constraint="icl", seed=0, reference_channels_last=True).reference_targets(images)
    else:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            b = ref32.reference_targets(images)
    flips = sum(int((a[k] != b[k]).sum()) for k in a)
    return flips / sum(a[k].numel() for k in a)


def bench_train(models, repeats, device) -> dict:
    out = {}
    for model_name, size, batch, mult in models:
        steps = {}
        infos = {}
        for v in TRAIN_VARIANTS:
            step, _task, info, _ = build_step(model_name, size, batch, v, device)
            steps[v], infos[v] = step, info
        timing = alternate(steps, repeats * mult, device, warmup=1)
        base = timing["plain"]["median_s"]
        res = {"image_size": size, "batch": batch, "repeats": repeats * mult, "variants": {}}
        for v in TRAIN_VARIANTS:
            entry = {
                **timing[v],
                "ratio_to_plain": timing[v]["median_s"] / base,
                "cpu_ratio_to_plain": timing[v]["cpu_median_s"] / timing["plain"]["cpu_median_s"],
                **infos[v],
            }
            if v in ("icl_bf16_copy", "icl_bf16_autocast", "icl_fp32_channels_last"):
                entry["target_flip_rate"] = flip_rate(model_name, size, max(batch, 4), v, device)
            res["variants"][v] = entry
        out[model_name] = res
        del steps
        gc.collect()
        print(
            f"[train] {model_name}: "
            + ", ".join(f"{v} {res['variants'][v]['ratio_to_plain']:.3f}" for v in res["variants"]),
            flush=True,
        )
    return out


def bench_loss(repeats, device) -> dict:
    """Constraint loss forward+backward alone on vgg16's pre-activations: default layers vs all 13 convs."""
    import timm

    from timm_icl.capture import capture_preactivations
    from timm_icl.layers import default_layers
    from timm_icl.losses import icl_loss

    model = timm.create_model("vgg16").to(device).eval()
    x = torch.rand(2, 3, 224, 224, device=device)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    res = {}
    fns = {}
    for name, layers in (("default_layers", default_layers(model)), ("all_convs", convs)):
        with torch.no_grad(), capture_preactivations(model, layers) as acts:
            model(x)
        student = {k: v.clone().requires_grad_(True) for k, v in acts.items()}
        bits = {k: v > 0 for k, v in acts.items()}
        units = sum(v[0].numel() for v in acts.values())

        def fn(student=student, bits=bits):
            icl_loss(student, bits).backward()

        fns[name] = fn
        res[name] = {"layers": len(layers), "units_per_image": units}
    timing = alternate(fns, repeats, device)
    for k in res:
        res[k].update(timing[k])
    print(
        f"[loss] {res['default_layers']['median_s'] * 1e3:.1f} ms vs {res['all_convs']['median_s'] * 1e3:.1f} ms",
        flush=True,
    )
    return {"batch": 2, "image_size": 224, "model": "vgg16", **res}


# -- memory and malloc (subprocesses) ------------------------------------------------------------------
def _child(args) -> None:
    """Subprocess entry: build one variant, run steps, print JSON (peak RSS, median step time)."""
    model_name, size, batch, variant, device, steps = args.child.split(",")
    size, batch, steps = int(size), int(batch), int(steps)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, *_ = build_step(model_name, size, batch, variant, device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = _vm_hwm()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    print(json.dumps({"peak_bytes": peak, "step_s": statistics.median(times[1:] or times)}))


def _vm_hwm() -> int:
    """Peak resident set of this process in bytes. Not ru_maxrss: Linux carries that across exec from the
    forking parent, so every child would report the (large) benchmark driver's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(spec: str, env_extra=None, threads=None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(models, device) -> dict:
    out = {}
    variants = ("plain", "icl_fp32", "icl_bf16_copy", "icl_cached")
    for model_name, size, batch, _ in models:
        res = {v: run_child(f"{model_name},{size},{batch},{v},{device},2") for v in variants}
        base = res["plain"]["peak_bytes"]
        out[model_name] = {
            v: {"peak_mib": round(r["peak_bytes"] / 2**20, 1), "ratio_to_plain": r["peak_bytes"] / base}
            for v, r in res.items()
        }
        print(
            f"[memory] {model_name}: " + ", ".join(f"{v} {out[model_name][v]['ratio_to_plain']:.3f}" for v in variants),
            flush=True,
        )
    return out


def bench_malloc(model, repeats, steps) -> dict:
    """vgg16 ICL step with and without raised glibc thresholds, in alternating subprocesses."""
    name, size, batch, _ = model
    runs = {"default": [], "malloc_env": []}
    for _ in range(repeats):
        for key, env in (("default", {}), ("malloc_env", MALLOC_ENV)):
            runs[key].append(run_child(f"{name},{size},{batch},icl_fp32,cpu,{steps}", env)["step_s"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"[malloc] default {med['default']:.3f} s, with env {med['malloc_env']:.3f} s", flush=True)
    return {
        "model": name,
        "batch": batch,
        "image_size": size,
        "env": MALLOC_ENV,
        "step_s": med,
        "samples_s": runs,
        "ratio_env_to_default": med["malloc_env"] / med["default"],
    }


# -- distortions -------------------------------------------------------------------------------------
def exact_blur(images64, kernel):
    """float64 scipy reference: separable correlation, mode='mirror' (= reflect-101) on H and W."""
    from scipy import ndimage

    k = kernel.numpy()
    x = ndimage.correlate1d(images64, k, axis=-1, mode="mirror")
    return ndimage.correlate1d(x, k, axis=-2, mode="mirror")


def bench_distortions(repeats, device, batch=64, size=224) -> dict:
    import cv2
    import kornia
    import numpy as np
    import torchvision.transforms.v2.functional as TF
    from PIL import Image, ImageFilter

    from timm_icl.distortions import gaussian_blur, gaussian_kernel1d, gaussian_noise, paper_kernel_size

    cv2.setNumThreads(torch.get_num_threads())
    g = torch.Generator().manual_seed(0)
    # smooth-ish random images (upsampled noise) so blur differences are realistic, not worst-case
    images = torch.nn.functional.interpolate(
        torch.rand(batch, 3, size // 8, size // 8, generator=g), size=size, mode="bilinear"
    )
    images = images.clamp(0, 1).contiguous()
    dev_images = images.to(device)
    n_check = 4
    out = {"batch": batch, "image_size": size, "checked_images": n_check}
    u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()

    for sigma in (2, 10):
        ks = paper_kernel_size(sigma)
        kernel = gaussian_kernel1d(sigma, ks)
        ref = exact_blur(images[:n_check].double().numpy(), kernel)

        def lib(sigma=sigma):
            return gaussian_blur(dev_images, sigma)

        def tv(sigma=sigma, ks=ks):
            return TF.gaussian_blur(dev_images, [ks, ks], [float(sigma), float(sigma)])

        def kor(sigma=sigma, ks=ks):
            return kornia.filters.gaussian_blur2d(
                dev_images, (ks, ks), (float(sigma), float(sigma)), border_type="reflect"
            )

        def ocv(sigma=sigma, ks=ks):
            return [cv2.GaussianBlur(im, (ks, ks), sigma, borderType=cv2.BORDER_REFLECT_101) for im in hwc]

        def pil(sigma=sigma):
            return [Image.fromarray(im).filter(ImageFilter.GaussianBlur(sigma)) for im in u8]

        fns = {"torchvision": tv, "timm_icl": lib, "kornia": kor, "opencv_per_image": ocv, "pil_per_image_uint8": pil}
        timing = alternate(fns, repeats, device)
        diffs = {
            "timm_icl": lib()[:n_check].double().cpu().numpy(),
            "torchvision": tv()[:n_check].double().cpu().numpy(),
            "kornia": kor()[:n_check].double().cpu().numpy(),
            "opencv_per_image": np.stack(ocv()[:n_check]).transpose(0, 3, 1, 2).astype(np.float64),
            "pil_per_image_uint8": np.stack([np.asarray(p) for p in pil()[:n_check]]).transpose(0, 3, 1, 2) / 255.0,
        }
        base = timing["torchvision"]["median_s"]
        out[f"blur{sigma}"] = {
            "kernel_size": ks,
            **{
                k: {
                    **timing[k],
                    "speedup_vs_torchvision": base / timing[k]["median_s"],
                    "max_abs_diff": float(np.abs(diffs[k] - ref).max()),
                }
                for k in fns
            },
        }
        print(
            f"[blur{sigma}] "
            + ", ".join(
                f"{k} x{out[f'blur{sigma}'][k]['speedup_vs_torchvision']:.2f} "
                f"d={out[f'blur{sigma}'][k]['max_abs_diff']:.1e}"
                for k in fns
            ),
            flush=True,
        )

    gen = torch.Generator(device=device).manual_seed(0)

    def lib_noise():
        return gaussian_noise(dev_images, 60, generator=gen)

    def naive_noise():
        return (dev_images + torch.randn(dev_images.shape, generator=gen, device=device) * (60 / 255)).clamp_(0, 1)

    timing = alternate({"naive_randn_add_clamp": naive_noise, "timm_icl": lib_noise}, repeats, device)
    out["noise60"] = {
        k: {**v, "ratio_to_naive": v["median_s"] / timing["naive_randn_add_clamp"]["median_s"]}
        for k, v in timing.items()
    }
    return out


# -- data ----------------------------------------------------------------------------------------------
def make_jpegs(folder: Path, count: int = 24) -> list[Path]:
    """~500x375 JPEGs (quality 90) from skimage.data photos, cropped/flipped variants to get ``count`` files."""
    from PIL import Image
    from skimage import data

    photos = [
        data.astronaut(),
        data.coffee(),
        data.chelsea(),
        data.rocket(),
        data.immunohistochemistry(),
        data.retina(),
    ]
    paths = []
    for i in range(count):
        im = Image.fromarray(photos[i % len(photos)]).convert("RGB")
        if i // len(photos) % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        w, h = (500, 375) if i % 3 else (375, 500)  # some portrait images, as in ImageNet
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        path = folder / f"img_{i:03d}.jpg"
        im.save(path, quality=90)
        paths.append(path)
    return paths


_TRANSFORMS: dict = {}


def _pil_load(path, draft: bool, resize=256, crop=224):
    """The project's loader crop (timm_icl.data.preprocess: timm's eval transform, bilinear, uint8 out); ``draft`` lets
    libjpeg decode at 1/2, 1/4, 1/8 scale when that still leaves >= ``resize`` pixels."""
    from timm_icl.data.preprocess import ImageTransform, resolve_preprocessing

    key = (draft, resize, crop)
    if key not in _TRANSFORMS:
        config = resolve_preprocessing(None, image_size=crop, crop_pct=crop / resize, interpolation="bilinear")
        _TRANSFORMS[key] = ImageTransform(config, draft=draft)
    return _TRANSFORMS[key](path)


def _tv_load(path, resize=256, crop=224):
    import torchvision.io as tio
    import torchvision.transforms.v2.functional as TF

    img = tio.decode_jpeg(tio.read_file(str(path)), mode=tio.ImageReadMode.RGB)
    img = TF.resize(img, resize, antialias=True)
    return TF.center_crop(img, [crop, crop])


def bench_data(repeats, folder: Path) -> dict:
    paths = make_jpegs(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core
    try:
        fns = {
            "pil": lambda: [_pil_load(p, False) for p in paths],
            "pil_draft": lambda: [_pil_load(p, True) for p in paths],
            "torchvision_decode_jpeg": lambda: [_tv_load(p) for p in paths],
        }
        timing = alternate(fns, repeats)
    finally:
        torch.set_num_threads(threads)
    base = timing["pil"]["median_s"]
    out = {"images": len(paths), "size": "500x375 / 375x500 JPEG q90 -> resize 256 -> centre crop 224", "threads": 1}
    for k, v in timing.items():
        out[k] = {**v, "images_per_s_per_core": len(paths) / v["median_s"], "speedup_vs_pil": base / v["median_s"]}
    # draft only helps when libjpeg can decode at 1/2 scale: a 1000x750 JPEG shows what it does for large photos
    big = [folder / "big.jpg"]
    from PIL import Image

    Image.open(paths[0]).resize((1000, 750)).save(big[0], quality=90)
    torch.set_num_threads(1)
    try:
        t = alternate(
            {
                "pil": lambda: [_pil_load(big[0], False) for _ in range(8)],
                "pil_draft": lambda: [_pil_load(big[0], True) for _ in range(8)],
            },
            repeats,
        )
    finally:
        torch.set_num_threads(threads)
    out["large_1000x750"] = {"speedup_draft_vs_pil": t["pil"]["median_s"] / t["pil_draft"]["median_s"]}
    print(
        "[data] "
        + ", ".join(f"{k} {out[k]['images_per_s_per_core']:.0f} img/s" for k in fns)
        + f"; draft on 1000x750 x{out['large_1000x750']['speedup_draft_vs_pil']:.2f}",
        flush=True,
    )
    return out


# -- evaluation ------------------------------------------------------------------------------------------
class _JpegDataset(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return _pil_load(self.paths[i], False), i % 10  # uint8, as the project's loaders yield it


def bench_eval(repeats, folder: Path, device, model_name="mobilenetv3_small_050", batch=12) -> dict:
    import timm

    from timm_icl.data.preprocess import resolve_mean_std
    from timm_icl.distortions import Distortion, parse_distortions
    from timm_icl.eval.evaluate import evaluate_robustness

    paths = sorted(folder.glob("img_*.jpg")) or make_jpegs(folder)
    model = timm.create_model(model_name, num_classes=10).to(device).eval()
    dset = parse_distortions("paper")
    conditions = [Distortion("clean")] + list(dset)
    from timm_icl.data.preprocess import normalize, to_unit_float

    mean, std = resolve_mean_std(model, None, None) if _accepts3(resolve_mean_std) else resolve_mean_std(model)

    def loader():
        return torch.utils.data.DataLoader(_JpegDataset(paths), batch_size=batch)

    def one_decode():
        evaluate_robustness(model, loader(), dset, device=device, per_image=False)

    @torch.inference_mode()
    def eleven_passes():
        correct = 0
        for cond in conditions:  # every condition re-reads and re-decodes every JPEG
            for images, labels in loader():
                images = to_unit_float(images.to(device))
                x = (
                    cond(images, generator=torch.Generator(device=device).manual_seed(0))
                    if cond.kind == "noise"
                    else cond(images)
                )
                correct += int((model(normalize(x, mean, std)).argmax(1) == labels.to(device)).sum())
        return correct

    timing = alternate({"eleven_passes": eleven_passes, "one_decode": one_decode}, repeats, device)
    out = {"model": model_name, "images": len(paths), "conditions": len(conditions), **timing}
    out["speedup_one_decode"] = timing["eleven_passes"]["median_s"] / timing["one_decode"]["median_s"]
    print(f"[eval] one decode x{out['speedup_one_decode']:.2f} vs eleven passes", flush=True)
    return out


def _accepts3(fn) -> bool:
    import inspect

    return len(inspect.signature(fn).parameters) >= 3


# -- report ----------------------------------------------------------------------------------------------
TARGETS = {
    "icl_fp32 / plain (vgg16 step)": ("train", "vgg16", "icl_fp32", 1.30),
    "icl_cached / plain (vgg16 step)": ("train", "vgg16", "icl_cached", 1.05),
}


def _f(x, d=3):
    return "-" if x is None else f"{x:.{d}f}"


def write_report(res: dict, path: Path) -> None:
    m = res["machine"]
    lines = [
        "# timm-icl benchmark results",
        "",
        f"Generated by `{res['command']}` on {res['date']} in {res['elapsed_s']:.0f} s.",
        "",
        f"Machine: {m.get('cpu', '?')}, {m['cpu_count']} cores, {m.get('ram_gib', '?')} GiB RAM"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}, {m['platform']}. "
        f"Load average at start {m.get('loadavg_at_start')}.",
        "",
        "Every figure is a ratio measured within this run: the variants of a section run in turn (A, B, C, A, "
        "B, C ...)",
        "and each is the median over repeats. " + res.get("note", ""),
        "",
    ]
    targets = []
    if "train" in res:
        lines += ["## Training step (forward + backward + SGD update), time relative to plain fine-tuning", ""]
        lines += [
            "| model | px | batch | plain s | ICL fp32 | ICL fp32 ref channels-last | ICL bf16 autocast (flips) "
            "| ICL bf16 copy (flips) | ICL cached |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in res["train"].items():
            v = r["variants"]
            lines.append(
                f"| {name} | {r['image_size']} | {r['batch']} | {v['plain']['median_s']:.3f} | "
                f"{_f(v['icl_fp32']['ratio_to_plain'])} | "
                f"{_f(v['icl_fp32_channels_last']['ratio_to_plain'])} "
                f"({v['icl_fp32_channels_last']['target_flip_rate']:.3%}) | "
                f"{_f(v['icl_bf16_autocast']['ratio_to_plain'])} ({v['icl_bf16_autocast']['target_flip_rate']:.3%}) | "
                f"{_f(v['icl_bf16_copy']['ratio_to_plain'])} ({v['icl_bf16_copy']['target_flip_rate']:.3%}) | "
                f"{_f(v['icl_cached']['ratio_to_plain'])} |"
            )
        lines += [
            "",
            "Cached targets: "
            + ", ".join(
                f"{n} {r['variants']['icl_cached'].get('cache_bytes_per_image')} bytes/image"
                for n, r in res["train"].items()
            )
            + ".",
            "",
        ]
        if "vgg16" in res["train"]:
            v = res["train"]["vgg16"]["variants"]
            targets += [
                (
                    "ICL live fp32 reference / plain, vgg16 step",
                    "<= 1.30",
                    v["icl_fp32"]["ratio_to_plain"],
                    v["icl_fp32"]["ratio_to_plain"] <= 1.30,
                ),
                (
                    "ICL cached targets / plain, vgg16 step",
                    "<= 1.05",
                    v["icl_cached"]["ratio_to_plain"],
                    v["icl_cached"]["ratio_to_plain"] <= 1.05,
                ),
            ]
    if "loss" in res:
        r = res["loss"]
        lines += [
            "## Constraint loss alone (vgg16, batch 2, 224 px, forward + backward)",
            "",
            f"- default layers ({r['default_layers']['layers']}, {r['default_layers']['units_per_image']:,} "
            f"units/image): {r['default_layers']['median_s'] * 1e3:.1f} ms",
            f"- all {r['all_convs']['layers']} convs ({r['all_convs']['units_per_image']:,} units/image): "
            f"{r['all_convs']['median_s'] * 1e3:.1f} ms",
            "",
        ]
    if "memory" in res:
        kind = (
            "peak GPU memory allocated"
            if "gpu" in m and res.get("device") == "cuda"
            else "peak RSS of a fresh process: model, optimiser, two steps"
        )
        lines += [
            f"## Peak memory ({kind}), relative to plain fine-tuning",
            "",
            "| model | plain MiB | ICL fp32 | ICL bf16 copy | ICL cached (reference released) |",
            "|---|---|---|---|---|",
        ]
        for name, r in res["memory"].items():
            lines.append(
                f"| {name} | {r['plain']['peak_mib']:.0f} | {_f(r['icl_fp32']['ratio_to_plain'])} | "
                f"{_f(r['icl_bf16_copy']['ratio_to_plain'])} | {_f(r['icl_cached']['ratio_to_plain'])} |"
            )
        lines.append("")
        if "vgg16" in res["memory"]:
            r = res["memory"]["vgg16"]
            targets += [
                (
                    "peak memory ICL fp32 / plain, vgg16",
                    "<= 1.10",
                    r["icl_fp32"]["ratio_to_plain"],
                    r["icl_fp32"]["ratio_to_plain"] <= 1.10,
                ),
                (
                    "peak memory ICL cached / plain, vgg16",
                    "<= 1.10",
                    r["icl_cached"]["ratio_to_plain"],
                    r["icl_cached"]["ratio_to_plain"] <= 1.10,
                ),
            ]
    if "malloc" in res:
        r = res["malloc"]
        lines += [
            "## glibc allocator thresholds (CPU)",
            "",
            f"{r['model']} ICL step (batch {r['batch']}, {r['image_size']} px) in alternating subprocesses: "
            f"default {r['step_s']['default']:.3f} s, "
            f"with {' '.join(f'{k}={v}' for k, v in r['env'].items())}: {r['step_s']['malloc_env']:.3f} s "
            f"(ratio {r['ratio_env_to_default']:.3f}).",
            "",
        ]
    if "distortions" in res:
        d = res["distortions"]
        lines += [
            f"## Distortions on {d['batch']}x3x{d['image_size']}x{d['image_size']}",
            "",
            "| method | blur2 speed-up vs torchvision | blur2 max abs diff | blur10 speed-up | blur10 max abs diff |",
            "|---|---|---|---|---|",
        ]
        for k in d["blur2"]:
            if k == "kernel_size":
                continue
            a, b = d["blur2"][k], d["blur10"][k]
            lines.append(
                f"| {k} | {a['speedup_vs_torchvision']:.2f}x ({a['median_s'] * 1e3:.0f} ms) | "
                f"{a['max_abs_diff']:.1e} | {b['speedup_vs_torchvision']:.2f}x ({b['median_s'] * 1e3:.0f} ms) | "
                f"{b['max_abs_diff']:.1e} |"
            )
        n = d["noise60"]
        lines += [
            "",
            f"Exact reference: float64 scipy.ndimage.correlate1d, mode='mirror', the paper's kernel (size "
            f"{d['blur2']['kernel_size']} and {d['blur10']['kernel_size']}), on {d['checked_images']} images. "
            "PIL blurs uint8 images with its own box-filter approximation (radius = sigma), OpenCV per image in "
            "float32.",
            f"Noise (sigma 60): timm_icl {n['timm_icl']['median_s'] * 1e3:.0f} ms, "
            f"{n['timm_icl']['ratio_to_naive']:.2f}x the time of a bare randn + add + clamp.",
            "",
        ]
        for s, need in ((10, 10.0), (2, 2.5)):
            x = d[f"blur{s}"]["timm_icl"]["speedup_vs_torchvision"]
            targets.append((f"blur sigma {s}: timm_icl speed-up vs torchvision", f">= {need}x", x, x >= need))
    if "data" in res:
        r = res["data"]
        lines += [
            f"## Data: decode + resize + crop, one core ({r['size']})",
            "",
            "| method | images/s per core | vs PIL |",
            "|---|---|---|",
        ]
        for k in ("pil", "pil_draft", "torchvision_decode_jpeg"):
            lines.append(f"| {k} | {r[k]['images_per_s_per_core']:.0f} | {r[k]['speedup_vs_pil']:.2f}x |")
        lines += [
            "",
            f"`draft` cannot reduce a 500x375 JPEG for a 256 px resize (1/2 scale would leave 187 px); on a "
            f"1000x750 JPEG it is {r['large_1000x750']['speedup_draft_vs_pil']:.2f}x PIL.",
            "",
        ]
    if "eval" in res:
        r = res["eval"]
        lines += [
            "## Evaluation: all conditions with one decode per image vs one decoding pass per condition",
            "",
            f"{r['model']} on {r['images']} JPEGs, {r['conditions']} conditions: eleven passes "
            f"{r['eleven_passes']['median_s']:.2f} s, "
            f"`evaluate_robustness` (one decode) {r['one_decode']['median_s']:.2f} s: "
            f"{r['speedup_one_decode']:.2f}x faster.",
            "",
        ]
    if targets:
        lines += ["## Targets of issue 6", "", "| target | goal | measured | met |", "|---|---|---|---|"]
        lines += [f"| {t} | {g} | {x:.3f} | {'yes' if ok else '**no**'} |" for t, g, x, ok in targets]
        lines.append("")
    if res.get("notes_md"):
        lines += [res["notes_md"], ""]
    path.write_text("\n".join(lines))


# -- main -----------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny repeat counts and batches (development only)")
    p.add_argument("--sections", default="train,loss,memory,malloc,distortions,data,eval")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--vgg16-batch", type=int, default=2)
    p.add_argument("--small-batch", type=int, default=16)
    p.add_argument("--distortion-batch", type=int, default=64)
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--note", default="", help="text added to RESULTS.md (e.g. about machine load)")
    p.add_argument("--notes-file", type=Path, default=None, help="Markdown appended to RESULTS.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from --out/results.json (notes)")
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return {}
    if args.report_only:
        res = json.loads((args.out / "results.json").read_text())
        if args.notes_file:
            res["notes_md"] = args.notes_file.read_text()
            (args.out / "results.json").write_text(json.dumps(res, indent=1))
        write_report(res, args.out / "RESULTS.md")
        return res
    sections = set(args.sections.split(","))
    r = args.repeats or (2 if args.quick else 4)
    vb = 1 if args.quick else args.vgg16_batch
    sb = 4 if args.quick else args.small_batch
    # (model, px, batch, repeat multiplier): cheap steps get more repeats, so that each model gets similar time
    models = [("vgg16", 224, vb, 1), ("resnet18", 224, sb, 2), ("vgg_tiny", 28, sb * 4, 10)]
    if args.quick:
        models = models[1:]
    t0 = time.time()
    res = {
        "machine": machine(),
        "device": args.device,
        "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "note": args.note,
    }
    import timm_icl  # noqa: F401  (registers vgg_tiny)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "train" in sections:
            res["train"] = bench_train(models, r, args.device)
        if "loss" in sections:
            res["loss"] = bench_loss(r, args.device)
        if "memory" in sections:
            res["memory"] = bench_memory(models, args.device)
        if "malloc" in sections and args.device == "cpu":
            res["malloc"] = bench_malloc(models[0], 2, 3)
        if "distortions" in sections:
            res["distortions"] = bench_distortions(r, args.device, batch=8 if args.quick else args.distortion_batch)
        if "data" in sections:
            res["data"] = bench_data(r, folder)
        if "eval" in sections:
            res["eval"] = bench_eval(max(2, r // 2), folder, args.device)
    res["elapsed_s"] = time.time() - t0
    if args.notes_file:
        res["notes_md"] = args.notes_file.read_text()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    write_report(res, args.out / "RESULTS.md")
    print(f"wrote {args.out / 'RESULTS.md'} in {res['elapsed_s']:.0f} s")
    return res


if __name__ == "__main__":
    main()
