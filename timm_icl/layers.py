"""Layer presets: which pre-activations ICL constrains in each timm family, and how to list candidates.

The paper constrains the two deepest hidden layers of VGG-16 (fc14/fc15 = timm ``pre_logits.fc1`` and
``pre_logits.fc2``). Other families get the analogous choice: the pre-activations of the two deepest
places where a non-linearity decides which units fire.

- VGG: ``pre_logits.fc1``, ``pre_logits.fc2``, the paper's fc6/fc7 (each followed by an in-place ReLU).
- ResNet / ResNeXt: the input of the final activation of the last two blocks (``act3`` in a bottleneck,
  ``act2`` in a basic block), i.e. ``bn + shortcut`` before ReLU; ``bn3``'s output alone is only the
  residual branch.
- EfficientNet / MobileNetV2 / EfficientNet-Lite: the input of ``bn1.act`` of the last block and of
  ``bn2.act`` (the head); ``BatchNormAct2d`` fuses BN and activation, so the act's input is the
  pre-activation.
- MobileNetV3: the input of ``bn1.act`` of the last block and of ``act2`` (the head conv has no BN).
- ConvNeXt, ViT / DeiT: ``mlp.fc1`` of the last two blocks (the output before GELU).
- RegNet: the input of ``act3`` of the last two blocks (``conv3`` + shortcut, before ReLU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .capture import INPUT_SUFFIX, capture_preactivations, resolve_layers

__all__ = ["default_layers", "candidate_layers", "LAYER_PRESETS"]

_TORCH_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus,
)  # fmt: skip


def _timm_activations() -> tuple[type, ...]:
    """timm's own activation modules (``timm.layers.activations``: GELU, GELUTanh, QuickGELU, Swish, HardSwish,
    Mish, ...; and the memory-efficient ``*Me`` variants), which are not subclasses of torch's."""
    import inspect

    found: list[type] = []
    for module_name in ("timm.layers.activations", "timm.layers.activations_me"):
        try:
            module = __import__(module_name, fromlist=["_"])
        except ImportError:
            continue
        found += [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, nn.Module) and cls.__module__ == module.__name__
        ]
    return tuple(found)


_ACTIVATIONS = _TORCH_ACTIVATIONS + _timm_activations()


def _vgg(model: nn.Module) -> list[str]:
    return ["pre_logits.fc1", "pre_logits.fc2"]


def _blocks_of_stages(stages: list[nn.Module], prefixes: list[str]) -> list[tuple[str, nn.Module]]:
    blocks = []
    for prefix, stage in zip(prefixes, stages):
        for name, block in stage.named_children():
            blocks.append((f"{prefix}.{name}", block))
    return blocks


def _resnet(model: nn.Module) -> list[str]:
    stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
    blocks = _blocks_of_stages(stages, [f"layer{i}" for i in range(1, 5)])
    out = []
    for name, block in blocks[-2:]:
        act = "act3" if hasattr(block, "act3") else "act2"
        out.append(f"{name}.{act}{INPUT_SUFFIX}")
    return out


def _efficientnet(model: nn.Module) -> list[str]:
    last_stage = len(model.blocks) - 1
    last_block = len(model.blocks[last_stage]) - 1
    block = model.blocks[last_stage][last_block]
    out = []
    if hasattr(block, "bn1") and hasattr(block.bn1, "act"):
        out.append(f"blocks.{last_stage}.{last_block}.bn1.act{INPUT_SUFFIX}")
    if hasattr(model, "bn2") and hasattr(model.bn2, "act"):
        out.append(f"bn2.act{INPUT_SUFFIX}")
    elif hasattr(model, "act2"):
        out.append(f"act2{INPUT_SUFFIX}")
    return out


def _transformer_mlp(prefix: str) -> Callable[[nn.Module], list[str]]:
    def preset(model: nn.Module) -> list[str]:
        names = [n for n, _ in model.named_modules() if n.startswith(prefix) and n.endswith(".mlp.fc1")]
        return names[-2:]

    return preset


