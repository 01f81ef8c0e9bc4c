"""Data: timm's eval preprocessing in uint8 on the host (:mod:`.preprocess`), datasets from Hugging Face
``datasets``, local folders and Fashion-MNIST (:mod:`.datasets`), loaders sharded by rank (:mod:`.loader`),
resumable sharded streams (:mod:`.stream`) and the Fashion-MNIST files from Debian's package
(:mod:`.fashion_mnist`)."""

from .datasets import FashionMNISTDataset, check_dataset_access, create_dataset, decode_image, hub_dataset_id
from .fashion_mnist import is_fashion_mnist
from .loader import ImageLoader, ShardedBatchSampler, check_labels, create_loader
from .preprocess import (
    ImageTransform,
    UnusableImageError,
    check_unit_range,
    normalize,
    open_image,
    preprocess_image,
    resolve_mean_std,
    resolve_preprocessing,
    to_unit_float,
)
from .stream import ShardedStream, ShardedStreamLoader, StreamBatch

__all__ = [
    "FashionMNISTDataset",
    "create_dataset",
    "check_dataset_access",
    "create_loader",
    "check_labels",
    "ImageLoader",
    "ShardedBatchSampler",
    "decode_image",
    "hub_dataset_id",
    "is_fashion_mnist",
    "ImageTransform",
    "UnusableImageError",
    "check_unit_range",
    "normalize",
    "open_image",
    "preprocess_image",
    "resolve_mean_std",
    "resolve_preprocessing",
    "to_unit_float",
    "ShardedStream",
    "ShardedStreamLoader",
    "StreamBatch",
]
