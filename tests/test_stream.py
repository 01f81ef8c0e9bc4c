"""timm_icl.data.stream: shard streams whose saved position resumes at the next sample without decoding the rest."""

import io
import json
import multiprocessing
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from timm_icl.data.stream import ShardedStream, ShardedStreamLoader, epoch_shard_order, rank_shards, sample_id


def make_wds(root: Path, *, n_shards: int = 4, per_shard: int = 12, split: str = "train", size: int = 12,
             num_classes: int = 3, seed: int = 0) -> Path:  # fmt: skip
    """A local webdataset in the layout of ``timm/imagenet-1k-wds``: ``<root>/<split>/imagenet1k-<split>-NNNN.tar``
    holding ``<key>.jpg``, ``<key>.cls`` (the label as text) and ``<key>.json`` per sample. Returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / split
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_shards):
        with tarfile.open(folder / f"imagenet1k-{split}-{s:04d}.tar", "w") as tar:
            for _ in range(per_shard):
                key, label = f"{split}_{k:06d}", int(rng.integers(num_classes))
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
                meta = json.dumps({"label": label, "filename": f"{key}.JPEG"}).encode()
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(label).encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
    return Path(root)


@pytest.fixture(scope="module")
def wds(tmp_path_factory) -> Path:
    return make_wds(tmp_path_factory.mktemp("wds"), n_shards=4, per_shard=12)


def open_source(root: Path):
    import datasets
    from datasets import Image as ImageFeature

    ds = datasets.load_dataset(str(root), split="train", streaming=True)
    return ds.select_columns(["jpg", "cls"]).cast_column("jpg", ImageFeature(decode=False))


class CountingDecoder:
    """Decodes the JPEG and counts decodes in shared memory (DataLoader workers are forked)."""

    def __init__(self):
        self.count = multiprocessing.Value("i", 0)

    def __call__(self, row, index):
        with self.count.get_lock():
            self.count.value += 1
        image = np.asarray(Image.open(io.BytesIO(row["jpg"]["bytes"])).convert("RGB"))
        return torch.from_numpy(image.copy()).permute(2, 0, 1), int(row["cls"])


def collate(samples):
    good = [s for s in samples if s is not None]
    return torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good]), len(samples) - len(good)


def make_loader(source, *, rank=0, world=1, workers=0, batch=5, window=7, shuffle=True, decoder=None):
    stream = ShardedStream(source, decoder or CountingDecoder(), collate, batch, rank=rank, world_size=world,
                           num_streams=max(1, workers), shuffle=shuffle, seed=3, window=window)  # fmt: skip
    return ShardedStreamLoader(stream, num_workers=workers)


def epoch_ids(loader, epoch, limit=None):
    loader.set_epoch(epoch)
    out = []
    for i, batch in enumerate(loader):
        out.append(batch.ids.tolist())
        if limit is not None and i + 1 == limit:
            break
    return out


def test_shard_order_and_rank_split():
    orders = [epoch_shard_order(8, e, seed=0, shuffle=True) for e in range(3)]
    assert all(sorted(o) == list(range(8)) for o in orders) and orders[0] != orders[1]
    assert orders[0] == epoch_shard_order(8, 0, seed=0, shuffle=True)  # the same on every rank
    assert rank_shards([5, 2, 7, 1], rank=1, world_size=2) == ([2, 1], 1, 0)  # whole shards
    assert rank_shards([1, 0], rank=2, world_size=3) == ([1, 0], 3, 2)  # too few shards: every 3rd sample
    assert sample_id(3, 7) == 3 * 2**32 + 7


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_at_the_next_sample_without_decoding_the_rest(wds, world, workers):
    source = open_source(wds)
    for rank in range(world):
        full = make_loader(source, rank=rank, world=world, workers=workers)
        reference = [epoch_ids(full, 0), epoch_ids(full, 1)]
        assert len({i for b in reference[0] for i in b}) == 48 // world  # each of the rank's samples once

        # epoch 1 interrupted after 3 batches (the position taken after 2: the loop pulls one ahead)
        first = make_loader(source, rank=rank, world=world, workers=workers)
        seen = epoch_ids(first, 1, limit=3)[:2]
        state = first.state_dict(batches=2)
        decoder = CountingDecoder()
        resumed = make_loader(source, rank=rank, world=world, workers=workers, decoder=decoder)
        resumed.load_state_dict(state)
        rest = epoch_ids(resumed, 1)
        assert seen + rest == reference[1]
        remaining = sum(len(b) for b in rest)
        assert decoder.count.value == remaining == 48 // world - 10  # none of the 10 trained samples decoded again
        assert resumed.num_decoded == remaining
        assert epoch_ids(resumed, 2) == epoch_ids(make_loader(source, rank=rank, world=world, workers=workers), 2)


def test_every_sample_once_per_epoch_across_ranks_and_fewer_shards_than_ranks(wds, tmp_path, caplog):
    source = open_source(wds)
    per_rank = [{i for b in epoch_ids(make_loader(source, rank=r, world=2), 0) for i in b} for r in range(2)]
    assert per_rank[0].isdisjoint(per_rank[1]) and len(per_rank[0] | per_rank[1]) == 48
    assert len({i >> 32 for i in per_rank[0]}) == 2  # whole shards: two of the four
    few = open_source(make_wds(tmp_path / "few", n_shards=2, per_shard=7))
    with caplog.at_level("WARNING"):
        loaders = [make_loader(few, rank=r, world=3) for r in range(3)]
    assert "every process reads all shards" in caplog.text
    seen = [i for r in range(3) for b in epoch_ids(loaders[r], 0) for i in b]
    assert sorted(seen) == sorted(sample_id(s, o) for s in range(2) for o in range(7))


def test_a_position_from_another_setup_is_refused(wds):
    source = open_source(wds)
    loader = make_loader(source, workers=0)
    epoch_ids(loader, 0, limit=2)
    with pytest.raises(ValueError, match="num_streams 1 -> 2"):
        make_loader(source, workers=2).load_state_dict(loader.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# the recipe on a streamed wds: kill -9 mid-epoch, resume, the same samples and the same weights
# ---------------------------------------------------------------------------------------------------------------------
def _recipe_cmd(world: int) -> list[str]:
    import socket
    import sys

    script = Path(__file__).resolve().parent / "recipe_with_hooks.py"  # the recipe + --log-labels/--stop-after-steps
    if world == 1:
        return [sys.executable, str(script)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(world),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
            str(script)]  # fmt: skip


def _env() -> dict:
    import os

    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def _max_step(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


@pytest.mark.parametrize("world", [1, 2])
def test_recipe_killed_mid_epoch_resumes_the_stream_exactly(tmp_path, world):
    import time

    # label = sample index (48 classes): the label sequence is the sample sequence
    data = make_wds(tmp_path / "wds", n_shards=4, per_shard=12, num_classes=48, seed=1)
    for s in range(4):  # relabel: cls = the sample's index
        _relabel(data / "train" / f"imagenet1k-train-{s:04d}.tar", start=12 * s)
    batch = 4 if world == 1 else 2  # 12 steps per epoch either way
    args = ["--model", "vgg_tiny", "--no-pretrained", "--num-classes", "48", "--dataset", str(data), "--streaming",
            "--allow-random-reference",
            "--val-split", "none", "--batch-size", str(batch), "--lr", "0.05", "--distortions", "noise:30,90 blur:1,2",
            "--num-workers", "0", "--log-every", "1", "--epochs", "2", "--image-size", "32", "--sched", "constant",
            "--checkpoint-every-epochs", "0", "--checkpoint-every-steps", "14", "--log-labels"]  # fmt: skip
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = subprocess.run([*_recipe_cmd(world), *args, "--output-dir", str(full)], env=_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the same run, killed with SIGKILL after step 15 (checkpoint at step 14 = epoch 1, batch 2; the next is never)
    p = subprocess.Popen([*_recipe_cmd(world), *args, "--output-dir", str(killed)], env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while _max_step(killed / "metrics.jsonl") < 15 and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    _kill_tree(p.pid)  # the launcher and its workers (torch's launcher puts them in their own sessions)
    p.wait()
    assert not (killed / "model").exists(), "the run ended before it was killed"
    proc = subprocess.run([*_recipe_cmd(world), *args, "--output-dir", str(killed), "--resume", "latest"],
                          env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping" not in proc.stdout + proc.stderr  # no batches re-read to get there
    assert f"global_batch_size: {batch * world}" in (killed / "config.yaml").read_text()

    labels = {}
    for rank in range(world):
        ref = [json.loads(x)["labels"] for x in (full / f"labels_rank{rank}.jsonl").read_text().splitlines()]
        got = [json.loads(x)["labels"] for x in (killed / f"labels_rank{rank}.jsonl").read_text().splitlines()]
        # the killed process wrote epoch 0; the resumed one epoch 1 from its 3rd batch on
        assert got == [ref[0], ref[1][2 * batch :]] and len(ref[1]) == 12 * batch
        labels[rank] = ref
    for epoch in (0, 1):  # every sample once per epoch across the ranks, in another order each epoch
        assert sorted(x for r in range(world) for x in labels[r][epoch]) == list(range(48))
    assert labels[0][0] != labels[0][1]
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def _relabel(tar_path: Path, start: int) -> None:
    members = []
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    keys = sorted({name.rsplit(".", 1)[0] for name, _ in members})
    label = {k: start + i for i, k in enumerate(keys)}
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            key, ext = name.rsplit(".", 1)
            if ext == "cls":
                data = str(label[key]).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _kill_tree(pid: int) -> None:
    """SIGSTOP ``pid`` and all its descendants (found in /proc), then SIGKILL them: nothing runs on in between."""
    import os
    import signal

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for proc in tree:
            try:
                os.kill(proc, sig)
            except ProcessLookupError:
                pass


def test_recipe_resumed_after_one_ranks_last_shard_gives_the_same_weights(tmp_path):
    """3 shards over 2 processes: rank 1 runs out after 3 batches and replays with weight 0 while rank 0 trains on.
    Stopped at step 5 (rank 1 out of data) and resumed, rank 1 has no batch of its own to replay: a stand-in of the
    same size keeps the collectives and the random draws in step."""
    data = make_wds(tmp_path / "wds", n_shards=3, per_shard=12, num_classes=3)
    args = ["--model", "vgg_tiny", "--no-pretrained", "--num-classes", "3", "--dataset", str(data), "--streaming",
            "--allow-random-reference",
            "--val-split", "none", "--batch-size", "4", "--num-workers", "0", "--image-size", "32", "--epochs", "2",
            "--log-every", "1", "--distortions", "noise:30,90 blur:1,2"]  # fmt: skip
    for out, extra in (("full", []), ("stopped", ["--stop-after-steps", "5"]), ("stopped", ["--resume", "latest"])):
        proc = subprocess.run([*_recipe_cmd(2), *args, "--output-dir", str(tmp_path / out), *extra], env=_env(),
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "model" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
