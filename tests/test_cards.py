"""Model cards that tell the truth anywhere: the recipe run on Fashion-MNIST, a local image folder and a local
webdataset, each card parsed back (YAML metadata and text) and each config.json read back."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
from huggingface_hub import ModelCard
from PIL import Image
from test_stream import make_wds

import timm_icl  # noqa: F401  (registers vgg_tiny)
from timm_icl.loading import create_model, hub_id_of_pretrained_cfg, weights_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import train_icl  # noqa: E402

SMALL = ["--model", "vgg_tiny", "--batch-size", "8", "--num-workers", "0", "--distortions", "noise:30 blur:1",
         "--epochs", "1", "--log-every", "2", "--lr", "0.05"]  # fmt: skip


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=6, split="train") -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A clean-trained vgg_tiny (the demo's step 1): random start, constraint none."""
    out = tmp_path_factory.mktemp("ref") / "reference"
    argv = [*SMALL, "--no-pretrained", "--constraint", "none", "--clean-fraction", "1.0", "--dataset", "fashion-mnist"]
    argv += ["--val-split", "test", "--max-train-samples", "32", "--max-val-samples", "16", "--output-dir", str(out)]
    assert train_icl.main(argv) == 0
    return out / "model"


def _card(folder: Path) -> tuple[ModelCard, str, dict]:
    text = (folder / "README.md").read_text()
    return ModelCard(text), text, json.loads((folder / "config.json").read_text())


def _no_local_paths(text: str, *paths: Path) -> None:
    for path in paths:
        assert str(path) not in text and str(path.resolve()) not in text
    assert "/tmp/" not in text


def _metrics(card: ModelCard) -> dict:
    return {r.metric_name: r.metric_value for r in card.data.eval_results}


def test_fashion_mnist_card(reference, tmp_path):
    out = tmp_path / "fm_icl"
    argv = [*SMALL, "--init-checkpoint", str(reference), "--dataset", "fashion-mnist", "--val-split", "test"]
    argv += ["--max-train-samples", "32", "--max-val-samples", "16", "--output-dir", str(out), "--license", "mit"]
    assert train_icl.main(argv) == 0
    card, text, config = _card(out / "model")
    results = json.loads((out / "eval.json").read_text())
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"] and card.data.license == "mit"
    assert card.data.base_model is None  # the reference was trained from scratch here: no Hub weights to name
    (result,) = {(r.dataset_type, r.dataset_name, r.dataset_split) for r in card.data.eval_results}
    assert result == ("zalando-datasets/fashion_mnist", "Fashion-MNIST", "test[:16]")  # a subset, said so
    assert all(r.dataset_config is None for r in card.data.eval_results)  # conditions are metrics, not configs
    metrics = _metrics(card)
    assert metrics["top-1 accuracy, clean"] == results["conditions"]["clean"]["top1"]
    assert metrics["top-1 accuracy, gaussian noise sigma 30 (0-255)"] == results["conditions"]["noise30"]["top1"]
    assert metrics["top-5 accuracy, gaussian blur sigma 1 px"] == results["conditions"]["blur1"]["top5"]
    assert "16 images of Fashion-MNIST, split `test[:16]`" in text
    assert "Fine-tuned from local weights (`--init-checkpoint`; no Hub weights timm knows behind them)" in text
    assert "The constraint's reference network is a frozen copy of the starting weights." in text
    assert config["icl"]["weights_origin"] == "init-checkpoint" and config["pretrained_cfg"]["license"] == "mit"
    _no_local_paths(text + json.dumps(config), tmp_path, reference)
    # the reference itself: random start, no reference network, no licence claimed (not the architecture's tag)
    card, text, config = _card(reference)
    assert card.data.license is None and "Licence of these weights: not stated" in text
    assert "license" not in config["pretrained_cfg"] and "paper_ids" not in config["pretrained_cfg"]
    assert "random initialisation" in text and "uses no frozen reference network" in text


def test_image_folder_card(reference, tmp_path):
    data = make_image_folder(tmp_path / "pets")
    out = tmp_path / "folder_icl"
    argv = [*SMALL, "--init-checkpoint", str(reference), "--num-classes", "3", "--dataset", str(data)]
    argv += ["--val-split", "train", "--image-size", "28", "--output-dir", str(out)]
    assert train_icl.main(argv) == 0
    card, text, config = _card(out / "model")
    assert card.data.datasets is None and card.data.license is None
    (result,) = {(r.dataset_type, r.dataset_name, r.dataset_split) for r in card.data.eval_results}
    assert result == ("imagefolder", "pets (a local image folder, not on the Hub)", "train")
    assert len(card.data.eval_results) == 6  # top-1 and top-5, clean + 2 conditions
    assert config["num_classes"] == 3 and config["icl"]["dataset"] == "pets"
    assert "a local image folder named `pets` (not on the Hub)" in text
    _no_local_paths(text + json.dumps(config), tmp_path, reference)


