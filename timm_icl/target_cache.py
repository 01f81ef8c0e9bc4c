"""Cached reference targets: compute ``1[h_ref > 0]`` once per image, train ICL without a reference forward.

ICL (and AB) use the frozen reference only through one bit per constrained unit. When the training
images are deterministic before the distortion (the paper's protocol: resize + centre crop, no random
crop or flip), those bits are a pure function of the image, so they can be computed once and stored:

    bits [N, units] --packbits (big-endian, like numpy.packbits)--> uint8 [N, ceil(units / 8)]

vgg16's two 4096-unit layers take 8,192 bits = 1 KiB per image (1.3 GB for ImageNet's train split).
The cache is one safetensors file: ``targets.<layer>`` uint8 rows, the image ids (``ids`` int64 tensor
for integer ids, JSON metadata for string ids), and a fingerprint of everything the bits depend on:

- the reference weights (SHA-256 over names, dtypes, shapes and bytes of its ``state_dict``),
- the constrained layers and their per-image shapes,
- the preprocessing: the task's mean/std plus what the caller describes (image size, resize, crop ...).

:meth:`TargetCache.load` with a task recomputes the fingerprint and refuses a stale cache with a
:class:`StaleCacheError` that names the part that changed; :meth:`TargetCache.verify` compares the
cached bits against the live reference on a sample (the recipe samples batches spread over the whole file).

The file also carries the SHA-256 of its content (every tensor's name, dtype, shape and bytes, in its
metadata), checked at every load: a flipped byte, a tampered row, a truncated or random file is refused with
one line (:class:`DamagedCacheError`), never trained on. Hashing runs at about 1.8 GB/s (ImageNet's 1.3 GB
cache: under a second per load).

Example:
    >>> pre = {"image_size": 224, "resize": 256, "crop": "center"}
    >>> cache = TargetCache.build(task, ((ids, images) for images, _, ids in loader), preprocessing=pre)
    >>> cache.save("targets.safetensors")
    >>> cache = TargetCache.load("targets.safetensors", task=task, preprocessing=pre)
    >>> out = task(images, labels, reference_targets=cache.lookup(ids, device=images.device))
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .utils.bits import pack_bits, unpack_bits
from .utils.errors import first_line
from .utils.jsonio import canonical_json

__all__ = [
    "TargetCache",
    "StaleCacheError",
    "DamagedCacheError",
    "content_sha256",
    "fingerprint_weights",
    "cache_fingerprint",
]

_FORMAT = "timm-icl-target-cache/1"


class StaleCacheError(ValueError):
    """The cache was computed for other weights, layers or preprocessing than the ones in use."""


class DamagedCacheError(ValueError):
    """The cache file does not load or its content does not match the SHA-256 it was written with."""


def content_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and bytes of ``tensors``, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    return h.hexdigest()


def fingerprint_weights(model: nn.Module) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and bytes of ``model.state_dict()``."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # view as bytes: works for every dtype (bf16 has no numpy equivalent)
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_fingerprint(task, preprocessing: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The parts the cached bits depend on, each as a short string (compared part by part on load).

    Args:
        task: an :class:`~timm_icl.task.ICLTask` with a reference (constraint ``icl`` or ``ab``).
        preprocessing: what produces the clean images the reference sees, e.g.
            ``{"image_size": 224, "resize": 256, "crop": "center", "interpolation": "bilinear"}``, or simply the
            loader's data config (``info["data_config"]``: input_size, crop_pct, crop_mode, interpolation).

    Returns:
        ``{"weights": sha256, "layers": json, "preprocessing": json}`` (mean/std are part of preprocessing).
    """
    if task.reference is None:
        raise ValueError("plain fine-tuning (constraint='none') has no reference targets to cache")
    pre = dict(preprocessing or {})
    pre["mean"] = task.mean.flatten().tolist()
    pre["std"] = task.std.flatten().tolist()
    return {
        "weights": fingerprint_weights(task.reference),
        "layers": json.dumps(list(task.layers)),
        "preprocessing": canonical_json(pre, indent=None, float_digits=7, end=""),
    }


def _check_bits_constraint(task) -> None:
    if getattr(task.constraint, "needs_reference_values", True):
        raise ValueError(
            f"constraint {task.constraint_name!r} needs the reference's float pre-activations, not bits; "
            "target caching supports 'icl' and 'ab'"
        )


