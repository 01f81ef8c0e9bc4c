"""Robustness evaluation: top-1/top-5 on clean images and on every condition of a distortion set.

Each batch is decoded once by the loader (clean uint8 ``[B, 3, H, W]``, or float in [0, 1]); on the model's
device it becomes float in [0, 1], every condition (clean, each noise sigma, each blur sigma) is applied to it,
the result is normalised with the model's mean/std (:func:`timm_icl.data.preprocess.normalize`) and classified.
Nothing about the images is cached between conditions, so memory stays at one batch.

Reproducibility: the noise added to an image depends only on ``(seed, condition, image position)``
(a counter-based generator, :class:`~timm_icl.distortions.counter_rng.CounterRNG`), not on the batch size,
so two runs, or runs with different batch sizes, give identical numbers; every batch is distorted at once (no
loop over images, no device sync). Across processes, each rank seeds by the image's position ``local * world +
rank`` and counts are reduced as exact integer sums.

Example:
    >>> results = evaluate_robustness(model, loader, "paper")          # doctest: +SKIP
    >>> print(timm_icl.eval.format_table({"ICL": results}))          # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data.loader import check_labels
from ..data.preprocess import check_unit_range, normalize, resolve_mean_std, to_unit_float
from ..distortions import Distortion, DistortionSet, get_distortion, parse_distortions
from ..distortions.counter_rng import CounterRNG
from ..distortions.noise_blur import values_checked
from ..utils.sync_debug import host_side
from .stats import summarize

__all__ = [
    "evaluate_robustness",
    "noise_seed",
    "distort",
]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def noise_seed(seed: int, condition_index: int, image_index: int) -> int:
    """The generator seed of the noise added to one image under one condition.

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so the seed is 32 bits: a hash of
    ``(seed, condition_index)`` plus ``image_index``. Images of one condition therefore never share a seed
    (below 2**32 images), and different seeds or conditions start from unrelated offsets.

    Args:
        seed: the evaluation seed.
        condition_index: position of the condition in the evaluated list (0 is clean).
        image_index: position of the image in the evaluation stream of this process
            (``local_index * world_size + rank`` when several processes evaluate).

    Returns:
        An integer in ``[0, 2**32)``.
    """
    offset = _splitmix64(_splitmix64(int(seed) & 0xFFFFFFFFFFFFFFFF) ^ int(condition_index))
    return (offset + int(image_index)) & 0xFFFFFFFF


def distort(
    images: torch.Tensor,
    condition: Distortion,
    *,
    seed: int = 0,
    condition_index: int = 0,
    image_indices: Sequence[int] | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Apply one condition to a clean batch; each image of a random kind gets the numbers of its own position.

    Built-in random kinds (noise, shot_noise, impulse_noise, motion_blur: registered ``counter_rng``) draw from a
    :class:`~timm_icl.distortions.counter_rng.CounterRNG`: every number a hash of ``(seed, condition_index,
    image index, element)``, the whole batch at once on the device. A user's random kind without ``counter_rng`` is
    applied image by image, each with a generator seeded by :func:`noise_seed`. Either way an image's result does
    not depend on the batch it came in.

    Args:
        images: ``[B, C, H, W]`` float in [0, 1], on any device.
        condition: the condition; non-random kinds (blur, jpeg, ..., clean) are applied to the whole batch at once.
        seed, condition_index: the keys of the numbers drawn (see above).
        image_indices: ``[B]`` stream positions of the images (default ``0..B-1``); a tensor on the images' device
            costs nothing to read.
        generator: a reusable generator on ``images.device`` for the image-by-image path (made when missing).

    Returns:
        ``[B, C, H, W]`` distorted images, same dtype and device.
    """
    with values_checked():  # conditions are checked when they are made
        if not condition.random:
            return condition(images)
        if image_indices is None:
            image_indices = torch.arange(images.shape[0], device=images.device)
        if get_distortion(condition.kind).counter_rng:
            if not isinstance(image_indices, torch.Tensor):
                image_indices = torch.tensor(list(image_indices), dtype=torch.long)
            index = image_indices if image_indices.device == images.device else image_indices.to(images.device)
            return condition(images, generator=CounterRNG(seed, condition_index, index))
        if generator is None:
            generator = torch.Generator(device=images.device)
        positions = image_indices.tolist() if isinstance(image_indices, torch.Tensor) else list(image_indices)
        noisy = [
            condition(images[i : i + 1], generator=generator.manual_seed(noise_seed(seed, condition_index, int(j))))
            for i, j in enumerate(positions)
        ]
        return torch.cat(noisy) if noisy else images.clone()


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """:func:`timm_icl.data.check_labels` on the loader's CPU labels, in the evaluation's words."""
    try:
        check_labels(labels, num_classes)
    except ValueError:
        raise ValueError(
            f"labels must be in [0, {num_classes - 1}] for a model with {num_classes} classes, got labels from "
            f"{int(labels.min())} to {int(labels.max())}"
        ) from None


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        return batch["images"] if "images" in batch else batch["image"], batch[
            "labels"
        ] if "labels" in batch else batch["label"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"evaluation batches must be (images, labels) tuples, got {type(batch).__name__}")


