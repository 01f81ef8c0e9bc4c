"""The data flags, declared once for the recipe (``recipes/train_icl.py``) and ``timm-icl eval``, in timm's words.

timm's ``train.py``/``validate.py`` spellings are accepted: a positional data dir or ``--data-dir``, dataset prefixes
(``hfds/``, ``hfids/``, ``wds/``, ``torch/``, ``tfds/``), ``--input-size C H W``, ``--img-size``, ``--mean``/``--std``,
``--train-interpolation``, ``-j``/``--workers``. :func:`resolve_data_args` turns them into one dataset spec the data
layer reads (``fashion-mnist``, a local folder, or a Hub id) and a streaming choice; a prefix timm-icl cannot read
is one line that says what to use instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_data_args", "resolve_data_args", "resolve_dataset_spec", "image_size_of"]

_FASHION_MNIST = ("fashion_mnist", "fashionmnist", "fashion-mnist")


def add_data_args(parser: argparse.ArgumentParser, *, training: bool, title: str = "data") -> argparse._ArgumentGroup:
    """Declare the data flags on ``parser`` (one group); ``training`` adds the training-only ones (train split,
    train interpolation). Defaults are None where each tool resolves its own (dataset, distortions, workers)."""
    group = parser.add_argument_group(title)
    group.add_argument(
        "data", nargs="?", metavar="DIR", default=None, help="timm's positional data dir: the same as --data-dir"
    )
    group.add_argument(
        "--data-dir", default=None, help="a local dataset folder (image folder, parquet, webdataset tar shards)"
    )
    group.add_argument(
        "--dataset",
        default=None,
        help="fashion-mnist, a local folder, a Hub id, or timm's prefixes: hfds/ORG/NAME (Hub), hfids/ORG/NAME "
        "(Hub, streamed), wds/NAME (the tar shards in --data-dir), torch/fashion_mnist; default: --data-dir"
        + (" or ImageNet (the paper's; gated)" if training else " or the run's own dataset"),
    )
    if training:
        group.add_argument("--train-split", default="train")
    group.add_argument(
        "--val-split",
        *(() if training else ("--split",)),
        default="validation" if training else None,
        help="'none' to skip validation" if training else "default: validation when the dataset has one, else test",
    )
    group.add_argument("--image-column", default=None, help="default: detected")
    group.add_argument("--label-column", default=None, help="default: detected")
    group.add_argument(
        "--streaming",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stream the dataset (default: on for a Hub id and hfids/, off for local data)",
    )
    group.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        default=None,
        help="timm's input size, e.g. 3 224 224 (default: the model's)",
    )
    group.add_argument(
        "--img-size", "--image-size", dest="image_size", type=int, default=None, help="square input size"
    )
    group.add_argument(
        "--crop-pct", type=float, default=None, help="resize to size/crop_pct, then centre-crop (default: the model's)"
    )
    group.add_argument("--interpolation", default=None, help="bilinear, bicubic, ... (default: the model's)")
    if training:
        group.add_argument(
            "--train-interpolation",
            default=None,
            help="interpolation of timm's random training crops (--train-transform timm; 'random' allowed; "
            "default: --interpolation)",
        )
    group.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="default: the model's")
    group.add_argument("--std", type=float, nargs="+", default=None, metavar="STD", help="default: the model's")
    group.add_argument(
        "-j",
        "--num-workers",
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers per process (default: 2 for files, 0 for in-memory Fashion-MNIST)",
    )
    group.add_argument(
        "--distortions",
        default=None,
        help="conditions: 'paper', 'small' (28 px), 'imagenet-c', 'imagenet-c-10', or registered kinds with "
        "severities, e.g. 'noise:20,60 motion_blur:1,3 jpeg:1,3' (timm_icl.distortion_names(); --import adds "
        "your own); default: " + ("'paper'" if training else "the run's own training distortions, else 'paper'"),
    )
    return group


def resolve_dataset_spec(dataset: str | None, data_dir: str | None) -> tuple[str | None, bool | None]:
    """``(spec, streaming)`` for the data layer from timm's ``--dataset``/``--data-dir``: ``hfds/X`` -> ``X``,
    ``hfids/X`` -> ``X`` streamed, ``wds/X`` -> ``data_dir`` (its tar shards), ``torch/fashion_mnist`` ->
    ``fashion-mnist``; no ``--dataset``: ``data_dir``. ``streaming`` is None unless the prefix decides it. A prefix
    timm-icl cannot read raises a one-line ValueError."""
    if not dataset:
        return data_dir, None
    prefix, sep, name = dataset.partition("/")
    prefix = prefix.lower() if sep else ""
    if prefix == "hfds":
        return name, None
    if prefix == "hfids":
        return name, True
    if prefix == "wds":
        if not data_dir:
            raise ValueError(
                f"--dataset {dataset}: timm reads webdataset shards from --data-dir; pass --data-dir FOLDER (tar "
                "shards under FOLDER/<split>/), or a Hub webdataset as hfids/ORG/NAME"
            )
        return data_dir, None
    if prefix == "torch":
        if name.lower() in _FASHION_MNIST:
            return "fashion-mnist", None
        if name.lower() in ("image_folder", "folder", "imagefolder") and data_dir:
            return data_dir, None
        raise ValueError(
            f"--dataset {dataset}: torchvision datasets are not read by timm-icl (only torch/fashion_mnist and "
            "torch/image_folder); use its Hub copy as hfds/ORG/NAME or a local image folder with --data-dir"
        )
    if prefix == "tfds":
        raise ValueError(
            f"--dataset {dataset}: TensorFlow Datasets are not read by timm-icl; use the Hub copy as hfds/ORG/NAME "
            "or export it to an image folder or parquet files and pass --data-dir"
        )
    if dataset.lower().replace("_", "-") == "fashion-mnist":
        return "fashion-mnist", None
    return dataset, None


def resolve_data_args(args: argparse.Namespace, *, default_dataset: str | None = None) -> None:
    """Settle ``args.dataset`` (positional dir, ``--data-dir``, prefixes) and ``args.streaming`` in place; a
    contradiction or an unsupported prefix is a one-line ValueError."""
    data, data_dir = getattr(args, "data", None), getattr(args, "data_dir", None)
    if data and data_dir and Path(data) != Path(data_dir):
        raise ValueError(f"two data dirs: {data} (positional) and --data-dir {data_dir}; pass one")
    data_dir = data_dir or data
    args.data_dir, args.data = data_dir, None
    spec, streaming = resolve_dataset_spec(args.dataset, data_dir)
    args.dataset = spec or default_dataset
    if streaming is not None and args.streaming is None:
        args.streaming = streaming
    if args.input_size is not None:
        channels, h, w = args.input_size
        if channels != 3:
            raise ValueError(f"--input-size {channels} {h} {w}: timm-icl trains on RGB images (3 channels)")
        if args.image_size is not None and args.image_size != h or h != w and args.image_size is not None:
            raise ValueError(f"--input-size {channels} {h} {w} and --img-size {args.image_size} disagree; pass one")
    for name in ("mean", "std"):
        value = getattr(args, name, None)
        if value is not None and len(value) not in (1, 3):
            raise ValueError(f"--{name} takes 1 or 3 values, got {len(value)}")
        if value is not None and len(value) == 1:
            setattr(args, name, [value[0]] * 3)


def image_size_of(args: argparse.Namespace) -> int | tuple[int, int] | None:
    """The crop size the flags ask for: ``(H, W)`` from ``--input-size``, else ``--img-size``, else None."""
    if getattr(args, "input_size", None) is not None:
        return tuple(args.input_size[-2:])  # type: ignore[return-value]
    return getattr(args, "image_size", None)