class TargetCache:
    """Bit-packed reference targets keyed by image id.

    Args:
        packed: ``{layer: uint8 [N, nbytes]}``, rows in the order of ``ids``.
        shapes: ``{layer: per-image shape}``, e.g. ``{"pre_logits.fc1": (4096, 1, 1)}``.
        ids: the image ids (all ints or all strings), unique.
        fingerprint: see :func:`cache_fingerprint`.
    """

    def __init__(
        self,
        packed: Mapping[str, torch.Tensor],
        shapes: Mapping[str, Sequence[int]],
        ids: Sequence[int | str],
        fingerprint: Mapping[str, str],
    ):
        self.packed = {k: v.contiguous() for k, v in packed.items()}
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
        self.ids = list(ids)
        self.fingerprint = dict(fingerprint)
        self._row = {i: r for r, i in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            raise ValueError("image ids in a target cache must be unique")
        for layer, rows in self.packed.items():
            if rows.dtype != torch.uint8 or rows.ndim != 2 or rows.shape[0] != len(self.ids):
                raise ValueError(
                    f"cache layer {layer!r}: expected uint8 [{len(self.ids)}, nbytes], got {rows.dtype} "
                    f"{tuple(rows.shape)}"
                )

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id) -> bool:
        return _key(image_id) in self._row

    @property
    def layers(self) -> list[str]:
        return list(self.packed)

    @property
    def nbytes_per_image(self) -> int:
        return sum(int(v.shape[1]) for v in self.packed.values())

    # -- building ---------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        task,
        batches: Iterable[tuple[Sequence[int | str] | torch.Tensor, torch.Tensor]],
        *,
        preprocessing: Mapping[str, Any] | None = None,
    ) -> TargetCache:
        """Run the task's reference once over ``batches`` of ``(ids, clean images [B, 3, H, W])``, uint8 as the
        loaders yield them (or float in [0, 1]).

        The images must come from the deterministic preprocessing described by ``preprocessing`` (no
        random crop/flip): the bits are only valid for exactly those pixels.
        """
        _check_bits_constraint(task)
        fingerprint = cache_fingerprint(task, preprocessing)
        chunks: dict[str, list[torch.Tensor]] = {layer: [] for layer in task.layers}
        shapes: dict[str, tuple[int, ...]] = {}
        all_ids: list[int | str] = []
        for ids, images in batches:
            ids = _as_id_list(ids)
            if len(ids) != images.shape[0]:
                raise ValueError(f"got {len(ids)} ids for a batch of {images.shape[0]} images")
            targets = task.reference_targets(images.to(task.mean.device))
            for layer, bits in targets.items():
                shapes.setdefault(layer, tuple(bits.shape[1:]))
                chunks[layer].append(pack_bits(bits).cpu())
            all_ids.extend(ids)
        if not all_ids:
            raise ValueError("no images were given to TargetCache.build")
        packed = {layer: torch.cat(c) for layer, c in chunks.items()}
        return cls(packed, shapes, all_ids, fingerprint)

    # -- lookup -----------------------------------------------------------------------------------------
    @classmethod
    def concatenate(cls, parts: Sequence[TargetCache]) -> TargetCache:
        """One cache of the rows of ``parts`` in order (parts built by several processes or in chunks); all must
        share layers, shapes and fingerprint."""
        if not parts:
            raise ValueError("no target-cache parts to concatenate")
        first = parts[0]
        for part in parts[1:]:
            if part.shapes != first.shapes or part.fingerprint != first.fingerprint:
                raise StaleCacheError("target-cache parts were built with different layers or weights")
        packed = {layer: torch.cat([p.packed[layer] for p in parts]) for layer in first.layers}
        return cls(packed, first.shapes, [i for p in parts for i in p.ids], first.fingerprint)

    def lookup(self, ids: Sequence[int | str] | torch.Tensor, device: torch.device | str | None = None) -> dict:
        """Targets for a batch: ``{layer: bool [B, *shape]}`` on ``device``, ready for
        ``task(images, labels, reference_targets=...)``.

        The ids are the loader's (host) ids: the rows are gathered on the host, pinned when the device is a GPU,
        and copied with ``non_blocking=True``; unpacking happens on the device (1/8 of the copy). Nothing waits
        for the device."""
        from .utils.sync_debug import host_side

        device = torch.device(device) if device is not None else torch.device("cpu")
        with host_side():  # ids and the packed table are host data: a dict lookup and a CPU gather
            keys = _as_id_list(ids)
            try:
                rows = torch.tensor([self._row[k] for k in keys], dtype=torch.long)
            except KeyError as exc:
                raise KeyError(f"image id {exc.args[0]!r} is not in the target cache ({len(self)} images)") from None
            gathered = {layer: table.index_select(0, rows) for layer, table in self.packed.items()}
            if device.type == "cuda":
                gathered = {layer: part.pin_memory() for layer, part in gathered.items()}
        out = {}
        for layer, part in gathered.items():
            if part.device != device:
                part = part.to(device, non_blocking=True)
            out[layer] = unpack_bits(part, self.shapes[layer])
        return out

    # -- checks -----------------------------------------------------------------------------------------
    def check(self, task, preprocessing: Mapping[str, Any] | None = None) -> None:
        """Raise :class:`StaleCacheError` if weights, layers or preprocessing differ from the cache's."""
        _check_bits_constraint(task)
        current = cache_fingerprint(task, preprocessing)
        cached = self.fingerprint
        changed = [part for part in ("weights", "layers", "preprocessing") if current[part] != cached.get(part)]
        if changed:
            details = {
                "weights": "the reference weights differ",
                "layers": f"layers {current['layers']} != cached {cached.get('layers')}",
                "preprocessing": f"preprocessing {current['preprocessing']} != cached {cached.get('preprocessing')}",
            }
            raise StaleCacheError("stale target cache: " + "; ".join(details[p] for p in changed) + "; rebuild it")

    @torch.no_grad()
    def verify(self, task, ids, images: torch.Tensor, *, max_flip_rate: float = 0.0) -> float:
        """Compare cached bits with the live reference on a sample of ``(ids, images)``.

        Returns:
            the fraction of bits that differ; raises :class:`StaleCacheError` above ``max_flip_rate``
            (a different device or BLAS can flip units whose pre-activation is within rounding of 0).
        """
        live = task.reference_targets(images.to(task.mean.device))
        cached = self.lookup(ids, device=task.mean.device)
        flips = sum(int((live[k] != cached[k]).sum()) for k in cached)
        total = sum(cached[k].numel() for k in cached)
        rate = flips / max(total, 1)
        if rate > max_flip_rate:
            raise StaleCacheError(
                f"target cache disagrees with the live reference on {flips} of {total} bits ({rate:.3%}); rebuild it"
            )
        return rate

    # -- storage ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (targets, ids, fingerprint, shapes)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"targets.{layer}": rows for layer, rows in self.packed.items()}
        meta = {
            "format": _FORMAT,
            "fingerprint": json.dumps(self.fingerprint),
            "shapes": json.dumps({k: list(v) for k, v in self.shapes.items()}),
            "layers": json.dumps(self.layers),
        }
        if all(isinstance(i, int) for i in self.ids):
            tensors["ids"] = torch.tensor(self.ids, dtype=torch.int64)
        else:
            meta["ids"] = json.dumps(self.ids)
        meta["content_sha256"] = _content_digest(tensors, meta)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, task=None, *, preprocessing: Mapping[str, Any] | None = None) -> TargetCache:
        """Read a cache; with ``task``, refuse it (:class:`StaleCacheError`) unless it matches
        ``task``'s reference weights, layers and ``preprocessing``."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"target cache {str(path)!r} does not exist")
        rebuild = "delete it to rebuild it"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT:
                    raise DamagedCacheError(
                        f"{str(path)!r} is not a timm-icl target cache (format {meta.get('format')!r})"
                    )
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            layers = json.loads(meta["layers"])
            packed = {layer: tensors[f"targets.{layer}"] for layer in layers}
            ids = tensors["ids"].tolist() if "ids" in tensors else json.loads(meta["ids"])
            shapes, fingerprint = json.loads(meta["shapes"]), json.loads(meta["fingerprint"])
        except DamagedCacheError:
            raise
        except Exception as e:  # safetensors' errors on a truncated or random file, a missing key or tensor
            raise DamagedCacheError(
                f"target cache {path} does not load ({first_line(e, with_type=True)}): {rebuild}"
            ) from None
        if "content_sha256" not in meta:
            raise DamagedCacheError(
                f"target cache {path} carries no content hash (written by an older timm-icl): {rebuild}"
            )
        if _content_digest(tensors, meta) != meta["content_sha256"]:
            raise DamagedCacheError(
                f"target cache {path} is damaged: its content does not match the SHA-256 it was written with; {rebuild}"
            )
        cache = cls(packed, shapes, ids, fingerprint)
        if task is not None:
            cache.check(task, preprocessing)
        return cache


def _content_digest(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> str:
    """The content hash of a cache file: its tensors and every metadata entry but the hash itself."""
    described = {k: v for k, v in meta.items() if k != "content_sha256"}
    return content_sha256(tensors) + ":" + hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _key(image_id):
    return int(image_id) if isinstance(image_id, (int, torch.Tensor)) else image_id


def _as_id_list(ids) -> list[int | str]:
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.reshape(-1).tolist()]
    return [_key(i) for i in ids]
