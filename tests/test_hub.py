"""Export and Hub round trips: local-dir and hf-hub loading give identical logits, the card parses back, offline and
unauthorised pushes fail with clear messages, transformers agrees with timm."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard

import timm_icl  # noqa: F401  (registers vgg_tiny)
from timm_icl.eval.evaluate import evaluate_robustness
from timm_icl.hub import HubError, export_model, push_to_hub

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

ICL_CONFIG = {
    "constraint": "icl",
    "constraint_weight": 0.1,
    "alpha": 100.0,
    "layers": ("pre_logits.fc1", "pre_logits.fc2"),
    "distortions": "noise:30,60 blur:1,2",
    "reference": "a frozen copy of the starting weights (vgg_tiny, clean-trained)",
}
TOKEN = "hf_fAkEtOkEn0123456789"


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = timm.create_model("vgg_tiny", num_classes=10).eval()
    images, labels = torch.rand(12, 3, 28, 28), torch.randint(0, 10, (12,))
    results = evaluate_robustness(model, [(images, labels)], "noise:30,60 blur:1,2", seed=0)
    return model, results


@pytest.fixture()
def exported(trained, tmp_path):
    model, results = trained
    folder = export_model(
        model,
        tmp_path / "run" / "model",
        icl_config=ICL_CONFIG,
        results=results,
        model_name="vgg-tiny-icl-test",
        dataset="fashion-mnist",
        license="mit",
    )
    return folder


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_export_then_local_dir_gives_identical_logits(trained, exported):
    model, results = trained
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md",
        "accuracy_vs_sigma.png",
        "config.json",
        "eval_results.json",
        "model.safetensors",
    ]  # safetensors only, no pickle .bin
    loaded = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    x = torch.rand(3, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))

    config = json.loads((exported / "config.json").read_text())
    assert "num_classes" not in config.get("model_args", {}) and config["num_classes"] == 10
    icl = config["icl"]
    assert icl["method"] == "icl" and icl["lambda"] == 0.1 and icl["alpha"] == 100.0
    assert icl["layers"] == ["pre_logits.fc1", "pre_logits.fc2"] and icl["dataset"] == "fashion-mnist"
    assert icl["reference"].endswith("(vgg_tiny, clean-trained)") and icl["distortions"] == "noise:30,60 blur:1,2"

    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "timm" and card.data.license == "mit"
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]
    top1 = {r.metric_config: r.metric_value for r in card.data.eval_results if r.metric_name.startswith("top-1")}
    assert top1 == {name: c["top1"] for name, c in results["conditions"].items()}
    assert "| vgg-tiny-icl-test |" in card.text and "accuracy_vs_sigma.png" in card.text
    assert "@inproceedings" in card.text


def test_export_rejects_model_without_pretrained_cfg(tmp_path):
    with pytest.raises(ValueError, match="pretrained_cfg"):
        export_model(torch.nn.Linear(2, 2), tmp_path / "m")


def test_offline_push_fails_at_once_and_folder_is_intact(exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _digest(exported)
    start = time.perf_counter()
    with pytest.raises(HubError, match="offline mode is on"):
        push_to_hub(exported, "user/vgg-tiny-icl", token=TOKEN)
    assert time.perf_counter() - start < 2.0
    assert _digest(exported) == before


def test_push_rejects_bad_arguments(exported, tmp_path):
    with pytest.raises(ValueError, match="user/name"):
        push_to_hub(exported, "no-namespace")
    with pytest.raises(ValueError, match="not an exported model folder"):
        push_to_hub(tmp_path, "user/x")


_PUSH_AND_LOAD = r"""
import json, sys, torch, timm, timm_icl
from timm_icl.hub import HubError, push_to_hub
folder, out = sys.argv[1], sys.argv[2]
report = {"commit": push_to_hub(folder, "user/vgg-tiny-icl")}  # token from HF_TOKEN
report["second"] = push_to_hub(folder, "user/vgg-tiny-icl", commit_message="update card")
try:
    push_to_hub(folder, "user/vgg-tiny-icl", token="hf_wrong", retries=1)
except HubError as e:
    report["unauthorised"] = str(e)
