"""The recipe's output piped to a file: timm-style log lines instead of progress-bar redraws; metrics.jsonl records
carry a timestamp, and validation records top-5 per condition."""

import json
import sys
import time
from pathlib import Path

from test_cards import make_image_folder

import timm_icl  # noqa: F401  (registers vgg_tiny)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import train_icl  # noqa: E402


def test_piped_output_has_log_lines_timestamps_and_top5(tmp_path, capsys):
    data = make_image_folder(tmp_path / "pets")  # 18 images, -b 6: 3 steps per epoch
    argv = ["--model", "vgg_tiny", "--no-pretrained", "--constraint", "none", str(data), "--val-split", "train",
            "-b", "6", "-j", "0", "--img-size", "24", "--epochs", "2", "--log-every", "1", "--distortions", "noise:30",
            "--output-dir", str(tmp_path / "r")]  # fmt: skip
    start = time.time()
    assert train_icl.main(argv) == 0  # under pytest stderr is not a terminal: the piped case
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("Train: ")]
    assert len(lines) == 6 and lines[0].startswith("Train: 0 [1/3 ( 33%)]  step 1  loss ")
    assert lines[-1].startswith("Train: 1 [3/3 (100%)]  step 6  loss ") and lines[-1].endswith("img/s")
    assert "\r" not in out + err and "epoch 0:" not in err  # no progress-bar redraws (ours or datasets')
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records]
    assert times == sorted(times) and start <= times[0] and times[-1] <= time.time()
    val = [r for r in records if r["kind"] == "val"][-1]
    assert 0 <= val["val/clean"] <= val["val/clean_top5"] <= 1 and "val/noise30_top5" in val
    assert train_icl.progress_line(0, 7, None, 1.0, 0.9, 0.1, 1e-3, 5.0).startswith("Train: 0 step 7  loss 1.0000")
