"""Pre-activation capture: true outputs despite in-place activations, module inputs, patterns, hook cleanup."""

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_icl  # noqa: F401  (registers vgg_tiny)
from timm_icl import capture_preactivations, default_layers, resolve_layers, run_until_captured


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return timm.create_model("vgg16").eval()


def test_vgg16_fc1_fc2_true_preactivations(vgg16):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), capture_preactivations(vgg16, ["pre_logits.fc1", "pre_logits.fc2"]) as acts:
        vgg16(x)
        # manual computation of fc1's output: features -> (adaptive pool up to 7x7, as ConvMlp does) -> conv
        feats = vgg16.features(x)
        pooled = F.adaptive_avg_pool2d(feats, (7, 7))
        fc1 = vgg16.pre_logits.fc1(pooled)
        fc2 = vgg16.pre_logits.fc2(F.relu(fc1))
    assert acts["pre_logits.fc1"].shape == (1, 4096, 1, 1)
    assert torch.allclose(acts["pre_logits.fc1"], fc1, atol=1e-5)
    assert torch.allclose(acts["pre_logits.fc2"], fc2, atol=1e-5)
    # the in-place ReLU that follows did not overwrite the captured values
    assert float(acts["pre_logits.fc1"].min()) < 0 and float(acts["pre_logits.fc2"].min()) < 0
    assert default_layers(vgg16) == ["pre_logits.fc1", "pre_logits.fc2"]


def test_resnet_output_and_activation_input():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", zero_init_last=False).eval()
    block = model.layer1[0]
    act = "act3" if hasattr(block, "act3") else "act2"
    last_bn = "bn3" if hasattr(block, "bn3") else "bn2"
    layers = [f"layer1.0.{last_bn}", f"layer1.0.{act}:input"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), capture_preactivations(model, layers) as acts:
        stem = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        model(x)
    with torch.no_grad():
        # manual: block forward up to the last BN, plus the shortcut
        h = stem
        residual = block.downsample(stem) if block.downsample is not None else stem
        h = block.act1(block.bn1(block.conv1(h)))
        if last_bn == "bn3":
            h = block.act2(block.bn2(block.conv2(h)))
            branch = block.bn3(block.conv3(h))
        else:
            branch = block.bn2(block.conv2(h))
    assert torch.allclose(acts[f"layer1.0.{last_bn}"], branch, atol=1e-5)
    assert torch.allclose(acts[f"layer1.0.{act}:input"], branch + residual, atol=1e-5)
    assert float(acts[f"layer1.0.{last_bn}"].min()) < 0
    assert float(acts[f"layer1.0.{act}:input"].min()) < 0


def test_batchnormact_input_equals_batchnorm_by_hand():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet").eval()
    bn = model.bn2  # BatchNormAct2d: BN then (in-place) activation inside one module
    with torch.no_grad():  # non-trivial running stats so the check means something
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    handle = model.conv_head.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o.clone()))
    with torch.no_grad(), capture_preactivations(model, ["bn2.act:input"]) as acts:
        model(x)
    handle.remove()
    expected = F.batch_norm(seen["conv"], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert torch.allclose(acts["bn2.act:input"], expected, atol=1e-5)
    assert float(acts["bn2.act:input"].min()) < 0


def test_gradients_flow_through_captured_tensor():
    model = timm.create_model("vgg_tiny")
    with capture_preactivations(model, "pre_logits.fc1") as acts:
        model(torch.rand(2, 3, 28, 28))
    acts["pre_logits.fc1"].sum().backward()
    assert model.pre_logits.fc1.weight.grad is not None and model.head.fc.weight.grad is None


def test_hooks_removed_on_exit_and_on_exception():
    model = timm.create_model("vgg_tiny")
    before = _hook_count(model)
    with capture_preactivations(model, ["pre_logits.*"]) as acts:
        assert _hook_count(model) > before
        model(torch.rand(1, 3, 28, 28))
    assert _hook_count(model) == before
    assert set(acts) == {
        "pre_logits.fc1",
        "pre_logits.act1",
        "pre_logits.drop",
        "pre_logits.fc2",
        "pre_logits.act2",
    }
    with pytest.raises(RuntimeError, match="boom"):
        with capture_preactivations(model, ["pre_logits.fc1"]):
            raise RuntimeError("boom")
    assert _hook_count(model) == before


def test_unknown_layer_lists_close_matches():
    model = timm.create_model("vgg_tiny")
    with pytest.raises(ValueError, match="did you mean 'pre_logits.fc1'"):
        resolve_layers(model, ["pre_logits.fc_1"])
    with pytest.raises(ValueError, match="matches no module"):
        resolve_layers(model, ["blocks.*.mlp.fc1"])


def test_patterns_resolve_in_module_order():
    model = timm.create_model("test_vit")
    assert resolve_layers(model, ["blocks.*.mlp.fc1"])[-2:] == ["blocks.4.mlp.fc1", "blocks.5.mlp.fc1"]
    assert resolve_layers(model, ["blocks.5.mlp.fc1", "blocks.1.mlp.fc1"]) == ["blocks.1.mlp.fc1", "blocks.5.mlp.fc1"]


def test_run_until_captured_skips_the_head_and_matches_full_forward():
    model = timm.create_model("vgg_tiny").eval()
    calls = []
    handle = model.head.register_forward_hook(lambda *a: calls.append(1))
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        early = run_until_captured(model, x, ["pre_logits.fc1", "pre_logits.fc2"])
        assert calls == []
        with capture_preactivations(model, ["pre_logits.fc1", "pre_logits.fc2"]) as full:
            model(x)
    handle.remove()
    assert len(calls) == 1
    for k in full:
        assert torch.equal(early[k], full[k])
    bits = run_until_captured(model, x, ["pre_logits.fc1"], transform=lambda h: h > 0)
    assert bits["pre_logits.fc1"].dtype == torch.bool
    assert torch.equal(bits["pre_logits.fc1"], full["pre_logits.fc1"] > 0)


def test_default_layers_error_for_unknown_family():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ValueError, match="timm-icl layers MODEL"):
        default_layers(model)