@torch.inference_mode()
def evaluate_robustness(
    model: nn.Module,
    loader: Iterable,
    distortions: str | DistortionSet | Iterable[Distortion] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    accelerator: Any = None,
    topk: Sequence[int] = (1, 5),
    per_image: bool = True,
    progress: bool = False,
) -> dict:
    """Top-k accuracy of ``model`` on clean images and on each condition of ``distortions``.

    Args:
        model: any classifier ``[B, 3, H, W] -> [B, num_classes]`` logits (a timm model); put in eval mode here.
        loader: yields ``(images [B, 3, H, W], labels [B] long)``, images uint8 (0-255) or float in [0, 1], not
            normalised (batches with no images are skipped).
        distortions: a distortion set or its text (``None``/``"paper"``: the paper's ten conditions;
            ``"imagenet-c"``; ``"imagenet-c-10"``; ``"small"``; any registered kinds, ``"shot_noise:1,3 jpeg:2"``).
            Clean is always evaluated first.
        mean, std: normalisation (default: the model's ``pretrained_cfg``; without either: ValueError).
        seed: noise seed; the same seed gives the same numbers on every run and batch size.
        device: where distortions and the model run (default: ``accelerator.device`` or the model's device).
        accelerator: an ``accelerate.Accelerator`` when several processes each evaluate their own shard:
            counts are summed across processes (exact), per-image lists are gathered in rank order.
        topk: accuracies reported, as ``top{k}`` (k larger than the number of classes counts as 1.0).
        per_image: keep the 0/1 top-1 correctness of every image (for paired tests between runs).
        progress: show a progress bar (main process only).

    Returns:
        ``{"conditions": {name: {"kind", "sigma", "top1", "top5", "correct", "count"}},
        "summary": {"clean", "noise", "blur", other kinds}`` (top-1; a kind's mean over its severities, ``None`` if
        noise or blur is absent; ``"sigma"`` is the severity in the kind's unit), ``"per_image": {name: [0/1, ...]}``
        (when ``per_image``), ``"distortions"`` (text),
        ``"seed"``, ``"num_samples"``}.
    """
    dset = parse_distortions(distortions)
    conditions = [Distortion("clean")] + [c for c in dset if c.kind != "clean"]
    topk = sorted({int(k) for k in topk} | {1})
    if accelerator is not None:
        device = accelerator.device
        rank, world = accelerator.process_index, accelerator.num_processes
    else:
        rank, world = 0, 1
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    mean_t, std_t = (torch.tensor(v, device=device) for v in resolve_mean_std(model, mean, std))

    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device)
    # int64 counters on the device: [condition, k] correct counts; reduced once at the end.
    correct = torch.zeros(len(conditions), len(topk), dtype=torch.long, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    per_image_lists: list[list[torch.Tensor]] = [[] for _ in conditions]

    iterator = loader
    if progress and rank == 0:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="evaluate", unit="batch")
    seen = 0
    try:
        for batch in iterator:
            images, labels = _unpack(batch)
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
            if images.shape[0] == 0:
                continue
            if seen == 0:
                check_unit_range(images, "evaluate_robustness")  # float batches: once, one sync
            labels_in = labels
            images = to_unit_float(images.to(device, non_blocking=True)).float()
            labels = labels.to(device, non_blocking=True).long()
            positions = (torch.arange(images.shape[0], device=device) + seen) * world + rank
            for ci, condition in enumerate(conditions):
                x = distort(
                    images, condition, seed=seed, condition_index=ci, image_indices=positions, generator=generator
                )
                x = normalize(x, mean_t, std_t)
                if accelerator is not None:
                    with accelerator.autocast():  # a fresh context manager each time: they are single-use
                        logits = model(x)
                else:
                    logits = model(x)
                logits = logits.float()
                if ci == 0 and labels_in.device.type == "cpu":
                    with host_side():  # the loader's CPU labels: no device read
                        _check_labels(labels_in, logits.shape[1])
                kmax = min(topk[-1], logits.shape[1])
                top = logits.topk(kmax, dim=1).indices
                hits = top == labels.unsqueeze(1)  # [B, kmax]
                for ki, k in enumerate(topk):
                    correct[ci, ki] += hits[:, : min(k, kmax)].any(dim=1).sum()
                if per_image:
                    per_image_lists[ci].append(hits[:, 0].to(torch.uint8))  # read once, at the end
            count += images.shape[0]
            seen += images.shape[0]
    finally:
        model.train(was_training)

    # the counts come back in one read: [condition, k] correct counts and, last, the number of images
    counts = torch.cat([correct.flatten(), count.view(1)])
    if accelerator is not None and world > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    *flat, total = counts.tolist()
    if total == 0:
        raise ValueError("the loader yielded no images: nothing to evaluate")
    correct_list = [flat[ci * len(topk) : (ci + 1) * len(topk)] for ci in range(len(conditions))]

    results: dict[str, Any] = {"conditions": {}, "summary": {}}
    for ci, condition in enumerate(conditions):
        entry: dict[str, Any] = {"kind": condition.kind, "sigma": float(condition.sigma)}
        for ki, k in enumerate(topk):
            entry[f"top{k}"] = correct_list[ci][ki] / total if total else math.nan
        entry["correct"] = int(correct_list[ci][0])
        entry["count"] = total
        results["conditions"][condition.name] = entry
    results["summary"] = summarize(results["conditions"])
    if per_image:
        # one read for every condition's 0/1 list
        rows = torch.stack([torch.cat(v) for v in per_image_lists]).tolist() if per_image_lists[0] else None
        lists = {c.name: (rows[ci] if rows else []) for ci, c in enumerate(conditions)}
        if accelerator is not None and world > 1:
            from accelerate.utils import gather_object

            gathered = gather_object([lists])
            lists = {name: [x for part in gathered for x in part[name]] for name in lists}
        results["per_image"] = lists
    results["distortions"] = DistortionSet([c for c in conditions if c.kind != "clean"]).to_text()
    results["seed"] = int(seed)
    results["num_samples"] = total
    return results
