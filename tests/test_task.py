"""ICLTask: frozen reference kept out of training and checkpoints, loss composition, device handling."""

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_icl
from timm_icl import ICLTask, apply_distortions, capture_preactivations, icl_loss


def _model(seed=0, name="vgg_tiny"):
    torch.manual_seed(seed)
    return timm.create_model(name)


def test_reference_frozen_after_optimizer_steps():
    task = ICLTask(_model(), constraint="icl", seed=0)
    ref_before = {k: v.clone() for k, v in task.reference.state_dict().items()}
    student_before = {k: v.clone() for k, v in task.trainable_module.state_dict().items()}
    opt = torch.optim.SGD(task.trainable_module.parameters(), lr=0.1)
    task.train()
    for _ in range(3):
        out = task(torch.rand(8, 3, 28, 28), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert all(torch.equal(v, ref_before[k]) for k, v in task.reference.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in task.trainable_module.state_dict().items())
    assert not task.reference.training and task.trainable_module.training
    assert all(not p.requires_grad for p in task.reference.parameters())


def test_reference_absent_from_parameters_and_state_dict():
    task = ICLTask(_model(), constraint="icl")
    ref_ids = {id(p) for p in task.reference.parameters()}
    assert not ref_ids & {id(p) for p in task.trainable_module.parameters()}
    assert not ref_ids & {id(p) for p in task.parameters()}
    keys = list(task.state_dict())
    assert keys and all(k.startswith("trainable_module.") for k in keys)
    assert task.get_eval_model() is task.trainable_module
    assert set(task.get_checkpoint_state()["state_dict"]) == set(task.trainable_module.state_dict())


def test_lambda_zero_is_plain_cross_entropy_on_distorted_images():
    model = _model()
    task = ICLTask(model, constraint="icl", constraint_weight=0.0, seed=5)
    images, target = torch.rand(6, 3, 28, 28), torch.randint(0, 10, (6,))
    out = task(images, target)
    # replay the sampler's draw by hand
    sampler = timm_icl.DistortionSampler(seed=5)
    kinds, sigmas = sampler.sample(6)
    distorted = apply_distortions(images, kinds, sigmas, generator=sampler._generator(images.device))
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, -1, 1, 1)
    expected = F.cross_entropy(model((distorted - mean) / std), target)
    assert float(out["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float(out["task_loss"]) == pytest.approx(float(expected.detach()), rel=1e-6)
    plain = ICLTask(_model(), constraint="none", seed=5)
    assert plain.reference is None and float(plain(images, target)["constraint_loss"]) == 0.0


def test_loss_is_ce_plus_lambda_icl_against_reference_on_clean_images():
    model = _model()
    task = ICLTask(model, constraint="icl", constraint_weight=0.25, seed=1)
    images, target = torch.rand(4, 3, 28, 28), torch.randint(0, 10, (4,))
    with torch.no_grad():  # make the student differ from the reference
        model.pre_logits.fc1.bias.add_(0.05)
    out = task(images, target)
    sampler = timm_icl.DistortionSampler(seed=1)
    kinds, sigmas = sampler.sample(4)
    distorted = apply_distortions(images, kinds, sigmas, generator=sampler._generator(images.device))
    layers = ["pre_logits.fc1", "pre_logits.fc2"]
    with torch.no_grad():
        with capture_preactivations(task.reference, layers) as ref:
            task.reference(task.normalize(images))
        with capture_preactivations(model, layers) as stu:
            logits = model(task.normalize(distorted))
    expected = F.cross_entropy(logits, target) + 0.25 * icl_loss(stu, ref, alpha=100.0)
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(out["constraint_loss"]) == pytest.approx(float(icl_loss(stu, ref)), rel=1e-5)


def test_mse_and_ab_constraints_and_defaults():
    mse = ICLTask(_model(), constraint="mse")
    assert mse.constraint_weight == 0.05
    bits = mse.reference_targets(torch.rand(2, 3, 28, 28))
    assert bits["pre_logits.fc1"].dtype == torch.float32  # MSE needs values
    icl = ICLTask(_model(), constraint="icl")
    assert icl.constraint_weight == 0.1
    assert icl.reference_targets(torch.rand(2, 3, 28, 28))["pre_logits.fc1"].dtype == torch.bool
    ab = ICLTask(_model(), constraint="ab", seed=0)
    out = ab(torch.rand(2, 3, 28, 28), torch.randint(0, 10, (2,)))
    assert float(out["constraint_loss"]) > 0


def test_rejects_normalised_input_with_clear_message():
    task = ICLTask(_model())
    with pytest.raises(ValueError, match="un-normalised images \\(uint8, or float in \\[0, 1\\]"):
        task(torch.randn(2, 3, 28, 28) * 2, torch.zeros(2, dtype=torch.long))


def test_empty_batch_is_a_clear_error():
    task = ICLTask(_model())
    with pytest.raises(ValueError, match="non-empty batch of images"):
        task(torch.empty(0, 3, 28, 28), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty batch of images"):
        task(torch.empty(0, 3, 28, 28, dtype=torch.uint8), torch.empty(0, dtype=torch.long))


def test_uint8_batches_equal_float_batches():
    """Loaders yield uint8; the task converts on the device (x / 255) and gives the float path's numbers exactly."""
    images8 = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    target = torch.randint(0, 10, (4,))
    model = _model()
    with torch.no_grad():
        model.pre_logits.fc1.bias.add_(0.05)
    outs = []
    for images in (images8, images8.float() / 255):
        task = ICLTask(model, constraint="icl", seed=3)
        outs.append(task(images, target))
        assert torch.equal(task.normalize(images), task.normalize(images8.float().div(255)))
        bits = task.reference_targets(images)
        assert torch.equal(bits["pre_logits.fc1"], task.reference_targets(images8)["pre_logits.fc1"])
    assert torch.equal(outs[0]["loss"], outs[1]["loss"]) and torch.equal(outs[0]["output"], outs[1]["output"])


def test_other_backbone_resnet_with_input_layers():
    task = ICLTask(_model(name="test_resnet"), seed=0, constraint="icl")
    assert all(layer.endswith(":input") for layer in task.layers)
    out = task(torch.rand(2, 3, 32, 32), torch.randint(0, 1000, (2,)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and float(out["constraint_loss"]) > 0


def test_bf16_reference_copy_stays_bf16():
    task = ICLTask(_model(), reference_dtype=torch.bfloat16)
    task.float()
    assert next(task.reference.parameters()).dtype == torch.bfloat16
    assert next(task.trainable_module.parameters()).dtype == torch.float32
    bits = task.reference_targets(torch.rand(2, 3, 28, 28))
    assert bits["pre_logits.fc2"].dtype == torch.bool


def test_jsd_constraint_is_timms_jsd_cross_entropy_on_distorted_clean_distorted_views():
    from timm.loss import JsdCrossEntropy

    model = _model()
    task = ICLTask(model, constraint="jsd", constraint_weight=3.0, seed=2)
    assert task.reference is None  # the consistency baseline needs no reference network
    images, target = torch.rand(4, 3, 28, 28), torch.randint(0, 10, (4,))
    out = task(images, target)
    sampler = timm_icl.DistortionSampler(seed=2)  # replay the two draws: a distorted view, then another
    views = []
    for _ in range(2):
        kinds, sigmas = sampler.sample(4)
        views.append(apply_distortions(images, kinds, sigmas, generator=sampler._generator(images.device)))
    with torch.no_grad():
        logits = model(task.normalize(torch.cat([views[0], images, views[1]])))
    expected = JsdCrossEntropy(num_splits=3, alpha=3.0, smoothing=0.0)(logits, target.repeat(3))
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(out["task_loss"]) == pytest.approx(float(F.cross_entropy(logits[:4], target)), rel=1e-5)
    assert torch.allclose(out["output"].detach(), logits[:4], atol=1e-5) and float(out["constraint_loss"]) > 0
    assert ICLTask(_model(), constraint="jsd").constraint_weight == 12.0  # AugMix's / timm's alpha


def test_icl_plus_jsd_is_ce_plus_lambda_icl_on_first_view_plus_weight_jsd_over_views():
    from timm.loss import JsdCrossEntropy

    model = _model()
    reference = _model()  # the same weights: a frozen copy made before any step
    task = ICLTask(model, constraint="icl+jsd", constraint_weight=0.3, jsd_weight=5.0, seed=4)
    images, target = torch.rand(4, 3, 28, 28), torch.randint(0, 10, (4,))
    out = task(images, target)
    sampler = timm_icl.DistortionSampler(seed=4)  # replay the two draws: a distorted view, then another
    views = []
    for _ in range(2):
        kinds, sigmas = sampler.sample(4)
        views.append(apply_distortions(images, kinds, sigmas, generator=sampler._generator(images.device)))
    layers = list(task.layers)
    with torch.no_grad():
        with capture_preactivations(model, layers) as acts:
            logits = model(task.normalize(torch.cat([views[0], images, views[1]])))
        with capture_preactivations(reference, layers) as ref:
            reference(task.normalize(images))
        first = {k: v[:4] for k, v in acts.items()}
        icl = icl_loss(first, {k: v > 0 for k, v in ref.items()}, alpha=100.0)
    jsd_ce = JsdCrossEntropy(num_splits=3, alpha=5.0, smoothing=0.0)(logits, target.repeat(3))
    assert float(out["loss"].detach()) == pytest.approx(float(jsd_ce + 0.3 * icl), rel=1e-5)
    assert float(out["constraint_loss"]) == pytest.approx(float(icl), rel=1e-5) and float(icl) > 0
    ce = F.cross_entropy(logits[:4], target)
    assert float(out["consistency_loss"]) == pytest.approx(float((jsd_ce - ce) / 5.0), rel=1e-4)
    assert torch.allclose(out["output"].detach(), logits[:4], atol=1e-5)
    # cached targets (the reference's firing bits on the clean images) give the same loss
    task2 = ICLTask(_model(), constraint="icl+jsd", constraint_weight=0.3, jsd_weight=5.0, seed=4)
    bits = task2.reference_targets(images)
    assert float(task2(images, target, reference_targets=bits)["loss"].detach()) == pytest.approx(
        float(out["loss"].detach()), rel=1e-6
    )
    assert task.reference is not None and ICLTask(_model(), constraint="icl+jsd").jsd_weight == 12.0


def test_timm_task_protocol_compile_then_prepare_distributed(tmp_path):
    """timm's training loop calls ``task.compile()`` then ``task.prepare_distributed(...)`` (timm.task.TrainingTask;
    the base class's versions do nothing): ICLTask compiles and DDP-wraps the student only, the capture hooks still
    fire, the frozen reference stays a plain module and ``get_eval_model`` is the plain student again."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    images, labels = torch.rand(4, 3, 28, 28), torch.randint(0, 10, (4,))
    eager = ICLTask(_model(), constraint="icl", seed=3)(images, labels)
    task = ICLTask(_model(), constraint="icl", seed=3)
    student, reference = task.trainable_module, task.reference
    compiled = task.compile(backend="eager")
    assert compiled is task.trainable_module and compiled is not student and task.get_eval_model() is student
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert task.prepare_distributed() is task
        assert isinstance(task.trainable_module, DistributedDataParallel)
        assert task.reference is reference and not isinstance(task.reference, DistributedDataParallel)
        assert task.get_eval_model() is student
        out = task(images, labels)
        out["loss"].backward()
    finally:
        dist.destroy_process_group()
    for key in ("loss", "task_loss", "constraint_loss"):
        assert float(out[key].detach()) == pytest.approx(float(eager[key].detach()), rel=1e-5)
    assert float(out["constraint_loss"].detach()) > 0 and all(p.grad is not None for p in student.parameters())
