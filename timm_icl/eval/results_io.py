"""The results file: :func:`save_results` writes a result as canonical JSON (:mod:`timm_icl.utils.jsonio`: sorted
keys, identical results give identical bytes) with the per-image correctness packed as bits (hex text: 10,000 images
take 2.5 kB per condition); :func:`load_results` unpacks them, and also reads files with plain 0/1 lists and a run's
``results.json``.

A file holds what :func:`~timm_icl.eval.evaluate.evaluate_robustness` returns, with ``per_image`` as
``{condition: hex}`` and ``"per_image_encoding": "packbits-hex"`` (bit ``i`` of the bytes, most significant bit
first, is image ``i``: ``numpy.packbits``' order).

Example:
    >>> save_results(results, "icl.json"); load_results("icl.json")["summary"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..utils.bits import pack_bits, unpack_bits
from ..utils.jsonio import canonical_json
from .stats import Result

__all__ = [
    "save_results",
    "load_results",
    "pack_result",
    "unpack_result",
    "pack_correctness",
    "unpack_correctness",
]

PACKED_ENCODING = "packbits-hex"


def pack_correctness(correct: Sequence[int]) -> str:
    """Per-image 0/1 correctness -> hex text of the bits packed by :func:`~timm_icl.utils.bits.pack_bits` (8 images
    a byte)."""
    bits = torch.as_tensor(list(correct), dtype=torch.uint8).view(1, -1)
    return pack_bits(bits)[0].numpy().tobytes().hex()


def unpack_correctness(packed: str, count: int) -> list[int]:
    """Inverse of :func:`pack_correctness`: the first ``count`` bits as a list of 0/1 ints."""
    raw = bytes.fromhex(packed)
    if len(raw) * 8 < count:
        raise ValueError(f"packed correctness holds {len(raw) * 8} bits, {count} images expected")
    row = torch.tensor(list(raw), dtype=torch.uint8).view(1, -1)
    return unpack_bits(row, (count,))[0].to(torch.int64).tolist()


def pack_result(results: Result) -> dict:
    """A copy of a result as stored in files: per-image lists packed as bits (see :func:`pack_correctness`)."""
    data = dict(results)
    if "per_image" in data:
        data["per_image"] = {name: pack_correctness(v) for name, v in data["per_image"].items()}
        data["per_image_encoding"] = PACKED_ENCODING
    return data


def unpack_result(data: Mapping[str, Any]) -> dict:
    """Inverse of :func:`pack_result` (results with plain 0/1 lists pass through)."""
    data = dict(data)
    encoding = data.pop("per_image_encoding", None)
    if encoding is not None and encoding != PACKED_ENCODING:
        raise ValueError(f"unknown per-image encoding {encoding!r} (written by a newer timm-icl?)")
    if "per_image" in data:
        count = data.get("num_samples") or next(iter(data["conditions"].values()))["count"]
        data["per_image"] = {
            name: unpack_correctness(v, count) if isinstance(v, str) else v for name, v in data["per_image"].items()
        }
    return data


def save_results(results: Result, path: str | Path) -> Path:
    """Write a result as canonical JSON (identical results give identical files), per-image lists packed as bits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(canonical_json(pack_result(results)))
    return path


def load_results(path: str | Path) -> dict:
    """Read a result written by :func:`save_results` (or ``timm-icl eval -o``, or a run's eval.json); per-image
    correctness comes back as 0/1 lists. A file that is not a result gives one clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no results file at {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "eval" in data and "conditions" not in data:
        data = data["eval"]
    if not isinstance(data, dict) or "conditions" not in data:
        raise ValueError(f"{path} is not an evaluation result (no 'conditions' key)")
    try:
        return unpack_result(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