def _regnet(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if n.startswith("s4.") and n.endswith(".act3")]
    return [n + INPUT_SUFFIX for n in names[-2:]]


#: timm model class name -> function returning the preset layer specs for that model.
LAYER_PRESETS: dict[str, Callable[[nn.Module], list[str]]] = {
    "VGG": _vgg,
    "ResNet": _resnet,
    "EfficientNet": _efficientnet,
    "MobileNetV3": _efficientnet,
    "ConvNeXt": _transformer_mlp("stages."),
    "VisionTransformer": _transformer_mlp("blocks."),
    "RegNet": _regnet,
}


def default_layers(model: nn.Module) -> list[str]:
    """The constrained-layer preset for ``model``'s family (see the module docstring table).

    Raises:
        ValueError: no preset for this family; the message says how to choose layers.
    """
    family = type(model).__name__
    # walk the class hierarchy so that subclasses (timm_icl's SmallVGG is a VGG) share their parent's preset
    preset = next((LAYER_PRESETS[c.__name__] for c in type(model).__mro__ if c.__name__ in LAYER_PRESETS), None)
    layers = preset(model) if preset is not None else []
    if not layers:
        raise ValueError(
            f"timm_icl has no layer preset for {family} models; list candidate pre-activation layers with "
            f"`timm-icl layers MODEL` (or timm_icl.candidate_layers(model)) and pass layers=[...] explicitly, "
            f"e.g. layers=['blocks.10.mlp.fc1'] or ['stages.3.0.act:input']"
        )
    return layers


def candidate_layers(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> list[dict]:
    """Places where a pre-activation can be captured, deepest last, with output shapes.

    Candidates are the inputs of activation modules (``name:input``) and the outputs of modules that an
    activation follows in ``named_modules`` order (convs/linears such as ``mlp.fc1``). Shapes come from
    one forward pass of a zero image at ``input_size`` (default: the model's pretrained config). Specs that
    capture the same tensor (``mlp.fc1`` and ``mlp.act:input``) are listed once: the default preset's spec,
    else the module's output name.

    Returns:
        list of ``{"layer": spec, "shape": [C, ...], "units": int, "default": bool}``.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    specs: list[str] = []
    for i, (name, module) in enumerate(named):
        if isinstance(module, _ACTIVATIONS):
            specs.append(name + INPUT_SUFFIX)
            prev_name, prev = named[i - 1] if i > 0 else (None, None)
            if isinstance(prev, (nn.Linear, nn.Conv2d)) and prev_name.rsplit(".", 1)[0] == name.rsplit(".", 1)[0]:
                specs.append(prev_name)
    try:
        defaults = set(default_layers(model))
    except ValueError:
        defaults = set()
    for d in defaults:
        if d not in specs:
            specs.append(d)
    specs = resolve_layers(model, specs)
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = tuple(cfg.get("input_size", (3, 224, 224)))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    with torch.no_grad(), capture_preactivations(model, specs, transform=lambda t: t[0:1].detach()) as acts:
        model(torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    # one tensor, one row: the hook's views share the captured tensor's storage, so equal (pointer, shape, stride)
    # means the same tensor reached two hooks (a linear's output is the next activation's input)
    same: dict[tuple, list[str]] = {}
    for spec in specs:
        if spec in acts:
            t = acts[spec]
            same.setdefault((t.data_ptr(), tuple(t.shape), t.stride()), []).append(spec)
    keep = {min(group, key=lambda s: (s not in defaults, s.endswith(INPUT_SUFFIX))) for group in same.values()}
    out = []
    for spec in specs:
        if spec in keep:
            shape = list(acts[spec].shape[1:])
            out.append(
                {"layer": spec, "shape": shape, "units": int(torch.Size(shape).numel()), "default": spec in defaults}
            )
    return out
