"""Trackers of the recipe (``--log-with tensorboard|wandb``, ``--log-wandb``) with the real packages: the run trains,
the tracker holds the same numbers as metrics.jsonl and a flat config of scalars."""

import json
import sys
from pathlib import Path

import pytest

import timm_icl  # noqa: F401  (registers vgg_tiny)
from timm_icl.train.tracking import flat_config, parse_trackers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import train_icl  # noqa: E402

TINY = [
    "--model", "vgg_tiny", "--no-pretrained", "--constraint", "none", "--dataset", "fashion-mnist",
    "--val-split", "test", "--max-train-samples", "32", "--max-val-samples", "16", "--batch-size", "8",
    "--num-workers", "0", "--distortions", "noise:30 blur:1", "--log-every", "2", "--epochs", "1",
]  # fmt: skip


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_flat_config_is_scalars_only():
    config = {"a": 1, "b": None, "data_config": {"input_size": (3, 28, 28), "mean": [0.5]}, "p": Path("x"), "f": True}
    assert flat_config(config) == {"a": 1, "data_config.input_size": "3,28,28", "data_config.mean": "0.5", "p": "x",
                                   "f": True}  # fmt: skip


def test_unknown_or_missing_tracker_is_one_line(monkeypatch):
    with pytest.raises(ValueError, match="unknown tracker"):
        parse_trackers("tensorbord")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ValueError, match="pip install mlflow"):
        parse_trackers("mlflow")
    assert parse_trackers(None, log_wandb=True) == ["wandb"]
    assert train_icl.parse_settings(["--log-wandb", "--log-with", "tensorboard"]).log_with == "tensorboard,wandb"


def test_tensorboard_logs_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    assert train_icl.main([*TINY, "--log-with", "tensorboard", "--output-dir", str(run)]) == 0
    folders = [p.parent for p in (run / "logs").rglob("events.out.tfevents.*")]
    scalars = {}
    for folder in folders:
        acc = EventAccumulator(str(folder)).Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    train = [r for r in _records(run) if r["kind"] == "train"]
    assert [s for s, _ in scalars["loss"]] == [r["step"] for r in train]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    val = [r for r in _records(run) if r["kind"] == "val"][-1]
    assert scalars["val/clean"][-1][1] == pytest.approx(val["val/clean"], rel=1e-6)
    hparams = list((run / "logs").rglob("hparams.yml"))  # the flat config accelerate stored beside the events
    assert hparams and "data_config.input_size: 3,28,28" in hparams[0].read_text()


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's ``.wandb`` file (LevelDB log framing: a 7-byte file header, then
    records of [crc32, length, type] + payload in 32 KiB blocks; types 1 full, 2 first, 3 middle, 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, buf = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_offline_logs_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "wb"
    assert train_icl.main([*TINY, "--log-wandb", "--output-dir", str(run)]) == 0
    files = list((run / "wandb").glob("offline-run-*/*.wandb"))
    assert len(files) == 1
    records = _wandb_records(files[0])
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    config = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    train = [r for r in _records(run) if r["kind"] == "train"]
    assert [h["_step"] for h in history if "loss" in h] == [r["step"] for r in train]
    assert [h["loss"] for h in history if "loss" in h] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    val = [r for r in _records(run) if r["kind"] == "val"][-1]
    assert history[-1]["val/clean"] == pytest.approx(val["val/clean"])
    assert config["data_config.input_size"] == "3,28,28" and config["model"] == "vgg_tiny"
