"""timm_icl.stream: shard-level streams whose saved position resumes at the next sample without decoding the rest."""

import io
import json
import multiprocessing
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_icl.stream import ShardedStream, ShardedStreamLoader, epoch_shard_order, rank_shards, sample_id


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
