"""Layer presets per timm family: the preset captures real pre-activations (negatives present, equal to a
manual computation of the non-linearity's input) and ICLTask trains a step on each family's tiny model."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_icl  # noqa: F401
from timm_icl import ICLTask, candidate_layers, capture_preactivations, default_layers

FAMILIES = [
    # (model name, kwargs, input size, expected preset)
    ("vgg_tiny", {}, 28, ["pre_logits.fc1", "pre_logits.fc2"]),
    ("test_resnet", {"zero_init_last": False}, 32, None),
    ("test_efficientnet", {}, 32, ["blocks.4.0.bn1.act:input", "bn2.act:input"]),
    ("mobilenetv3_small_050", {}, 32, ["blocks.5.0.bn1.act:input", "act2:input"]),
    ("test_convnext", {}, 32, ["stages.3.blocks.0.mlp.fc1", "stages.3.blocks.1.mlp.fc1"]),
    ("test_vit", {}, 64, ["blocks.4.mlp.fc1", "blocks.5.mlp.fc1"]),
    ("regnetx_002", {"zero_init_last": False}, 32, ["s4.b6.act3:input", "s4.b7.act3:input"]),
]


@pytest.mark.parametrize("name, kwargs, size, expected", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_preset_captures_preactivations_and_trains(name, kwargs, size, expected):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    layers = default_layers(model)
    if expected is not None:
        assert layers == expected
    assert len(layers) == 2
    x = torch.rand(2, 3, size, size)
    model.eval()
    with torch.no_grad(), capture_preactivations(model, layers) as acts:
        model(x)
    for layer in layers:
        assert float(acts[layer].min()) < 0 < float(acts[layer].max()), layer
    # every image left clean (clean_fraction 1): the student's pre-activations are those of x itself, so the
    # constraint is checked against its formula, BCE-with-logits(alpha * h_student, 1[h_reference > 0])
    reference = copy.deepcopy(model).eval()
    task = ICLTask(model, seed=0, clean_fraction=1.0)
    task.train()
    labels = torch.randint(0, model.num_classes, (2,))
    out = task(x, labels)
    out["loss"].backward()
    normalized = task.normalize(x)
    with torch.no_grad(), capture_preactivations(reference, layers) as ref_acts:
        reference(normalized)
    student = copy.deepcopy(model).train()
    with torch.no_grad(), capture_preactivations(student, layers) as acts:
        student(normalized)
    expected = torch.stack(
        [F.binary_cross_entropy_with_logits(100.0 * acts[k].float(), (ref_acts[k] > 0).float()) for k in layers]
    ).mean()
    torch.testing.assert_close(out["constraint_loss"], expected, rtol=1e-4, atol=1e-6)
    assert float(expected) > 0.01  # the student is in training mode: not the reference's exact firing pattern


def test_resnet_preset_is_block_sum_before_relu():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", zero_init_last=False).eval()
    layer = default_layers(model)[-1]  # "layer4.0.act2:input" (basic block) or act3 (bottleneck)
    block_name = layer.rsplit(".", 1)[0]
    block = model.get_submodule(block_name)
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    with torch.no_grad(), capture_preactivations(model, [layer]) as acts:
        model(torch.rand(2, 3, 32, 32))
    handle.remove()
    with torch.no_grad():
        x = seen["x"]
        shortcut = block.downsample(x) if block.downsample is not None else x
        h = block.act1(block.bn1(block.conv1(x)))
        if hasattr(block, "bn3"):
            h = block.act2(block.bn2(block.conv2(h)))
            branch = block.bn3(block.conv3(h))
        else:
            branch = block.bn2(block.conv2(h))
    assert torch.allclose(acts[layer], branch + shortcut, atol=1e-5)


def test_vit_preset_is_fc1_before_gelu():
    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    layer = default_layers(model)[-1]
    block = model.blocks[5]
    seen = {}
    handle = block.norm2.register_forward_hook(lambda m, a, o: seen.__setitem__("n", o.clone()))
    with torch.no_grad(), capture_preactivations(model, [layer]) as acts:
        model(torch.rand(1, 3, 64, 64))
    handle.remove()
    expected = F.linear(seen["n"], block.mlp.fc1.weight, block.mlp.fc1.bias)
    assert torch.allclose(acts[layer], expected, atol=1e-5)


def test_candidate_layers_marks_default_and_gives_shapes():
    model = timm.create_model("vgg_tiny")
    rows = candidate_layers(model)
    by_name = {r["layer"]: r for r in rows}
    assert by_name["pre_logits.fc1"]["default"] and by_name["pre_logits.fc2"]["default"]
    assert by_name["pre_logits.fc1"]["shape"] == [256, 1, 1] and by_name["pre_logits.fc1"]["units"] == 256
    assert by_name["features.0"]["shape"] == [16, 28, 28] and not by_name["features.0"]["default"]


def test_candidate_layers_list_each_tensor_once():
    # Swin: mlp.fc1's output is mlp.act's input; the list used to show both names for one tensor
    model = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    names = [r["layer"] for r in candidate_layers(model, input_size=(3, 224, 224))]
    assert "layers.3.blocks.0.mlp.fc1" in names and "layers.3.blocks.0.mlp.act:input" not in names
    assert len(names) == len(set(names))
    # vgg_tiny: the conv's output feeds the ReLU: listed under the conv's name; the preset is kept as is
    rows = candidate_layers(timm.create_model("vgg_tiny"))
    assert [r["layer"] for r in rows] == ["features.0", "features.3", "features.6", "features.8"] + [
        "pre_logits.fc1",
        "pre_logits.fc2",
    ]
    assert [r["layer"] for r in rows if r["default"]] == default_layers(timm.create_model("vgg_tiny"))


def test_layers_hint_pasted_into_the_recipe_runs(capsys):
    import sys
    from pathlib import Path

    from timm_icl.cli import main as cli_main

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import train_icl

    assert cli_main(["layers", "test_resnet", "--input-size", "3", "32", "32"]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert hint.startswith("* default preset (ResNet): --layers ")
    flag, value = hint.split(": ", 1)[1].split(" ")  # one value, as the recipe parses it
    args = train_icl.parse_settings(
        ["--model", "test_resnet", "--no-pretrained", "--allow-random-reference", flag, value, "--distortions", "small"]
    )
    model = timm.create_model("test_resnet", num_classes=5)
    task = train_icl.create_task(args, model, 0, torch.device("cpu"))
    assert list(task.layers) == value.split(",") == default_layers(model)
    torch.manual_seed(0)
    out = task(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 5, (4,)))
    assert torch.isfinite(out["loss"]) and out["constraint_loss"] > 0
