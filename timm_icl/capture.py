"""Capture the pre-activation outputs (or inputs) of named modules with forward hooks.

Layer names are module names from ``model.named_modules()`` (fnmatch patterns allowed). A name with
the suffix ``:input`` captures the module's first positional *input* instead of its output: in timm
families that fuse BatchNorm and activation (``BatchNormAct2d`` in EfficientNet, MobileNet, RegNet)
no module outputs the pre-activation, but it is the input of ``...bn1.act``; in a ResNet block the
input of ``act2`` is ``bn2(x) + shortcut``.

In-place activations (``ReLU(inplace=True)`` in timm's VGG and ResNet, ``ReLU6(inplace=True)`` in
EfficientNet-Lite) overwrite a tensor stored by reference after the hook has run. The default
``transform`` therefore *clones* inside the hook, which keeps autograd intact (clone's backward is
the identity). A reference model can pass ``transform=lambda h: h > 0`` to keep one bit per unit.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = [
    "capture_preactivations",
    "resolve_layers",
    "run_until_captured",
    "INPUT_SUFFIX",
]

INPUT_SUFFIX = ":input"


def _split(spec: str) -> tuple[str, bool]:
    if spec.endswith(INPUT_SUFFIX):
        return spec[: -len(INPUT_SUFFIX)], True
    return spec, False


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Expand names/patterns to concrete layer specs in module order (``"name"`` or ``"name:input"``).

    Raises:
        ValueError: a name or pattern matches no module; the message lists close matches.
    """
    if isinstance(layers, str):
        layers = [layers]
    if len(layers) == 0:
        raise ValueError("no layers given; pass layer names such as ['pre_logits.fc1'] (see default_layers)")
    names = [n for n, _ in model.named_modules() if n]
    order = {n: i for i, n in enumerate(names)}
    resolved: list[str] = []
    for spec in layers:
        if not isinstance(spec, str):
            raise TypeError(f"layer names must be strings, got {spec!r}")
        pattern, at_input = _split(spec)
        if any(ch in pattern for ch in "*?["):
            matches = fnmatch.filter(names, pattern)
        else:
            matches = [pattern] if pattern in order else []
        if not matches:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"layer {spec!r} matches no module of {type(model).__name__}{hint} "
                "(list candidates with `timm-icl layers MODEL` or [n for n, _ in model.named_modules()])"
            )
        for m in matches:
            full = m + (INPUT_SUFFIX if at_input else "")
            if full not in resolved:
                resolved.append(full)
    resolved.sort(key=lambda s: order[_split(s)[0]])
    return resolved


class _AllCaptured(Exception):
    """Raised from a hook to stop a forward pass once every requested layer has been captured."""


@contextmanager
def capture_preactivations(
    model: nn.Module,
    layers: str | Sequence[str],
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop_when_done: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Register forward hooks on named modules and yield ``{layer: captured tensor}``.

    Args:
        model: any ``nn.Module`` (register on the unwrapped module, not on a DDP/compile wrapper).
        layers: names or fnmatch patterns; suffix ``:input`` captures a module's first input.
        transform: applied to the tensor inside the hook; default ``Tensor.clone`` (safe with in-place
            activations that follow). ``lambda h: h > 0`` keeps only the firing bits.
        stop_when_done: raise an internal exception once all layers are captured, so that
            :func:`run_until_captured` can skip the rest of the network (reference forward).

    Yields:
        A dict filled by each forward pass; keys are the resolved layer specs, values tensors of the
        module's output (or input) shape, e.g. ``[B, 4096, 1, 1]`` for vgg16's ``pre_logits.fc1``.

    Hooks are removed on exit, also after an exception.

    Example:
        >>> model = timm.create_model("vgg16")
        >>> with capture_preactivations(model, ["pre_logits.fc1", "pre_logits.fc2"]) as acts:
        ...     logits = model(x)
        >>> acts["pre_logits.fc1"].min() < 0   # true pre-activations, despite the in-place ReLU
    """
    specs = resolve_layers(model, layers)
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}
    fn = transform if transform is not None else torch.Tensor.clone
    handles = []

    def _record(spec: str, value) -> None:
        if isinstance(value, (tuple, list)):
            value = value[0]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"layer {spec!r} produced {type(value).__name__}, not a tensor; choose another layer")
        store[spec] = fn(value)
        if stop_when_done and len(store) == len(specs):
            raise _AllCaptured

    for spec in specs:
        name, at_input = _split(spec)
        module = modules[name]
        if at_input:
            handles.append(module.register_forward_pre_hook(lambda _m, args, spec=spec: _record(spec, args)))
        else:
            handles.append(module.register_forward_hook(lambda _m, _args, out, spec=spec: _record(spec, out)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def run_until_captured(
    model: nn.Module,
    images: torch.Tensor,
    layers: str | Sequence[str],
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``model(images)`` only as far as needed to capture ``layers``; the rest (e.g. the head) is skipped.

    Returns ``{layer: tensor}`` like :func:`capture_preactivations`.
    """
    specs = resolve_layers(model, layers)
    with capture_preactivations(model, specs, transform=transform, stop_when_done=True) as store:
        try:
            model(images)
        except _AllCaptured:
            pass
    missing = [s for s in specs if s not in store]
    if missing:
        raise RuntimeError(f"layers {missing} were not reached by the forward pass of {type(model).__name__}")
    return dict(store)
