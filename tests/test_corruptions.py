"""Camera corruptions: the registry with a user function, each built-in against imagecorruptions on real photos,
per-image severity, seeded determinism in training and evaluation, the same code on CUDA, mCE by hand."""

import math
import warnings

import numpy as np
import pytest
import timm
import torch

import timm_icl
from timm_icl.distortions import (
    IMAGENET_C_10,
    Distortion,
    DistortionSampler,
    apply_distortions,
    distortion_names,
    get_distortion,
    parse_distortions,
    register_distortion,
    unregister_distortion,
)
from timm_icl.distortions import corruptions as C
from timm_icl.eval import format_corruption_table, mean_corruption_error, plot_accuracy_vs_sigma
from timm_icl.eval.evaluate import distort, evaluate_robustness
from timm_icl.eval.stats import condition_names, sort_conditions

skimage_data = pytest.importorskip("skimage.data")

DETERMINISTIC = ["defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg"]
ALL = ["shot_noise", "impulse_noise", "motion_blur"] + DETERMINISTIC


def _corrupt():
    with warnings.catch_warnings():  # imagecorruptions imports pkg_resources (deprecated)
        warnings.simplefilter("ignore")
        imagecorruptions = pytest.importorskip("imagecorruptions")
    return imagecorruptions.corrupt


