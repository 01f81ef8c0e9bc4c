"""timm's training augmentations, as the recipe and timm's ``train.py`` name them.

Two places, as in timm:
- crop-time (``--aa``, ``--hflip``, ``--vflip``, ``--scale``, ``--ratio``, ``--color-jitter``,
  ``--train-interpolation``): keyword arguments of timm's own ``create_transform(is_training=True)``, applied per
  image on the host (:func:`transform_options`, used by :class:`timm_icl.data.ImageTransform`);
- batch-time (``--reprob``/``--remode``/``--recount``, ``--mixup``/``--cutmix``/...): timm's ``RandomErasing`` and
  ``Mixup`` on the clean uint8 batch on the device (:class:`BatchAugment`), *before* the task distorts it, so the
  frozen reference and the student see the same erased / mixed clean image.

The functions read an ``argparse.Namespace`` (or any object with the flags as attributes), as timm's
``resolve_data_config(args)`` does. Mistakes are ``ValueError`` with one line.
"""

from __future__ import annotations

from typing import Any

import torch

from .preprocess import to_unit_float

__all__ = ["CROP_AUGMENTATIONS", "resolve_augmentation", "random_augmentations", "transform_options", "BatchAugment"]

# the flags that go to timm's create_transform (None: not given, timm's default)
CROP_AUGMENTATIONS = ("aa", "hflip", "vflip", "scale", "ratio", "color_jitter", "train_interpolation")


def random_augmentations(args: Any) -> list[str]:
    """The random augmentations asked for (flag names); empty when every training image is cropped the same way."""
    found = [k for k in CROP_AUGMENTATIONS if getattr(args, k) is not None]
    found += [k for k in ("reprob", "mixup", "cutmix") if getattr(args, k)]
    found += ["cutmix_minmax"] if args.cutmix_minmax else []
    if args.train_transform != "eval":
        found.append(f"train_transform {args.train_transform}")
    return found


def resolve_augmentation(args: Any) -> None:
    """Settle the augmentation flags in place: ``--jsd-loss`` / ``--aug-splits 3`` are the JSD constraint, any
    crop-time flag turns on timm's training transform, and random augmentations with cached reference targets are
    refused (``ValueError``: the bits would belong to other pixels)."""
    if args.jsd_loss:
        args.constraint = "jsd"
    if args.aug_splits not in (0, 3):
        raise ValueError(
            f"--aug-splits {args.aug_splits}: the JSD constraint uses 3 views (clean + 2 distorted); pass 3 or 0"
        )
    if args.aug_splits == 3 and args.constraint != "jsd":
        raise ValueError("--aug-splits 3 is timm's AugMix + JSD recipe: add --jsd-loss (= --constraint jsd)")
    if any(getattr(args, k) is not None for k in CROP_AUGMENTATIONS):
        args.train_transform = "timm"
    random = random_augmentations(args)
    if random and args.reference_targets not in (None, "", "live"):
        raise ValueError(
            f"--reference-targets {args.reference_targets}: the training crops are random ({', '.join(random)}), so "
            "bits cached once would belong to other pixels; use --reference-targets live"
        )


def transform_options(args: Any) -> dict[str, Any]:
    """timm's ``create_transform`` keyword arguments of the crop-time flags (None: timm's default)."""
    return {
        "auto_augment": args.aa,
        "hflip": args.hflip,
        "vflip": args.vflip,
        "scale": tuple(args.scale) if args.scale else None,
        "ratio": tuple(args.ratio) if args.ratio else None,
        "color_jitter": args.color_jitter,
        "interpolation": args.train_interpolation,
    }


class BatchAugment:
    """Random erasing and Mixup/CutMix on a clean batch on the device: ``(images uint8 or [0, 1] float (B, C, H, W),
    labels (B,)) -> (images float32 in [0, 1], labels)``. Labels become soft targets (B, num_classes) when Mixup is on
    (timm's ``Mixup`` applies ``--smoothing`` itself). Build it with :meth:`from_args`."""

    def __init__(self, num_classes: int, erase: Any = None, mixup: Any = None):
        self.num_classes, self.erase, self.mixup = num_classes, erase, mixup

    @classmethod
    def from_args(cls, args: Any, num_classes: int, device: torch.device) -> BatchAugment | None:
        """From the recipe's flags; None when neither erasing nor Mixup/CutMix is asked for."""
        if not (args.reprob or args.mixup or args.cutmix or args.cutmix_minmax):
            return None
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        erase = None
        if args.reprob:
            erase = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device=str(device))
        mixup = None
        if args.mixup or args.cutmix or args.cutmix_minmax:
            mixup = Mixup(
                mixup_alpha=args.mixup,
                cutmix_alpha=args.cutmix,
                cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob,
                switch_prob=args.mixup_switch_prob,
                mode=args.mixup_mode,
                label_smoothing=args.smoothing,
                num_classes=num_classes,
            )
        return cls(num_classes, erase, mixup)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = to_unit_float(images)
        if self.erase is not None:  # timm erases normalised images; here the [0, 1] image, its noise clamped to [0, 1]
            images = self.erase(images).clamp_(0, 1)
        if self.mixup is not None and len(images) % 2 == 0:  # Mixup pairs images: an odd last batch stays unmixed
            images, labels = self.mixup(images, labels)
        elif self.mixup is not None:
            labels = torch.nn.functional.one_hot(labels, self.num_classes).float()
        return images, labels
