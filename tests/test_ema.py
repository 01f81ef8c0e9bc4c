"""The task's EMA (timm's ModelEmaV3 through TrainingTask.setup_ema) against its exact formula: step 1 copies the
weights, every later step is ``ema = decay * ema + (1 - decay) * weights``; integer buffers are copied."""

import timm
import torch

import timm_icl  # noqa: F401  (registers vgg_tiny)
from timm_icl import ICLTask


def test_ema_follows_its_formula_step_by_step():
    torch.manual_seed(0)
    task = ICLTask(timm.create_model("vgg_tiny", num_classes=3), constraint="none", seed=0)
    task.setup_ema(decay=0.75)
    student = task.get_eval_model()
    expected = None
    generator = torch.Generator().manual_seed(1)
    for step in (1, 2, 3, 4):
        with torch.no_grad():  # an optimizer step, stood in for by a seeded perturbation
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        weights = {k: v.clone() for k, v in student.state_dict().items()}
        task.update_ema(step=step)
        if expected is None:
            expected = weights  # timm: decay 0 at the first step (the EMA starts at the weights)
        else:
            expected = {k: 0.75 * expected[k] + 0.25 * w if w.is_floating_point() else w for k, w in weights.items()}
        ema = task.get_eval_model(ema=True).state_dict()
        assert ema.keys() == expected.keys()
        for key, value in ema.items():
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-6, msg=f"step {step}: {key}")
    raw = student.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
