"""Constraint losses against their formulas written out by hand; stability; gradients reach only the student."""

import math

import pytest
import torch

from timm_icl import (
    ActivationBoundaryLoss,
    IntermediateConstraintLoss,
    JSDConsistencyLoss,
    MSEConstraintLoss,
    activation_boundary_loss,
    create_constraint,
    icl_loss,
    jsd_consistency_loss,
    mse_constraint_loss,
)


def _bce_by_hand(h, ref, alpha):
    total = 0.0
    for hv, rv in zip(h.flatten().tolist(), ref.flatten().tolist()):
        u = 1.0 if rv > 0 else 0.0
        d = 1 / (1 + math.exp(-alpha * hv))
        total += -(u * math.log(d) + (1 - u) * math.log(1 - d))
    return total / h.numel()


def test_icl_equals_formula_single_tensor():
    h = torch.tensor([[0.01, -0.02, 0.005], [-0.01, 0.03, -0.004]], dtype=torch.float64)
    ref = torch.tensor([[1.0, -2.0, -0.5], [0.3, 0.7, 0.0]])
    assert float(icl_loss(h, ref, alpha=100.0)) == pytest.approx(_bce_by_hand(h, ref, 100.0), rel=1e-6)
    # bits give the same loss as the float reference
    assert float(icl_loss(h, ref > 0)) == pytest.approx(float(icl_loss(h, ref)), rel=1e-7)


def test_icl_mean_per_layer_then_over_layers():
    torch.manual_seed(0)
    s = {"a": torch.randn(2, 8) * 0.01, "b": torch.randn(2, 3, 4) * 0.01}
    r = {"a": torch.randn(2, 8), "b": torch.randn(2, 3, 4)}
    expected = (_bce_by_hand(s["a"], r["a"], 100) + _bce_by_hand(s["b"], r["b"], 100)) / 2
    assert float(icl_loss(s, r)) == pytest.approx(expected, rel=1e-5)


def test_mse_and_ab_formulas():
    torch.manual_seed(1)
    s = {"a": torch.randn(3, 5), "b": torch.randn(3, 2)}
    r = {"a": torch.randn(3, 5), "b": torch.randn(3, 2)}
    mse = (((s["a"] - r["a"]) ** 2).mean() + ((s["b"] - r["b"]) ** 2).mean()) / 2
    assert float(mse_constraint_loss(s, r)) == pytest.approx(float(mse), rel=1e-6)

    def ab(h, ref, m):
        vals = []
        for hv, rv in zip(h.flatten().tolist(), ref.flatten().tolist()):
            vals.append(max(m - hv, 0) ** 2 if rv > 0 else max(m + hv, 0) ** 2)
        return sum(vals) / len(vals)

    expected = (ab(s["a"], r["a"], 0.5) + ab(s["b"], r["b"], 0.5)) / 2
    assert float(activation_boundary_loss(s, r, margin=0.5)) == pytest.approx(expected, rel=1e-6)
    # zero once every unit is on the right side with the margin
    h = torch.tensor([2.0, -2.0])
    assert float(activation_boundary_loss(h, torch.tensor([1.0, -1.0]), margin=1.0)) == 0.0


def test_stable_at_extreme_inputs():
    h = torch.tensor([1e4, -1e4, 3e4, -3e4], requires_grad=True)
    ref = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss = icl_loss(h, ref, alpha=100.0)
    assert torch.isfinite(loss)
    assert float(loss.detach()) == pytest.approx((0 + 0 + 3e6 + 3e6) / 4, rel=1e-6)
    loss.backward()
    assert torch.isfinite(h.grad).all()
    half = torch.tensor([1e4, -1e4], dtype=torch.bfloat16)
    out = icl_loss(half, torch.tensor([1.0, 1.0]))
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_gradients_reach_only_the_student():
    s = torch.randn(4, 6, requires_grad=True)
    r = torch.randn(4, 6, requires_grad=True)
    for fn in (icl_loss, mse_constraint_loss, activation_boundary_loss):
        s.grad, r.grad = None, None
        fn(s, r).backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert r.grad is None


def test_modules_equal_functions_and_registry():
    s, r = torch.randn(2, 7) * 0.1, torch.randn(2, 7)
    assert torch.equal(IntermediateConstraintLoss(alpha=10.0)(s, r), icl_loss(s, r, alpha=10.0))
    assert torch.equal(MSEConstraintLoss()(s, r), mse_constraint_loss(s, r))
    assert torch.equal(ActivationBoundaryLoss(margin=0.3)(s, r), activation_boundary_loss(s, r, margin=0.3))
    assert isinstance(create_constraint("icl", alpha=5.0), IntermediateConstraintLoss)
    assert create_constraint("none") is None
    with pytest.raises(ValueError, match="unknown constraint 'kl'"):
        create_constraint("kl")


def test_clear_errors_on_mismatch():
    with pytest.raises(ValueError, match="layers differ"):
        icl_loss({"a": torch.zeros(2)}, {"b": torch.zeros(2)})
    with pytest.raises(ValueError, match="student shape"):
        icl_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="needs float reference"):
        mse_constraint_loss(torch.zeros(2), torch.zeros(2, dtype=torch.bool))


def test_jsd_equals_its_formula_and_timms_jsd_cross_entropy():
    from timm.loss import JsdCrossEntropy

    torch.manual_seed(0)
    logits, target = torch.randn(3 * 4, 5) * 3, torch.randint(0, 5, (4,))
    # by hand: mean over the 3 views of KL(p_view || M), M = mean of the views' softmax, summed over classes,
    # averaged over the 4 images
    p = [[[math.exp(v) for v in row] for row in logits[k * 4 : (k + 1) * 4].tolist()] for k in range(3)]
    p = [[[v / sum(row) for v in row] for row in view] for view in p]
    total = 0.0
    for i in range(4):
        for c in range(5):
            m = sum(p[k][i][c] for k in range(3)) / 3
            total += sum(p[k][i][c] * math.log(p[k][i][c] / m) for k in range(3))
    assert float(jsd_consistency_loss(logits)) == pytest.approx(total / 3 / 4, rel=1e-5)
    # timm's JsdCrossEntropy = CE(first split) + alpha * JSD on the same logits (no label smoothing)
    for alpha in (12.0, 0.5):
        timm_loss = JsdCrossEntropy(num_splits=3, alpha=alpha, smoothing=0.0)(logits, target.repeat(3))
        ours = torch.nn.functional.cross_entropy(logits[:4], target) + alpha * JSDConsistencyLoss()(logits)
        assert float(ours) == pytest.approx(float(timm_loss), rel=1e-6)
    # identical views agree: zero; two views
    assert float(jsd_consistency_loss(logits[:4].repeat(3, 1))) == pytest.approx(0.0, abs=1e-6)
    two = JsdCrossEntropy(num_splits=2, alpha=1.0, smoothing=0.0)(logits[:8], target.repeat(2))
    assert float(two) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits[:4], target) + jsd_consistency_loss(logits[:8], 2)), rel=1e-6
    )
    assert isinstance(create_constraint("jsd"), JSDConsistencyLoss) and not JSDConsistencyLoss.needs_reference
    with pytest.raises(ValueError, match=r"num_splits \* B, classes\] with num_splits >= 2 \(3\), got \(10, 5\)"):
        jsd_consistency_loss(torch.zeros(10, 5))