def test_webdataset_card(reference, tmp_path):
    data = make_wds(tmp_path / "shards", n_shards=2, per_shard=8, num_classes=3)
    make_wds(tmp_path / "shards", n_shards=1, per_shard=8, num_classes=3, split="validation", seed=1)
    out = tmp_path / "wds_icl"
    argv = [*SMALL, "--init-checkpoint", str(reference), "--num-classes", "3", "--dataset", str(data), "--streaming"]
    argv += ["--val-split", "validation", "--image-size", "28", "--output-dir", str(out)]
    assert train_icl.main(argv) == 0
    card, text, config = _card(out / "model")
    (result,) = {(r.dataset_type, r.dataset_name, r.dataset_split) for r in card.data.eval_results}
    assert result == ("webdataset", "shards (a local webdataset (tar shards), not on the Hub)", "validation")
    assert config["icl"]["dataset_source"] == "webdataset"
    _no_local_paths(text + json.dumps(config), tmp_path, reference)


def test_base_model_from_local_timm_weights(tmp_path):
    """timm's save_pretrained drops hf_hub_id but keeps architecture + tag: the Hub id is found again."""
    model = timm.create_model("resnet18.a1_in1k", pretrained=False, num_classes=10)
    assert hub_id_of_pretrained_cfg(model.pretrained_cfg) == "timm/resnet18.a1_in1k"
    timm.models.save_for_hf(model, tmp_path / "r18", safe_serialization=True)
    assert "hf_hub_id" not in json.loads((tmp_path / "r18" / "config.json").read_text())["pretrained_cfg"]
    origin, base, text = weights_origin(model, pretrained=False, init_checkpoint=tmp_path / "r18")
    assert (origin, base) == ("init-checkpoint", "timm/resnet18.a1_in1k") and "timm/resnet18.a1_in1k" in text
    assert weights_origin(model, pretrained=True, init_checkpoint=None)[1] == "timm/resnet18.a1_in1k"
    assert weights_origin(timm.create_model("vgg_tiny"), pretrained=False, init_checkpoint=None)[0] == "random"


def test_offline_pretrained_error_names_the_ways_out():
    with pytest.raises(ValueError) as e:
        create_model("resnet18", pretrained=True)
    message = str(e.value)
    assert "\n" not in message and "--no-pretrained" in message and "--init-checkpoint" in message
    assert "local-dir:" in message


def test_a_constraint_toward_random_weights_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        train_icl.parse_settings(["--no-pretrained", "--constraint", "icl"])
    assert "frozen random network" in str(e.value) and "--allow-random-reference" in str(e.value)
    assert train_icl.parse_settings(["--no-pretrained", "--allow-random-reference"]).constraint == "icl"
    assert train_icl.parse_settings(["--no-pretrained", "--constraint", "jsd"]).constraint == "jsd"
    assert train_icl.parse_settings(["--no-pretrained", "--init-checkpoint", "w.safetensors"]).constraint == "icl"


def test_num_classes_is_respected(tmp_path):
    data = make_image_folder(tmp_path / "pets")
    base = ["--model", "vgg_tiny", "--no-pretrained", "--constraint", "none", "--dataset", str(data)]
    base += ["--val-split", "none", "--batch-size", "8", "--num-workers", "0", "--image-size", "28", "--epochs", "1"]
    assert train_icl.main([*base, "--num-classes", "5", "--output-dir", str(tmp_path / "five")]) == 0
    assert "num_classes: 5" in (tmp_path / "five" / "config.yaml").read_text()
    assert json.loads((tmp_path / "five" / "model" / "config.json").read_text())["num_classes"] == 5
    with pytest.raises(SystemExit, match="--num-classes 2 but the dataset has 3 classes"):
        train_icl.main([*base, "--num-classes", "2", "--output-dir", str(tmp_path / "two")])
    with pytest.raises(SystemExit, match="--num-classes 0: training needs a classifier"):
        train_icl.parse_settings(["--num-classes", "0"])