model = timm.create_model("hf-hub:user/vgg-tiny-icl", pretrained=True).eval()
torch.manual_seed(1)
x = torch.rand(3, 3, 28, 28)
with torch.no_grad():
    torch.save({"x": x, "logits": model(x), "state_dict": model.state_dict()}, out)
print(json.dumps(report))
"""


def test_push_to_local_hub_then_hf_hub_load_identical_logits(trained, exported, tmp_path):
    model, results = trained
    with HubServer(token=TOKEN) as hub:
        env = dict(
            os.environ,
            HF_ENDPOINT=hub.url,
            HF_HUB_OFFLINE="0",
            HF_HOME=str(tmp_path / "hf_home"),
            HF_TOKEN=TOKEN,
            OMP_NUM_THREADS="1",
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        out = tmp_path / "logits.pt"
        proc = subprocess.run(
            [sys.executable, "-c", _PUSH_AND_LOAD, str(exported.parent), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        repo = hub.repos["user/vgg-tiny-icl"]

    saved = torch.load(out)
    # the weights that came back through the Hub are bit-identical ...
    original = model.state_dict()
    assert set(saved["state_dict"]) == set(original)
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in original.items())
    # ... and so are the logits up to float summation order (the subprocess runs 1 thread, this one may not)
    with torch.no_grad():
        torch.testing.assert_close(model(saved["x"]), saved["logits"], rtol=0, atol=1e-6)

    assert report["commit"].startswith(hub.url) and len(repo["commits"]) == 2
    assert "not authorised to push to user/vgg-tiny-icl" in report["unauthorised"]
    assert set(repo["files"]) == {
        "README.md",
        "config.json",
        "model.safetensors",
        "eval_results.json",
        "accuracy_vs_sigma.png",
    }
    # the card was re-rendered for the repository, and its model-index parses back to the numbers
    card = ModelCard(repo["files"]["README.md"].decode())
    assert 'create_model("hf-hub:user/vgg-tiny-icl"' in card.text
    parsed = {(r.metric_config, r.metric_name.split(",")[0]): r.metric_value for r in card.data.eval_results}
    for name, cond in results["conditions"].items():
        assert parsed[(name, "top-1 accuracy")] == cond["top1"]
        assert parsed[(name, "top-5 accuracy")] == cond["top5"]
    # the token never lands in a file (local folder or pushed) or in the output
    for data in list(repo["files"].values()) + [p.read_bytes() for p in exported.iterdir()]:
        assert TOKEN.encode() not in data
    assert TOKEN not in proc.stdout + proc.stderr and "hf_wrong" not in proc.stdout + proc.stderr


def test_transformers_pipeline_agrees_with_timm(trained, exported):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    model, _ = trained
    hf_model = transformers.AutoModelForImageClassification.from_pretrained(str(exported)).eval()
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(hf_model(pixel_values=x).logits, model(x), atol=1e-6)

    classifier = transformers.pipeline("image-classification", model=str(exported), device="cpu")
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    rng = torch.Generator().manual_seed(0)
    for _ in range(3):
        pixels = (torch.rand(40, 36, 3, generator=rng) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels)
        with torch.no_grad():
            timm_top1 = int(model(transform(image).unsqueeze(0)).argmax())
        predicted = classifier(image, top_k=1)[0]["label"]
        assert predicted in (str(timm_top1), f"LABEL_{timm_top1}", hf_model.config.id2label[timm_top1])


def test_export_records_training_preprocessing_and_round_trips(tmp_path):
    """A model trained at 40 px, crop 0.8, bicubic exports that view: timm, transformers and timm-icl all use it."""
    transformers = pytest.importorskip("transformers")
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from timm_icl.data.preprocess import ImageTransform, normalize, resolve_preprocessing

    torch.manual_seed(0)
    model = timm.create_model("vgg_tiny", num_classes=10).eval()  # its own config: 28 px, crop 1.0, bilinear
    data_config = resolve_preprocessing(model, image_size=40, crop_pct=0.8, interpolation="bicubic")
    folder = export_model(model, tmp_path / "model", data_config=data_config, dataset="fashion-mnist")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    resolved = timm.data.resolve_data_config({}, model=loaded)
    assert resolved["input_size"] == (3, 40, 40) and resolved["crop_pct"] == 0.8
    assert resolved["interpolation"] == "bicubic" and resolved["crop_mode"] == "center"
    assert resolve_preprocessing(loaded) == data_config  # what `timm-icl eval RUN` crops with
    card = (folder / "README.md").read_text()
    assert "resize the shorter side to 50 px (bicubic), then centre-crop 40x40 (crop_pct 0.8)" in card

    transform = timm.data.create_transform(**resolved)
    ours = ImageTransform(data_config)
    classifier = transformers.pipeline("image-classification", model=str(folder), device="cpu")
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        image = Image.fromarray(getattr(skimage_data, name)())
        x = transform(image.convert("RGB"))
        crop = ours(image)  # uint8; timm's Normalize(ToTensor(crop)) is our device-side normalize, bit for bit
        assert torch.equal(normalize(crop[None], resolved["mean"], resolved["std"])[0], x)
        with torch.no_grad():
            timm_top1 = int(loaded(x.unsqueeze(0)).argmax())
        predicted = classifier(image, top_k=1)[0]["label"]
        assert predicted in (str(timm_top1), f"LABEL_{timm_top1}", classifier.model.config.id2label[timm_top1])


def test_card_metadata_is_what_ran(trained, tmp_path):
    model, results = trained
    config = {**ICL_CONFIG, "epochs": 40, "steps": 3, "epochs_completed": 0.25}
    local = export_model(model, tmp_path / "local", icl_config=config, results=results, dataset=str(tmp_path))
    card = ModelCard.load(local / "README.md")
    assert card.data.datasets is None  # a local folder is not a Hub dataset id, but it was evaluated on: named
    assert {r.dataset_name for r in card.data.eval_results} == {
        f"{tmp_path.name} (a local image folder, not on the Hub)"
    }
    assert str(tmp_path) not in (local / "README.md").read_text()  # no local path in the card
    assert json.loads((local / "config.json").read_text())["icl"]["dataset"] == tmp_path.name  # nor in config.json
    assert "| training length | 3 steps, 0.25 epochs completed (of 40 planned) |" in card.text
    assert "| epochs |" not in card.text and "| steps |" not in card.text

    hub = export_model(
        model, tmp_path / "hub", icl_config=config, results={**results, "split": "validation"}, dataset="org/images"
    )
    card = ModelCard.load(hub / "README.md")
    assert card.data.datasets == ["org/images"]
    assert {r.dataset_split for r in card.data.eval_results} == {"validation"}
    assert {r.dataset_type for r in card.data.eval_results} == {"org/images"}


def test_push_retries_transient_errors_in_process(exported, monkeypatch):
    import huggingface_hub.constants as hf_constants

    with HubServer(token=TOKEN) as hub:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        hub.fail_next_commits(1)  # the first commit gets a 503: push_to_hub waits 1 s and tries again
        url = push_to_hub(exported, "user/retry", token=TOKEN, retries=3)
        assert url.startswith(f"{hub.url}/user/retry/commit/")
        commits = [p for m, p, _ in hub.requests if p.endswith("/commit/main")]
        assert len(commits) == 2 and hub.repos["user/retry"]["commits"] == ["Upload vgg-tiny-icl-test (timm-icl)"]
        hub.fail_next_commits(5)
        with pytest.raises(HubError, match=r"failed after 2 attempts \(HTTP 503"):
            push_to_hub(exported, "user/retry", token=TOKEN, retries=2)


def test_push_to_an_unreachable_hub_retries_then_names_the_transport_error(exported, monkeypatch):
    import huggingface_hub.constants as hf_constants

    before = {f.name: f.read_bytes() for f in exported.iterdir() if f.is_file()}
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setattr(time, "sleep", lambda s: None)  # the back-off between the two attempts
    with pytest.raises(HubError, match=r"failed after 2 attempts \(ConnectError: .*folder .* is intact"):
        push_to_hub(exported, "user/retry", token=TOKEN, retries=2)
    assert {f.name: f.read_bytes() for f in exported.iterdir() if f.is_file()} == before


# --------------------------------------------------------------------------------------------------------------------
# safety: non-finite weights, atomic export, push validation before training, failed push leaves the folder alone
# --------------------------------------------------------------------------------------------------------------------
def _diverged(model: torch.nn.Module) -> torch.nn.Module:
    broken = timm.create_model("vgg_tiny", num_classes=10)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.pre_logits.fc1.weight[0, 0] = float("nan")
        broken.head.fc.bias.fill_(float("inf"))
    return broken


def test_export_and_push_refuse_non_finite_weights(trained, exported, tmp_path):
    model, _ = trained
    before = _digest(exported)
    with pytest.raises(
        ValueError, match=r"2 of \d+ weight tensors hold NaN or infinite values \(pre_logits.fc1.weight"
    ):
        export_model(_diverged(model), exported)
    assert _digest(exported) == before and [p.name for p in exported.parent.iterdir()] == ["model"]
    # a folder whose weights were damaged afterwards (or written by another tool) is not pushed either
    from safetensors.torch import save_file

    save_file(_diverged(model).state_dict(), str(exported / "model.safetensors"))
    with pytest.raises(ValueError, match=r"refusing to push .* hold NaN or infinite values .*head.fc.bias"):
        push_to_hub(exported, "user/x", token=TOKEN)
    (exported / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match=r"model.safetensors: it is damaged or truncated"):
        push_to_hub(exported, "user/x", token=TOKEN)


def test_export_replaces_the_folder_as_a_whole(trained, exported):
    model, _ = trained
    (exported / "notes.txt").write_text("mine")
    (exported / "pytorch_model.bin").write_bytes(b"stale")
    again = export_model(model, exported, icl_config=ICL_CONFIG, model_name="second")  # no results this time
    assert again == exported
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    assert json.loads((exported / "config.json").read_text())["icl"]["model_name"] == "second"
    assert "local-dir:path/to/model" in (exported / "README.md").read_text()  # its name, not the staging folder's
    assert sorted(p.name for p in exported.parent.iterdir()) == ["model"]  # no staging folder left


@pytest.fixture()
def local_hub(monkeypatch):
    import huggingface_hub.constants as hf_constants

    with HubServer(token=TOKEN, read_token="hf_readonly", orgs={"team": "write", "readers": "read"}) as hub:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        yield hub


@pytest.mark.parametrize(
    "repo_id, token, message",
    [
        ("user/ok", TOKEN, None),
        ("team/ok", TOKEN, None),
        ("no-namespace", TOKEN, "repo_id must look like 'user/name'"),
        ("user/bad name", TOKEN, "invalid repo_id 'user/bad name'"),
        ("user/x--y", TOKEN, "invalid repo_id"),
        ("user/ok", "hf_wrong", "not authorised to push to user/ok"),
        ("user/ok", "hf_readonly", "the token of 'user' is read-only"),
        ("someone/ok", TOKEN, "the token belongs to 'user', who is not 'someone' nor a member of it"),
        ("readers/ok", TOKEN, "'user' has only the read role in 'readers'"),
    ],
)
def test_validate_push(local_hub, repo_id, token, message):
    from timm_icl.hub import validate_push

    if message is None:
        assert validate_push(repo_id, token=token) == "user"
        return
    with pytest.raises((ValueError, HubError), match=message) as info:
        validate_push(repo_id, token=token)
    assert "\n" not in str(info.value)
    assert not [p for m, p, _ in local_hub.requests if m == "POST"]  # nothing was created


def test_validate_push_offline_and_unreachable(monkeypatch):
    import huggingface_hub.constants as hf_constants

    from timm_icl.hub import validate_push

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline mode is on"):
        validate_push("user/ok", token=TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(HubError, match=r"the Hub at http://127.0.0.1:9 cannot be reached"):
        validate_push("user/ok", token=TOKEN)


def test_a_failed_push_leaves_the_folder_unchanged(exported, local_hub):
    before = _digest(exported)
    with pytest.raises(HubError, match="not authorised to push to user/x"):
        push_to_hub(exported, "user/x", token="hf_readonly", retries=1)
    local_hub.fail_next_commits(1)
    with pytest.raises(HubError, match="failed after 1 attempts"):
        push_to_hub(exported, "user/x", token=TOKEN, retries=1)
    assert _digest(exported) == before and sorted(p.name for p in exported.iterdir() if p.name.startswith(".")) == []
    push_to_hub(exported, "user/x", token=TOKEN, retries=1)  # a successful push updates the local card
    assert 'create_model("hf-hub:user/x"' in (exported / "README.md").read_text()
    assert local_hub.repos["user/x"]["files"]["README.md"] == (exported / "README.md").read_bytes()
