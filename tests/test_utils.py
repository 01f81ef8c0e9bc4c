"""timm_icl.utils (bits, canonical JSON, atomic files, error lines) and the helpers each subsystem keeps once:
the Fashion-MNIST name test, a dataset's Hub id, the mean/std resolution."""

import json
import os

import numpy as np
import pytest
import torch

from timm_icl.data import hub_dataset_id, is_fashion_mnist, resolve_mean_std
from timm_icl.utils import files
from timm_icl.utils.bits import pack_bits, unpack_bits
from timm_icl.utils.errors import first_line
from timm_icl.utils.files import atomic_write_text, fsync, replace_folder, staging_folder
from timm_icl.utils.jsonio import canonical_json, json_safe


# ---------------------------------------------------------------------------------------------------------------------
# bits
# ---------------------------------------------------------------------------------------------------------------------
def test_pack_bits_values_match_numpy_and_round_trip():
    assert pack_bits(torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1, 1]])).tolist() == [[0b10110001, 0b10000000]]  # 177, 128
    g = torch.Generator().manual_seed(0)
    bits = torch.rand(4, 13, 1, 1, generator=g) > 0.5  # 13 units: padding inside the last byte
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 2)
    np.testing.assert_array_equal(packed.numpy(), np.packbits(bits.reshape(4, -1).numpy(), axis=1))
    assert torch.equal(unpack_bits(packed, (13, 1, 1)), bits)
    assert unpack_bits(torch.tensor([[177, 128]], dtype=torch.uint8), (9,)).int().tolist() == [
        [1, 0, 1, 1, 0, 0, 0, 1, 1]
    ]
    with pytest.raises(ValueError, match="hold 16 bits, the layer shape \\(17,\\) needs 17"):
        unpack_bits(packed, (17,))


# ---------------------------------------------------------------------------------------------------------------------
# canonical JSON
# ---------------------------------------------------------------------------------------------------------------------
def test_canonical_json_is_stable_and_safe():
    from timm_icl import parse_distortions

    a = {"b": (1, 2), "a": {"z": torch.tensor([0.5]), "y": np.float32(0.25)}, "d": parse_distortions("noise:20")}
    b = {"d": parse_distortions("noise:20"), "a": {"y": np.float32(0.25), "z": torch.tensor([0.5])}, "b": [1, 2]}
    assert canonical_json(a) == canonical_json(b)
    assert json.loads(canonical_json(a)) == {"a": {"y": 0.25, "z": [0.5]}, "b": [1, 2], "d": "noise:20"}
    assert canonical_json({"b": 1, "a": [2]}) == '{\n "a": [\n  2\n ],\n "b": 1\n}\n'


def test_canonical_json_float_digits_is_the_fingerprint_form():
    mean32 = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float32)  # 0.48500001430511475, ...
    typed = {"std": (0.229, 0.224, 0.225), "mean": (0.485, 0.456, 0.406), "input_size": (3, 28, 28)}
    read = {"input_size": [3, 28, 28], "mean": mean32, "std": torch.tensor([0.229, 0.224, 0.225])}
    text = '{"input_size": [3, 28, 28], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}'
    assert canonical_json(typed, indent=None, float_digits=7, end="") == text
    assert canonical_json(read, indent=None, float_digits=7, end="") == text  # float32 rounded back
    assert canonical_json(read, indent=None, end="") != text  # exact floats keep float32's digits
    assert json_safe({"x": 1 / 3, "n": None, "ok": True, 2: "two"}, float_digits=3) == {
        "x": 0.333,
        "n": None,
        "ok": True,
        "2": "two",
    }
    assert json_safe({"input_size": (3, 224, 224), "crop_pct": 0.875}) == {
        "input_size": [3, 224, 224],
        "crop_pct": 0.875,
    }


# ---------------------------------------------------------------------------------------------------------------------
# atomic files and folders
# ---------------------------------------------------------------------------------------------------------------------
def test_atomic_write_text_replaces_and_leaves_nothing(tmp_path):
    path = tmp_path / "marker.json"
    assert atomic_write_text(path, "one") == path and path.read_text() == "one"
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["marker.json"]
    fsync(path)
    fsync(tmp_path)  # a folder: its entries


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_folder_puts_the_new_folder_in_place(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    final = tmp_path / "model"
    staged = staging_folder(final)
    assert staged == tmp_path / f".model.tmp-{os.getpid()}" and staged.is_dir()
    (staged / "a.txt").write_text("new")
    (staged / "sub").mkdir()
    (staged / "sub" / "b.txt").write_text("deep")
    replace_folder(staged, final)  # final did not exist
    assert (final / "a.txt").read_text() == "new" and (final / "sub" / "b.txt").read_text() == "deep"
    staged = staging_folder(final)
    (staged / "a.txt").write_text("newer")
    replace_folder(staged, final)  # final existed: swapped out, then removed
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"] and (final / "a.txt").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or previous folder left


def test_staging_folder_clears_leftovers_and_refuses_a_file(tmp_path):
    for name in (".model.tmp-1", ".model.old-2", ".other.tmp-3"):
        (tmp_path / name).mkdir()
    staged = staging_folder(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".other.tmp-3", staged.name])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot write the folder .*file: it is a file, not a folder"):
        staging_folder(tmp_path / "file")


# ---------------------------------------------------------------------------------------------------------------------
# error lines
# ---------------------------------------------------------------------------------------------------------------------
def test_first_line():
    assert first_line(ValueError("  bad value\n  Traceback ...\nmore")) == "bad value"
    assert first_line(OSError("disk full\n"), with_type=True) == "OSError: disk full"
    assert first_line(KeyError()) == "KeyError" and first_line(RuntimeError(""), with_type=True) == "RuntimeError"
    assert first_line(ValueError("\n\nafter blank lines\nnext")) == "after blank lines"


# ---------------------------------------------------------------------------------------------------------------------
# data: Fashion-MNIST names, Hub ids, mean/std
# ---------------------------------------------------------------------------------------------------------------------
def test_fashion_mnist_names_and_hub_ids(tmp_path):
    assert all(is_fashion_mnist(s) for s in ("fashion-mnist", "fashion_mnist", "FashionMNIST", "Fashion-MNIST"))
    assert not any(is_fashion_mnist(s) for s in ("mnist", "zalando-datasets/fashion_mnist", "", None))
    assert hub_dataset_id("Fashion_MNIST") == "zalando-datasets/fashion_mnist"
    assert hub_dataset_id("ILSVRC/imagenet-1k") == "ILSVRC/imagenet-1k"
    assert hub_dataset_id(str(tmp_path)) is None and hub_dataset_id("./data/x") is None
    assert hub_dataset_id("not an id") is None and hub_dataset_id(None) is None


def test_resolve_mean_std_arguments_then_pretrained_cfg_else_error():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no pretrained_cfg mean/std .*pass mean=... and std=..."):
        resolve_mean_std(model)
    assert resolve_mean_std(model, [0.5] * 3, (0.25, 0.25, 0.25)) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model.pretrained_cfg = {"mean": (0.1, 0.2, 0.3), "std": [1, 2, 3]}
    assert resolve_mean_std(model) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    assert resolve_mean_std(model, std=(4, 5, 6)) == ((0.1, 0.2, 0.3), (4.0, 5.0, 6.0))
    model.pretrained_cfg = {"mean": (0.1, 0.2, 0.3)}
    with pytest.raises(ValueError, match="no pretrained_cfg mean/std"):
        resolve_mean_std(model)
