"""Cached reference targets: same loss as the live reference, stale caches refused (bit packing itself:
tests/test_utils.py)."""

import pytest
import timm
import torch

import timm_icl  # noqa: F401  (registers vgg_tiny)
from timm_icl.target_cache import DamagedCacheError, StaleCacheError, TargetCache
from timm_icl.task import ICLTask

PRE = {"image_size": 28, "crop": "none"}


def _task(seed=0, **kw):
    torch.manual_seed(seed)
    model = timm.create_model("vgg_tiny", num_classes=10)
    return ICLTask(model, constraint=kw.pop("constraint", "icl"), seed=0, **kw)


def _data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _batches(images, ids, bs=5):
    for s in range(0, len(ids), bs):
        yield ids[s : s + bs], images[s : s + bs]


def test_cached_and_live_give_same_loss():
    images, labels = _data()
    ids = list(range(100, 112))
    task = _task()
    cache = TargetCache.build(task, _batches(images, ids), preprocessing=PRE)
    assert len(cache) == 12 and cache.nbytes_per_image == sum((256 + 7) // 8 for _ in task.layers)

    sel = [3, 7, 0, 11]
    batch, target = images[sel], labels[sel]
    task.sampler(batch[:1])  # creates the sampler's generator, so that its state can be saved and restored
    state = task.sampler.state_dict()
    torch.manual_seed(3)  # dropout: the same masks in both runs
    live = task(batch, target)
    task.sampler.load_state_dict(state)  # the same distortions for the cached run
    torch.manual_seed(3)
    cached = task(batch, target, reference_targets=cache.lookup([ids[i] for i in sel]))
    assert abs(live["loss"].item() - cached["loss"].item()) <= 1e-6
    assert float(live["constraint_loss"]) > 0
    assert cache.verify(task, [ids[i] for i in sel], batch) == 0.0


def test_save_load_roundtrip_and_string_ids(tmp_path):
    images, _ = _data(6)
    task = _task()
    ids = [f"img_{i:03d}.JPEG" for i in range(6)]
    cache = TargetCache.build(task, _batches(images, ids, 4), preprocessing=PRE)
    loaded = TargetCache.load(cache.save(tmp_path / "t.safetensors"), task=task, preprocessing=PRE)
    assert loaded.ids == ids
    for layer in task.layers:
        assert torch.equal(loaded.lookup(ids[2:5])[layer], cache.lookup(ids[2:5])[layer])
        assert torch.equal(loaded.lookup(ids[2:5])[layer], task.reference_targets(images[2:5])[layer])

    int_ids = torch.arange(6)
    cache2 = TargetCache.build(task, [(int_ids, images)], preprocessing=PRE)
    assert TargetCache.load(cache2.save(tmp_path / "i.safetensors")).ids == list(range(6))


def test_stale_cache_is_refused(tmp_path):
    images, labels = _data(6)
    task = _task()
    path = TargetCache.build(task, [(list(range(6)), images)], preprocessing=PRE).save(tmp_path / "t.safetensors")

    with pytest.raises(StaleCacheError, match="preprocessing"):
        TargetCache.load(path, task=task, preprocessing={**PRE, "image_size": 32})
    with pytest.raises(StaleCacheError, match="weights"):
        TargetCache.load(path, task=_task(seed=5), preprocessing=PRE)
    with pytest.raises(StaleCacheError, match="layers"):
        TargetCache.load(path, task=_task(layers=["pre_logits.fc1"]), preprocessing=PRE)
    with pytest.raises(StaleCacheError, match="preprocessing"):
        TargetCache.load(path, task=_task(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), preprocessing=PRE)

    # a cache whose bits do not match the pixels (e.g. a random crop slipped in) fails verification
    cache = TargetCache.load(path, task=task, preprocessing=PRE)
    with pytest.raises(StaleCacheError, match="disagrees"):
        cache.verify(task, [0, 1, 2], 1 - images[:3])


def test_clear_errors():
    images, _ = _data(4)
    with pytest.raises(ValueError, match="float pre-activations"):
        TargetCache.build(_task(constraint="mse"), [([0, 1, 2, 3], images)])
    cache = TargetCache.build(_task(), [([0, 1, 2, 3], images)])
    with pytest.raises(KeyError, match="not in the target cache"):
        cache.lookup([9])
    with pytest.raises(ValueError, match="unique"):
        TargetCache.build(_task(), [([0, 0, 1, 2], images)])
    with pytest.raises(FileNotFoundError):
        TargetCache.load("/nonexistent/t.safetensors")


def test_released_reference_trains_from_cache():
    images, labels = _data(4)
    task = _task()
    cache = TargetCache.build(task, [([0, 1, 2, 3], images)], preprocessing=PRE)
    task.release_reference()
    assert task.reference is None
    out = task(images, labels, reference_targets=cache.lookup([0, 1, 2, 3]))
    out["loss"].backward()
    assert float(out["constraint_loss"]) > 0
    with pytest.raises(RuntimeError, match="released"):
        task(images, labels)


def test_channels_last_reference_gives_the_same_targets():
    images, _ = _data(4)
    a = _task().reference_targets(images)
    b = _task(reference_channels_last=True).reference_targets(images)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_uint8_loader_batches_build_the_same_cache():
    """Loaders yield uint8: the cache built from them equals the one built from the same images as float / 255."""
    task = _task()
    images8 = torch.randint(0, 256, (7, 3, 28, 28), dtype=torch.uint8)
    ids = list(range(7))
    from8 = TargetCache.build(task, _batches(images8, ids), preprocessing=PRE)
    from_float = TargetCache.build(task, _batches(images8.float() / 255, ids), preprocessing=PRE)
    for layer in task.layers:
        assert torch.equal(from8.packed[layer], from_float.packed[layer])
    assert from8.verify(task, ids[:4], images8[:4]) == 0.0


def _tamper_rows(path, first_kept: bool):
    """Flip every bit of every row of each layer's targets, except the first row when ``first_kept`` (the issue's
    attack: the one batch the live check looked at stays right), and re-save without updating the hash."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for name in [k for k in tensors if k.startswith("targets.")]:
        start = 1 if first_kept else 0
        tensors[name][start:] = 255 - tensors[name][start:]
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("damage", ["rows-but-the-first", "64-bytes", "truncated", "random-bytes", "no-hash"])
def test_a_damaged_cache_is_refused_in_one_line(tmp_path, damage):
    images, _ = _data(12)
    task = _task()
    path = TargetCache.build(task, [(list(range(12)), images)], preprocessing=PRE).save(tmp_path / "t.safetensors")
    TargetCache.load(path, task=task, preprocessing=PRE)  # whole: loads
    data = bytearray(path.read_bytes())
    if damage == "rows-but-the-first":
        _tamper_rows(path, first_kept=True)
        expected = "is damaged: its content does not match the SHA-256 it was written with; delete it to rebuild it"
    elif damage == "64-bytes":  # 64 bytes flipped at the end of the tensor data: still a valid file
        for i in range(len(data) - 64, len(data)):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        expected = "is damaged: its content does not match the SHA-256"
    elif damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
        expected = "does not load (SafetensorError"
    elif damage == "random-bytes":
        path.write_bytes(
            torch.randint(0, 256, (len(data),), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            .numpy()
            .tobytes()
        )
        expected = "does not load (SafetensorError"
    else:  # a cache of an older timm-icl: no hash to check it against
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        meta.pop("content_sha256")
        save_file(tensors, str(path), metadata=meta)
        expected = "carries no content hash (written by an older timm-icl): delete it to rebuild it"
    with pytest.raises(DamagedCacheError) as info:
        TargetCache.load(path, task=task, preprocessing=PRE)
    message = str(info.value)
    assert message.startswith(f"target cache {path}") and expected in message and "\n" not in message, message


def test_the_live_check_compares_batches_spread_over_the_whole_file(tmp_path):
    """A cache whose content hash is consistent but whose last rows are wrong (other weights, a bug): the old check
    compared the first batch only and passed; the spread check meets the tampered rows and refuses in one line."""
    from accelerate import Accelerator
    from test_stream import make_wds

    from timm_icl.data import create_loader, resolve_preprocessing
    from timm_icl.train.cache_build import build_target_cache, cache_preprocessing, verify_target_cache

    wds = make_wds(tmp_path / "wds", n_shards=4, per_shard=6, size=40)
    task = ICLTask(timm.create_model("vgg_tiny", num_classes=3), distortions="noise:30 blur:1", seed=0)
    config = resolve_preprocessing(task.get_eval_model(), image_size=32)

    def loader():
        made, _ = create_loader(
            str(wds), "train", batch_size=4, streaming=True, data_config=config, shuffle=False, num_workers=0
        )
        return made

    pre = cache_preprocessing(config, str(wds), "train", None)
    path = tmp_path / "targets.safetensors"
    build_target_cache(task, loader(), path, pre, accelerator=Accelerator(cpu=True), say=lambda m: None)
    cache = TargetCache.load(path, task=task, preprocessing=pre)
    assert verify_target_cache(task, cache, loader()) == (0.0, 4)  # 4 batches: the file's first row ... its last

    first = next(iter(loader()))
    assert cache.verify(task, first.ids, first[0]) == 0.0  # the first batch alone cannot see what follows
    for layer in cache.layers:
        cache.packed[layer][-6:] = 255 - cache.packed[layer][-6:]  # the last shard's rows: every bit flipped
    assert cache.verify(task, first.ids, first[0]) == 0.0
    with pytest.raises(StaleCacheError) as info:
        verify_target_cache(task, cache, loader())
    message = str(info.value)
    assert message.startswith("target cache disagrees with the live reference on ") and "\n" not in message
    assert message.endswith("of the bits of 4 batches spread over it; delete it to rebuild it"), message