def _photos():
    """Two real photos, centre crops of 224 x 207 (not square, so height and width cannot be swapped unnoticed)."""
    out = []
    for image in (skimage_data.astronaut(), skimage_data.coffee()):
        h, w = image.shape[:2]
        out.append(np.ascontiguousarray(image[(h - 224) // 2 : (h + 224) // 2, (w - 224) // 2 : (w - 224) // 2 + 207]))
    return out


def _tensor(photo, dtype=torch.float64):
    return torch.from_numpy(photo).permute(2, 0, 1)[None].to(dtype) / 255


def _levels(level, n=1):
    return torch.full((n,), float(level))


# ---------------------------------------------------------------------------------------------------------------------
# against the reference (imagecorruptions 1.1.2) on real photos
# ---------------------------------------------------------------------------------------------------------------------
# Bounds in 0-255 levels: the reference returns np.uint8(float result), which truncates, so an exact float
# computation differs by < 1 level; JPEG goes through the same libjpeg arithmetic and is measured identical on CPU.
BOUNDS = {"defocus_blur": 1.0, "zoom_blur": 1.0, "brightness": 1.0, "contrast": 1.0, "pixelate": 1.0, "jpeg": 0.0}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_match_reference(name):
    corrupt = _corrupt()
    reference_name = "jpeg_compression" if name == "jpeg" else name
    for photo in _photos():
        for level in range(1, 6):
            ref = corrupt(photo, corruption_name=reference_name, severity=level).astype(np.float64)
            ours = getattr(C, name)(_tensor(photo), _levels(level))[0].permute(1, 2, 0).numpy() * 255
            diff = np.abs(ours - ref)
            assert diff.max() <= BOUNDS[name] + 1e-4, (name, level, diff.max())  # + the float32 kernel of cv2
            # truncating ours the way the reference does leaves (almost) nothing
            assert np.abs(np.floor(ours + 1e-6) - ref).mean() < (0.9 if name == "pixelate" else 0.06), (name, level)


def test_motion_blur_matches_reference_given_its_angle():
    corrupt = _corrupt()
    photo = _photos()[0]
    for level in range(1, 6):
        for seed in (0, 1):
            np.random.seed(seed)
            angle = np.random.uniform(-45, 45)  # the reference's only random draw
            np.random.seed(seed)
            ref = corrupt(photo, corruption_name="motion_blur", severity=level).astype(np.float64)
            ours = C.motion_blur(_tensor(photo), _levels(level), angle=torch.tensor([angle]))
            diff = np.abs(ours[0].permute(1, 2, 0).numpy() * 255 - ref)
            assert diff.max() <= 1.0 + 1e-6 and diff.mean() < 0.52, (level, seed, diff.max())
    # a shift as long as the image ends the kernel in the reference too (32 px, level 5: 41 taps)
    small = np.ascontiguousarray(photo[:32, :40])
    np.random.seed(3)
    angle = np.random.uniform(-45, 45)
    np.random.seed(3)
    ref = corrupt(small, corruption_name="motion_blur", severity=5).astype(np.float64)
    ours = C.motion_blur(_tensor(small), _levels(5), angle=torch.tensor([angle]))[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(ours - ref).max() <= 1.0 + 1e-6


@pytest.mark.parametrize("name", ["shot_noise", "impulse_noise"])
def test_random_noise_statistics_match_reference(name):
    """Different random generators (numpy's vs torch's): compare the distribution of the change per level."""
    corrupt = _corrupt()
    photo = _photos()[0]
    clean = photo / 255.0
    for level in range(1, 6):
        np.random.seed(level)
        ref = corrupt(photo, corruption_name=name, severity=level) / 255.0
        ours = getattr(C, name)(_tensor(photo), _levels(level), torch.Generator().manual_seed(level))
        ours = np.floor(ours[0].permute(1, 2, 0).numpy() * 255 + 1e-9) / 255.0  # the reference's uint8
        d_ref, d_ours = ref - clean, ours - clean
        assert abs(d_ref.mean() - d_ours.mean()) < 0.003, (level, d_ref.mean(), d_ours.mean())
        assert abs(d_ref.std() / d_ours.std() - 1) < 0.03, (level, d_ref.std(), d_ours.std())
        for value in (0.0, 1.0):  # the salt and the pepper (and shot noise's dark and saturated pixels)
            assert abs((ref == value).mean() - (ours == value).mean()) < 0.005, (level, value)


# ---------------------------------------------------------------------------------------------------------------------
# per-image severity, determinism, any size
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_per_image_severity_equals_one_image_at_a_time(name):
    images = _tensor(_photos()[1][::3, ::3], torch.float32).repeat(4, 1, 1, 1)  # 75 x 69
    images[1:] = images[1:].flip(-1)
    levels = torch.tensor([1.0, 5.0, 3.0, 5.0])
    fn = getattr(C, name)
    batch = fn(images, levels, torch.Generator().manual_seed(0))
    assert batch.shape == images.shape and batch.dtype == images.dtype
    assert float(batch.min()) >= 0 and float(batch.max()) <= 1
    if name in DETERMINISTIC:
        for i in range(4):
            one = fn(images[i : i + 1], levels[i : i + 1])
            assert torch.allclose(batch[i], one[0], atol=1e-6), (name, i)
    # stronger level, larger change (images 1 and 3 are the same picture at level 5: same strength)
    change = (batch - images).abs().flatten(1).mean(1)
    assert change[1] > change[2] > change[0], (name, change.tolist())
    if name in ("shot_noise", "impulse_noise", "motion_blur"):
        again = fn(images, levels, torch.Generator().manual_seed(0))
        other = fn(images, levels, torch.Generator().manual_seed(1))
        assert torch.equal(batch, again) and not torch.equal(batch, other)


def test_any_image_size_and_clear_severity_errors():
    tiny = torch.rand(2, 3, 9, 7)
    for name in ALL:
        assert getattr(C, name)(tiny, torch.tensor([1.0, 5.0]), torch.Generator().manual_seed(0)).shape == tiny.shape
    with pytest.raises(ValueError, match="ImageNet-C level"):
        C.contrast(tiny, torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="jpeg_quality:QUALITY"):
        parse_distortions("jpeg:20,50")
    assert [c.name for c in parse_distortions("shot_noise:1,3,5 jpeg_quality:20,50")] == [
        "shot_noise1",
        "shot_noise3",
        "shot_noise5",
        "jpeg_quality20",
        "jpeg_quality50",
    ]
    with pytest.raises(ValueError, match="glass_blur, snow, frost, fog and elastic_transform"):
        parse_distortions("imagenet-c-15")


def test_imagenet_c_10_set():
    assert len(IMAGENET_C_10) == 50 and parse_distortions("imagenet-c-10") == IMAGENET_C_10
    assert IMAGENET_C_10.kinds() == [
        "noise",
        "shot_noise",
        "impulse_noise",
        "defocus_blur",
        "motion_blur",
        "zoom_blur",
        "brightness",
        "contrast",
        "pixelate",
        "jpeg",
    ]
    assert [c.sigma for c in IMAGENET_C_10.of_kind("noise")] == [20.4, 30.6, 45.9, 66.3, 96.9]
    assert parse_distortions(IMAGENET_C_10.to_text()) == IMAGENET_C_10


# ---------------------------------------------------------------------------------------------------------------------
# the registry: a user's function everywhere a built-in one works
# ---------------------------------------------------------------------------------------------------------------------
def _salt(images, severity, generator=None):
    """A user's random distortion: a fraction ``severity`` of the pixels (all channels) set to white."""
    mask = torch.rand(images.shape[0], 1, *images.shape[2:], generator=generator, device=images.device)
    return torch.where(mask < severity.to(images).view(-1, 1, 1, 1), torch.ones_like(images), images)


def _darken(images, severity, generator=None):
    """A user's deterministic distortion: multiply by ``1 - severity``."""
    return images * (1 - severity.to(images).view(-1, 1, 1, 1))


@pytest.fixture
def user_kinds():
    register_distortion("salt", _salt, severities=(0.1, 0.3), maximum=1.0, random=True, family="noise")
    register_distortion("darken", _darken, severities=(0.5,), maximum=1.0)
    yield
    unregister_distortion("salt")
    unregister_distortion("darken")


def test_registry_round_trip_with_user_function(user_kinds):
    assert distortion_names()[:3] == ("clean", "noise", "blur") and "salt" in distortion_names()
    ds = parse_distortions("salt:0.1,0.3 darken noise:20")
    assert [c.name for c in ds] == ["salt0.1", "salt0.3", "darken0.5", "noise20"]
    assert parse_distortions(ds.to_text()) == ds and ds[0].random and not ds[2].random
    images = torch.rand(3, 3, 10, 12)
    assert torch.equal(Distortion("darken", 0.5)(images), images * 0.5)
    with pytest.raises(ValueError, match=r"salt sigma must be in \[0, 1\]"):
        parse_distortions("salt:2")
    with pytest.raises(ValueError, match="already registered"):
        register_distortion("salt", _salt, severities=(0.1,))
    with pytest.raises(ValueError, match="not end in a digit"):
        register_distortion("salt2", _salt, severities=(0.1,))
    with pytest.raises(ValueError, match="cannot be replaced"):
        register_distortion("noise", _salt, severities=(0.1,), overwrite=True)
    with pytest.raises(ValueError, match=r"distortion 'bad_shape' at severity 1 returned \(2, 1, 64, 64\)"):
        register_distortion("bad_shape", lambda x, s, g=None: x[:, :1], severities=(1.0,))
    assert "bad_shape" not in distortion_names()

    # the training sampler: each image gets its kind's function; seeded, resumable
    sampler = DistortionSampler("salt:0.3 darken:0.5 blur:2", seed=4)
    out, (kinds, _) = sampler(images.repeat(4, 1, 1, 1))
    names = distortion_names()
    for i, k in enumerate(kinds.tolist()):
        if names[k] == "darken":
            assert torch.allclose(out[i], images.repeat(4, 1, 1, 1)[i] * 0.5)
        elif names[k] == "salt":
            assert float((out[i] == 1).all(0).float().mean()) > 0.1
    state = sampler.state_dict()
    first, _ = sampler(images)
    other = DistortionSampler("salt:0.3 darken:0.5 blur:2", seed=0)
    other.load_state_dict(state)
    assert torch.equal(first, other(images)[0])


def _tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 30 * 30, 10)
    ).eval()
    model.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    return model


def test_evaluation_seeds_every_random_kind_per_image(user_kinds):
    """Random kinds (built-in or the user's) give the same numbers for any batch size."""
    model = _tiny_model()
    images = (torch.rand(10, 3, 32, 32) * 255).to(torch.uint8)
    with torch.no_grad():
        labels = model((images.float() / 255 - 0.5) / 0.25).argmax(1)
    text = "salt:0.3 shot_noise:2 motion_blur:3 jpeg:5"
    runs = [
        evaluate_robustness(model, [(images[i : i + b], labels[i : i + b]) for i in range(0, 10, b)], text, seed=1)
        for b in (10, 3)
    ]
    assert runs[0]["conditions"] == runs[1]["conditions"] and runs[0]["per_image"] == runs[1]["per_image"]
    assert runs[0]["conditions"]["clean"]["top1"] == 1.0
    assert set(runs[0]["summary"]) >= {"clean", "salt", "shot_noise", "motion_blur", "jpeg"}
    # the same image, in a batch or alone, gets the same corruption
    x = images.float() / 255
    cond = Distortion("motion_blur", 3)
    whole = distort(x, cond, seed=1, condition_index=2, image_indices=range(10))
    part = distort(x[4:7], cond, seed=1, condition_index=2, image_indices=range(4, 7))
    assert torch.equal(whole[4:7], part)


def test_icl_task_trains_against_camera_corruptions():
    """The recipe's --distortions goes to ICLTask: a mix of noise, motion blur and JPEG trains (loss goes down)."""
    torch.manual_seed(0)
    model = timm.create_model("vgg_tiny")
    task = timm_icl.ICLTask(model, distortions="noise:20,60,100 motion_blur:1,3,5 jpeg:1,3,5", seed=0)
    images = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    target = torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(task.trainable_module.parameters(), lr=0.05)

    def clean_loss() -> float:  # the loss of one random draw is noisy; the clean batch's CE is not
        model.eval()
        with torch.no_grad():
            loss = float(torch.nn.functional.cross_entropy(model(task.normalize(images)), target))
        task.train()
        return loss

    before = clean_loss()
    losses = []
    for _ in range(4):
        out = task(images, target)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert all(math.isfinite(v) for v in losses) and clean_loss() < before - 0.05
    kinds = {distortion_names()[k] for k in task.sampler.sample(200)[0].tolist()}
    assert kinds == {"noise", "motion_blur", "jpeg"}


# ---------------------------------------------------------------------------------------------------------------------
# mean corruption error
# ---------------------------------------------------------------------------------------------------------------------
def _result(clean, by_kind):
    conditions = {"clean": {"kind": "clean", "sigma": 0.0, "top1": clean}}
    for kind, accs in by_kind.items():
        for level, acc in enumerate(accs, 1):
            conditions[f"{kind}{level}"] = {"kind": kind, "sigma": float(level), "top1": acc}
    return {"conditions": conditions, "distortions": " ".join(f"{k}:1,2" for k in by_kind)}


def test_mean_corruption_error_by_hand(tmp_path):
    base = _result(0.9, {"jpeg": [0.8, 0.6], "contrast": [0.5, 0.3]})
    model = _result(0.8, {"jpeg": [0.7, 0.7], "contrast": [0.6, 0.5]})
    out = mean_corruption_error(model, base)
    # jpeg: errors (0.3 + 0.3) / (0.2 + 0.4) = 1.0; contrast: (0.4 + 0.5) / (0.5 + 0.7) = 0.75; mCE = 0.875
    assert out["corruptions"]["jpeg"]["ce"] == pytest.approx(1.0)
    assert out["corruptions"]["contrast"]["ce"] == pytest.approx(0.75)
    assert out["mce"] == pytest.approx(0.875)
    # relative: jpeg (0.6 - 2*0.2) / (0.6 - 2*0.1) = 0.5; contrast (0.9 - 0.4) / (1.2 - 0.2) = 0.5
    assert out["relative_mce"] == pytest.approx(0.5)
    assert out["corruptions"]["jpeg"]["top1"] == pytest.approx(0.7)
    assert mean_corruption_error(base, base)["mce"] == pytest.approx(1.0)
    # two seeds: accuracies averaged first
    model2 = _result(0.8, {"jpeg": [0.5, 0.5], "contrast": [0.6, 0.5]})
    assert mean_corruption_error([model, model2], base)["corruptions"]["jpeg"]["ce"] == pytest.approx(0.8 / 0.6)
    table = format_corruption_table({"icl": model}, base)
    assert "| jpeg | digital | 0.7000 | 100.0 |" in table and "| **mCE** |  |  | 87.5 |" in table
    assert "| contrast | digital | 0.5500 |" in format_corruption_table({"icl": model})
    with pytest.raises(ValueError, match="not evaluated on"):
        mean_corruption_error(_result(0.8, {"pixelate": [0.5, 0.4]}), base)
    with pytest.raises(ValueError, match="no error on jpeg"):
        mean_corruption_error(model, _result(0.9, {"jpeg": [1.0, 1.0], "contrast": [0.5, 0.3]}))
    # kinds are groups everywhere (tables, paired tests, plot lines), each kind's severities together
    assert sort_conditions(model["conditions"]) == ["clean", "contrast1", "contrast2", "jpeg1", "jpeg2"]
    assert condition_names(model["conditions"], "jpeg") == ["jpeg1", "jpeg2"]
    assert condition_names(model["conditions"], "jpeg2") == ["jpeg2"]
    path = plot_accuracy_vs_sigma({"icl": model, "base": base}, tmp_path / "c.png")
    assert path.stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------------------------
# the same code on CUDA
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    images = _tensor(_photos()[0], torch.float32).repeat(3, 1, 1, 1)
    levels = torch.tensor([1.0, 3.0, 5.0])
    for name in ALL:
        fn = getattr(C, name)
        gen = torch.Generator(device="cuda").manual_seed(0)
        gpu = fn(images.cuda(), levels.cuda(), gen)
        assert gpu.device.type == "cuda" and gpu.shape == images.shape
        if name in DETERMINISTIC:
            cpu = fn(images, levels)
            # nvJPEG is another codec than libjpeg: a few levels apart; the rest is float rounding
            bound = 12 / 255 if name == "jpeg" else 1e-4
            mean_bound = 1.5 / 255 if name == "jpeg" else 1e-6
            assert (gpu.cpu() - cpu).abs().max() <= bound and (gpu.cpu() - cpu).abs().mean() <= mean_bound, name
    sampler = DistortionSampler("noise:20,60,100 motion_blur:1,3,5 jpeg:1,3,5", seed=0)
    out, (kinds, _) = sampler(images.cuda())
    assert out.device.type == "cuda" and kinds.device.type == "cuda"
    assert get_distortion("motion_blur").random
    x = images.cuda()
    assert torch.equal(apply_distortions(x, kinds, _, generator=None)[kinds == 0], x[kinds == 0])


def test_cli_corruption_benchmark_with_baseline(tmp_path):
    """`timm-icl eval --distortions imagenet-c-10 --baseline` prints per-corruption top-1, CE and mCE."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from timm_icl.eval import load_results
    from timm_icl.hub import export_model

    pytest.importorskip("timm_icl.data")
    if not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST files not installed")
    torch.manual_seed(0)
    export_model(timm.create_model("vgg_tiny", num_classes=10), tmp_path / "run" / "model", icl_config={})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "timm_icl.cli", "eval", str(tmp_path / "run"), "--dataset", "fashion-mnist"]
    base += ["--max-samples", "24", "--batch-size", "8", "-q", "--distortions", "imagenet-c-10"]
    first = subprocess.run([*base, "-o", str(tmp_path / "a.json")], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.splitlines()[0] == "| corruption | family | run top-1 |"
    assert "| motion_blur | blur |" in first.stdout and "mCE" not in first.stdout
    second = subprocess.run(
        [*base, "--baseline", str(tmp_path / "a.json"), "-o", str(tmp_path / "b.json")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    # the same model and seed against itself: every CE is 100
    assert "| **mCE** |  |  | 100.0 |" in second.stdout
    res = load_results(tmp_path / "b.json")
    assert res["corruption_error"]["mce"] == pytest.approx(1.0) and len(res["corruption_error"]["corruptions"]) == 10
    assert load_results(tmp_path / "a.json")["per_image"] == res["per_image"]


def test_recipe_trains_and_validates_on_camera_corruptions(tmp_path):
    """recipes/train_icl.py --distortions "noise:20,60,100 motion_blur:1,3,5 jpeg:1,3,5": a short run end to end."""
    import json
    import sys
    from pathlib import Path

    if not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST files not installed")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import train_icl

    out = tmp_path / "run"
    text = "noise:20,60,100 motion_blur:1,3,5 jpeg:1,3,5"
    argv = [
        "--model",
        "vgg_tiny",
        "--no-pretrained",
        "--allow-random-reference",
        "--dataset",
        "fashion-mnist",
        "--val-split",
        "test",
    ]
    argv += ["--max-train-samples", "32", "--max-val-samples", "8", "--batch-size", "8", "--num-workers", "0"]
    argv += ["--distortions", text, "--epochs", "1", "--output-dir", str(out)]
    assert train_icl.main(argv) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["distortions"] == text and evaluated["conditions"]["motion_blur5"]["count"] == 8
    assert evaluated["summary"]["jpeg"] is not None


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda x, s, g=None: x.double(), "returned torch.float64 on cpu for torch.float32 images on cpu"),
        (lambda x, s, g=None: (x * 255).to(torch.uint8), "returned torch.uint8 on cpu for torch.float32 images"),
        (lambda x, s, g=None: x * 1000 - 500, "returned values in [-500, 499.9]; images are in [0, 1]: clamp the"),
        (lambda x, s, g=None: x / 0 - x / 0, "returned NaN or inf values"),
        (lambda x, s, g=None: x.tolist(), "returned list for images of shape (2, 3, 64, 64)"),
        (lambda x, s: x, "raised TypeError"),
    ],
    ids=["float64", "uint8", "range", "nan", "list", "signature"],
)
def test_a_registered_distortion_is_checked_once_with_one_line_naming_it(fn, message):
    with pytest.raises(ValueError) as info:
        register_distortion("checked", fn, severities=(0.5,), maximum=1.0)
    text = str(info.value)
    assert text.startswith("distortion 'checked' at severity 0.5 ") and message in text and "\n" not in text, text
    assert "checked" not in distortion_names()


def test_a_good_distortion_is_called_once_per_severity_at_registration_and_never_checked_again():
    calls = []

    def fn(images, severity, generator=None):
        calls.append(images.shape)
        return images * 0.5

    register_distortion("halve", fn, severities=(0.5, 1.0), maximum=1.0)
    try:
        assert len(calls) == 2  # the probe: once per default severity, at registration
        Distortion("halve", 0.5)(torch.rand(4, 3, 8, 8))
        assert len(calls) == 3  # a call costs one call: nothing is checked on the way
    finally:
        unregister_distortion("halve")


def test_a_distortion_is_checked_again_once_at_its_first_call_on_another_device():
    """A function that makes its output on the CPU passes the CPU probe at registration; its first call on another
    device (the meta device stands in for a GPU here) is refused with one line naming the kind and the device."""
    calls = []

    def on_cpu(images, severity, generator=None):
        calls.append(images.device.type)
        return torch.zeros(images.shape)  # the CPU, whatever the images' device

    register_distortion("cpu_only", on_cpu, severities=(0.5,), maximum=1.0)
    try:
        assert calls == ["cpu"]
        images = torch.rand(4, 3, 8, 8, device="meta")
        with pytest.raises(ValueError) as info:
            Distortion("cpu_only", 0.5)(images)
        text = str(info.value)
        assert text == (
            "distortion 'cpu_only' at severity 0.5 on meta returned torch.float32 on cpu for torch.float32 images on "
            "meta: return the input's dtype and device"
        ), text
        assert calls == ["cpu", "meta"]  # the probe ran; the user's batch never reached the function
    finally:
        unregister_distortion("cpu_only")
