"""Canonical JSON: one text for one value (sorted keys), whatever the containers and number types it is built from.

:func:`json_safe` turns tuples, tensors, numpy arrays and scalars, and objects with ``to_text()`` (a
``DistortionSet``) into plain JSON values; :func:`canonical_json` writes them with sorted keys, so that equal values
give equal bytes. Results files, exported ``eval_results.json`` and config.json's ``"icl"`` block use the exact
values; the target cache's fingerprint rounds floats (``float_digits=7``) so that a mean typed as ``0.485`` and the
same mean read back from a float32 tensor give the same fingerprint.

Example:
    >>> canonical_json({"b": (1, 2), "a": torch.tensor([0.5])})  # doctest: +SKIP
    '{\n "a": [\n  0.5\n ],\n "b": [\n  1,\n  2\n ]\n}\n'
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["json_safe", "canonical_json"]


def json_safe(value: Any, *, float_digits: int | None = None) -> Any:
    """A JSON-serialisable copy: mappings with str keys, tuples -> lists, tensors/arrays -> lists, numpy scalars
    -> Python numbers, objects with ``to_text()`` (a DistortionSet) -> their text, anything else -> ``str``.

    Args:
        value: what to convert (e.g. a result, a data config, a training config).
        float_digits: round every float to this many decimals (``None``: keep them exact).
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, float_digits=float_digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, float_digits=float_digits) for v in value]
    if isinstance(value, float) and float_digits is not None:
        return round(value, float_digits)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) or hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return json_safe(value.tolist(), float_digits=float_digits)
    if hasattr(value, "to_text"):
        return value.to_text()
    return str(value)


def canonical_json(value: Any, *, indent: int | None = 1, float_digits: int | None = None, end: str = "\n") -> str:
    """``json_safe(value, float_digits=...)`` as JSON with sorted keys, followed by ``end``: equal values give equal
    bytes. ``indent=None, end=""`` gives one line (the target cache's fingerprint)."""
    return json.dumps(json_safe(value, float_digits=float_digits), indent=indent, sort_keys=True) + end
