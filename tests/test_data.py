"""timm_icl.data: sources, RGB conversion, skipped images, exactly-once sharding, resume position."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from timm_icl.data import ShardedBatchSampler, create_dataset, create_loader, decode_image
from timm_icl.data import fashion_mnist as _fashion_mnist

HAS_FMNIST = _fashion_mnist.local_files_available("test")


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def make_parquet(folder, n=10, size=12, bad=(), grey=(), num_classes=None, seed=0):
    """A local parquet dataset: image i has constant value 10*i (channel 0), label i (or i % num_classes)."""
    import datasets

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        if i in bad:
            images.append({"bytes": b"this is not an image", "path": f"bad{i}.png"})
        elif i in grey:
            images.append({"bytes": _png(np.full((size, size), 10 * i, np.uint8), "L"), "path": None})
        else:
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            arr[..., 0] = 10 * i
            images.append({"bytes": _png(arr), "path": None})
        labels.append(i if num_classes is None else i % num_classes)
    names = [f"c{i}" for i in range(num_classes or n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def test_decode_modes_to_rgb():
    grey = decode_image(_png(np.full((5, 7), 51, np.uint8), "L"))
    assert grey.dtype == torch.uint8 and grey.shape == (3, 5, 7) and torch.equal(grey, torch.full_like(grey, 51))
    rgba = decode_image(_png(np.zeros((4, 4, 4), np.uint8) + np.array([255, 0, 0, 0], np.uint8), "RGBA"))
    assert rgba.shape == (3, 4, 4) and rgba[0].min() == 255 and rgba[1].max() == 0
    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    rgb = decode_image(palette)
    assert rgb.shape == (3, 3, 3) and rgb[1].min() == 255 and rgb[0].max() == 0


def test_sixteen_bit_png_keeps_its_values():
    values = np.array([[0, 257, 4096], [32768, 65535, 1000]], np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")  # a 16-bit greyscale PNG (PIL mode I;16)
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    image = decode_image(buf.getvalue())
    expected = torch.tensor([[0, 1, 16], [128, 255, 4]], dtype=torch.uint8)  # round(v / 257)
    assert image.shape == (3, 2, 3) and torch.equal(image[0], expected) and torch.equal(image[2], expected)


def test_thin_strip_and_bad_files_skipped_and_counted(tmp_path):
    import datasets

    strip = io.BytesIO()
    Image.fromarray(np.full((1, 20000, 3), 9, np.uint8)).save(strip, format="PNG")  # 1 x 20000 px
    ok = _png(np.full((10, 10, 3), 7, np.uint8))
    cells = [{"bytes": ok, "path": None}, {"bytes": strip.getvalue(), "path": "strip.png"}, {"bytes": ok, "path": None}]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": cells, "label": [0, 1, 1]}, features=features)
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    loader, _ = create_loader(str(tmp_path), "train", image_size=224, batch_size=3)
    (images, labels), *rest = list(loader)
    assert not rest and labels.tolist() == [0, 1] and images.shape == (2, 3, 224, 224) and loader.num_skipped == 1
    assert images.dtype == torch.uint8 and int(images.max()) == 7


def test_parquet_greyscale_and_undecodable(tmp_path):
    folder = make_parquet(tmp_path, n=6, bad={2}, grey={3})
    loader, info = create_loader(str(folder), "train", image_size=8, batch_size=4)
    assert info["num_classes"] == 6 and info["num_samples"] == 6 and info["image_column"] == "image"
    batches = list(loader)
    labels = torch.cat([b[1] for b in batches]).tolist()
    assert labels == [0, 1, 3, 4, 5]  # the bad one skipped, the rest in order
    images = torch.cat([b[0] for b in batches])
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.uint8  # uint8 until the device
    grey = images[2]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], torch.full_like(grey[0], 30))
    assert loader.num_skipped == 1


def test_parquet_workers_decode_and_count(tmp_path):
    folder = make_parquet(tmp_path, n=8, bad={1, 6})
    loader, _ = create_loader(str(folder), "train", image_size=8, batch_size=3, num_workers=2)
    labels = sorted(torch.cat([b[1] for b in loader]).tolist())
    assert labels == [0, 2, 3, 4, 5, 7] and loader.num_skipped == 2


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_once_across_two_ranks(tmp_path, streaming, shuffle):
    folder = make_parquet(tmp_path, n=11)
    seen = []
    lengths = []
    for rank in range(2):
        loader, info = create_loader(
            str(folder),
            "train",
            image_size=8,
            batch_size=2,
            rank=rank,
            world_size=2,
            streaming=streaming,
            shuffle=shuffle,
            seed=3,
        )
        labels = torch.cat([b[1] for b in loader]).tolist()
        seen += labels
        lengths.append(len(labels))
    assert sorted(seen) == list(range(11))
    assert sorted(lengths) == [5, 6]


def test_sampler_epochs_and_skip():
    sampler = ShardedBatchSampler(10, 3, shuffle=True, seed=1)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(sum(epoch0, [])) == list(range(10)) and epoch0 != epoch1
    sampler.set_epoch(0)
    sampler.skip_batches(2)
    assert list(sampler) == epoch0[2:]
    assert list(sampler) == epoch0  # skipping applies to one iteration only
    assert len(ShardedBatchSampler(10, 3, world_size=2, rank=1, drop_last=True)) == 1


def test_sampler_subset_per_epoch():
    subsets = []
    for epoch in range(2):
        shards = []
        for rank in range(2):
            sampler = ShardedBatchSampler(20, 2, rank=rank, world_size=2, shuffle=True, seed=5, samples_per_epoch=7)
            sampler.set_epoch(epoch)
            shards.append(sum(list(sampler), []))
        assert sorted(map(len, shards)) == [3, 4] and not set(shards[0]) & set(shards[1])
        subsets.append(set(shards[0]) | set(shards[1]))
    assert len(subsets[0]) == 7 and subsets[0] != subsets[1]  # a fresh random subset each epoch


def test_imagefolder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((9, 9), 40 * i, np.uint8), "L").save(tmp_path / cls / f"{i}.png")
    loader, info = create_loader(str(tmp_path), "train", image_size=(6, 6), batch_size=8)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 6, 6) and sorted(labels.tolist()) == [0, 0, 1, 1]
    assert info["class_names"] == ["cat", "dog"]


def test_clear_errors(tmp_path):
    folder = make_parquet(tmp_path, n=3)
    with pytest.raises(ValueError, match="no label column 'nope'"):
        create_dataset(str(folder), "train", label_column="nope")
    with pytest.raises(ValueError, match="no-such-user/no-such-dataset"):
        create_dataset("no-such-user/no-such-dataset", "train")


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST IDX files not installed")
def test_fashion_mnist_local():
    loader, info = create_loader("fashion-mnist", "test", image_size=28, batch_size=16, max_samples=40)
    assert info["num_classes"] == 10 and info["num_samples"] == 40 and info["class_names"][0] == "T-shirt/top"
    images, labels = next(iter(loader))
    assert images.shape == (16, 3, 28, 28) and images.dtype == torch.uint8 and torch.equal(images[:, 0], images[:, 2])
    raw, _ = _fashion_mnist.load_fashion_mnist("test")
    assert torch.equal(images[:, 0], torch.from_numpy(raw[:16].copy()))  # 28 px at crop 1.0: the stored pixels
    images32, _ = next(iter(create_loader("fashion-mnist", "test", image_size=32, batch_size=2)[0]))
    assert images32.shape == (2, 3, 32, 32) and images32.dtype == torch.uint8
    seen = []
    for rank in range(2):
        loader, _ = create_loader(
            "fashion-mnist",
            "train",
            image_size=28,
            batch_size=7,
            rank=rank,
            world_size=2,
            max_samples=30,
            streaming=True,
        )
        seen += [int(x) for b in loader for x in b[0][:, 0].long().sum(dim=(1, 2))]
    full = [
        int(x)
        for b in create_loader("fashion-mnist", "train", image_size=28, batch_size=30, max_samples=30)[0]
        for x in b[0][:, 0].long().sum(dim=(1, 2))
    ]
    assert sorted(seen) == sorted(full)


def test_a_streamed_dataset_iterates_by_itself(tmp_path):
    """``create_dataset(..., streaming=True)`` is a torch IterableDataset of decoded samples in the source's order
    (``create_loader`` reads it through timm_icl.data.stream instead); an unusable image comes out as None."""
    folder = make_parquet(tmp_path, n=5, size=8, bad=(3,))
    dataset, info = create_dataset(str(folder), "train", image_size=8, streaming=True)
    assert isinstance(dataset, torch.utils.data.IterableDataset) and info["streaming"] and info["num_classes"] == 5
    samples = list(dataset)
    assert samples[3] is None
    assert [label for _, label in (s for s in samples if s is not None)] == [0, 1, 2, 4]
    for i, sample in enumerate(samples):
        if sample is not None:
            image, _ = sample
            assert image.dtype == torch.uint8 and image.shape == (3, 8, 8) and int(image[0].float().mean()) == 10 * i
