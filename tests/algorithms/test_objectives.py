"""The gate functions themselves, and a property-based comparison of every objective with the
float64 reference over random shapes, masks and advantages."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import sapo
from tests.algorithms.reference import reference_loss

R = torch.linspace(0.0, 4.0, 401, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.05, 2.0])
def test_soft_gate_value_and_derivative(tau):
    assert sapo.soft_gate(torch.tensor(1.0, dtype=torch.float64), tau).item() == pytest.approx(2 / tau)
    r = R.clone().requires_grad_()
    sapo.soft_gate(r, tau).sum().backward()
    expected = 1 / torch.cosh(tau * (R - 1) / 2) ** 2
    torch.testing.assert_close(r.grad, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(sapo.soft_gate_weight(R, tau), expected, rtol=1e-12, atol=1e-15)
    assert sapo.soft_gate_weight(torch.tensor(1.0), tau).item() == 1.0


def test_soft_gate_derivative_is_accurate_in_float32_far_from_one():
    # sigmoid's own backward forms p(1-p), which cancels once p ~ 1; the gate must not.
    r = torch.tensor([3.0, 8.0, 16.0, 30.0], requires_grad=True)
    sapo.soft_gate(r, 1.0).sum().backward()
    expected = 1 / np.cosh((r.detach().double().numpy() - 1) / 2) ** 2
    np.testing.assert_allclose(r.grad.double().numpy(), expected, rtol=1e-5)


def test_soft_gate_weight_is_symmetric_and_larger_tau_decays_faster():
    d = torch.linspace(0.05, 3.0, 60, dtype=torch.float64)
    for tau in (0.5, 1.0, 2.0):
        torch.testing.assert_close(sapo.soft_gate_weight(1 + d, tau), sapo.soft_gate_weight(1 - d, tau))
        assert torch.all(sapo.soft_gate_weight(1 + d, 1.5 * tau) < sapo.soft_gate_weight(1 + d, tau))
        assert torch.all(sapo.soft_gate_weight(1 + d, tau) > 0)  # no zero-gradient band
        assert torch.all(torch.diff(sapo.soft_gate_weight(1 + d, tau)) < 0)


def test_hard_gate_is_the_clipped_ratio_with_zero_gradient_outside_the_band():
    R = torch.linspace(0.00123, 4.00123, 401, dtype=torch.float64)  # no point on a band edge
    r = R.clone().requires_grad_()
    positive = torch.ones_like(R, dtype=torch.bool)
    sapo.hard_gate(r, positive, 0.2, 0.28).sum().backward()
    torch.testing.assert_close(r.grad, (R < 1.28).double())
    r.grad = None
    sapo.hard_gate(r, ~positive, 0.2, 0.28).sum().backward()
    torch.testing.assert_close(r.grad, (R > 0.8).double())
    f = sapo.hard_gate(R, positive, 0.2, 0.28)
    torch.testing.assert_close(f, torch.clamp(R, max=1.28))


finite = st.floats(-3.0, 3.0, allow_nan=False, width=64)


@st.composite
def batches(draw):
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 6))
    old = draw(arrays(np.float64, (B, T), elements=st.floats(-6.0, 0.0, width=64)))
    log_ratio = draw(arrays(np.float64, (B, T), elements=finite))
    mask = draw(arrays(np.bool_, (B, T)))
    token_adv = draw(st.booleans())
    adv = draw(arrays(np.float64, (B, T) if token_adv else (B,), elements=st.floats(-3.0, 3.0, width=64)))
    return old + log_ratio, old, adv, mask.astype(np.float64)


def _off_band(logp, old, adv, mask, loss_type, eps_low, eps_high):
    """True unless some ratio sits within 1e-9 of a clip edge, where the reference and float
    rounding may legitimately pick different sides."""
    if loss_type == "sapo":
        return True
    l = logp - old
    if loss_type == "gspo":
        l = (l * mask).sum(1, keepdims=True) / np.maximum(mask.sum(1, keepdims=True), 1)
    r = np.exp(l)
    return bool(np.all(np.abs(r - (1 + eps_high)) > 1e-9) and np.all(np.abs(r - (1 - eps_low)) > 1e-9))


@settings(max_examples=120, deadline=None)
@given(batch=batches(), loss_type=st.sampled_from(["sapo", "grpo", "gspo"]),
       aggregation=st.sampled_from(["seq-mean-token-mean", "token-mean", "seq-mean-token-sum",
                                    "seq-mean-token-sum-norm"]),
       taus=st.tuples(st.floats(0.1, 5.0), st.floats(0.1, 5.0)))
def test_every_objective_matches_reference_on_any_shape_and_mask(batch, loss_type, aggregation, taus):
    logp, old, adv, mask = batch
    kw = dict(loss_type=loss_type, aggregation=aggregation, max_tokens=7, tau_pos=taus[0], tau_neg=taus[1],
              epsilon=0.1, epsilon_high=0.15)
    if not _off_band(logp, old, adv, mask, loss_type, 0.1, 0.15):
        return
    ref_loss, ref_grad = reference_loss(logp, old, adv, mask, **kw)
    x = torch.tensor(logp, requires_grad=True)
    out = sapo.policy_loss(x, torch.tensor(old), torch.tensor(adv), torch.tensor(mask), **kw)
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), ref_grad, rtol=1e-9, atol=1e-12)
    assert np.all(x.grad.numpy()[mask == 0] == 0)
