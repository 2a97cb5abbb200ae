"""Finite loss and gradients for every finite input: huge log-ratios, fp16/bf16, empty rows,
padding that holds -inf, zero-std groups."""

import itertools

import numpy as np
import pytest
import torch

import sapo
from tests.algorithms.reference import random_batch, reference_loss

LOSS_TYPES = ["sapo", "grpo", "gspo"]
AGGREGATIONS = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def loss_and_grad(logp, old, adv, mask, **kw):
    x = logp.detach().clone().requires_grad_()
    if kw.get("aggregation") == "seq-mean-token-sum-norm":
        kw.setdefault("max_tokens", logp.shape[1])
    out = sapo.policy_loss(x, old, adv, mask, **kw)
    out.loss.backward()
    return out, x.grad


def assert_finite(out, grad):
    assert torch.isfinite(out.loss).item(), out.loss
    assert torch.isfinite(grad).all(), grad
    assert all(np.isfinite(v) for v in out.metrics.values()), out.metrics


@pytest.mark.parametrize("loss_type,aggregation", list(itertools.product(LOSS_TYPES, AGGREGATIONS)))
@pytest.mark.parametrize("magnitude", [1e4, 88.0, 30.0])
def test_huge_log_ratios_float32(loss_type, aggregation, magnitude):
    B, T = 4, 6
    signs = torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.5, -0.5]]).repeat(B, 1)
    old = torch.full((B, T), -magnitude / 2)
    logp = old + magnitude * signs
    adv = torch.tensor([2.0, -2.0, 0.0, -0.5])
    out, grad = loss_and_grad(logp, old, adv, torch.ones(B, T), loss_type=loss_type, aggregation=aggregation,
                              beta=0.1, ref_logprobs=old)
    assert_finite(out, grad)
    assert out.metrics["log_ratio/abs_max"] == pytest.approx(magnitude)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(loss_type, dtype):
    logp, old, adv, mask = random_batch(0)
    x = torch.tensor(logp, dtype=dtype, requires_grad=True)
    out = sapo.policy_loss(x, torch.tensor(old, dtype=dtype), torch.tensor(adv, dtype=dtype), torch.tensor(mask),
                           loss_type=loss_type)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert x.grad.dtype == dtype
    # Same as float32 on the same (rounded) values: nothing was computed in half precision.
    rounded = [torch.tensor(a, dtype=dtype).double().numpy() for a in (logp, old, adv)]
    ref_loss, ref_grad = reference_loss(*rounded, mask, loss_type=loss_type)
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    tol = {torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]  # the gradient is rounded to dtype
    np.testing.assert_allclose(x.grad.double().numpy(), ref_grad, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("loss_type,aggregation", list(itertools.product(LOSS_TYPES, AGGREGATIONS)))
def test_fp16_extremes_stay_finite(loss_type, aggregation):
    # exp overflows fp16 above 11; log-ratios up to the fp16 range, and negative advantages on
    # r >> 1, whose GRPO gradient A*r exceeds fp16's largest value before the clamp.
    B, T = 3, 5
    logp = torch.tensor([[0.0, -60000.0, -5.0, -0.1, -11.5]] * B, dtype=torch.float16)
    old = torch.tensor([[-60000.0, 0.0, -20.0, -0.1, -0.0]] * B, dtype=torch.float16)
    adv = torch.tensor([-3.0, 3.0, 0.0], dtype=torch.float16)
    out, grad = loss_and_grad(logp, old, adv, torch.ones(B, T), loss_type=loss_type, aggregation=aggregation)
    assert grad.dtype == torch.float16
    assert_finite(out, grad)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_rows_and_padding_with_inf(loss_type):
    logp, old, adv, mask = (torch.tensor(a) for a in random_batch(1))
    logp = torch.where(mask > 0, logp, -torch.inf)  # padded positions may hold anything
    old = torch.where(mask > 0, old, torch.nan)
    out, grad = loss_and_grad(logp.float(), old.float(), adv.float(), mask, loss_type=loss_type, beta=0.1,
                              ref_logprobs=torch.where(mask > 0, old, torch.inf).float())
    assert torch.isfinite(out.loss)
    assert torch.isfinite(grad[mask > 0]).all()
    assert (grad[mask == 0] == 0).all()
    assert all(np.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("loss_type,aggregation", list(itertools.product(LOSS_TYPES, AGGREGATIONS)))
def test_fully_masked_batch_gives_zero_loss_and_gradient(loss_type, aggregation):
    B, T = 3, 4
    out, grad = loss_and_grad(torch.randn(B, T), torch.randn(B, T), torch.randn(B), torch.zeros(B, T),
                              loss_type=loss_type, aggregation=aggregation)
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0
    assert out.metrics["ratio/mean"] == 0.0 and out.metrics["ratio/max"] == 1.0


@pytest.mark.parametrize("B,T", [(0, 5), (3, 0), (0, 0)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_batch(B, T, loss_type):
    z = torch.zeros(B, T)
    out, grad = loss_and_grad(z, z, torch.zeros(B), torch.ones(B, T), loss_type=loss_type, ref_logprobs=z, beta=0.1,
                              importance_weights=z + 1)
    assert out.loss.item() == 0.0 and grad.shape == (B, T) and torch.count_nonzero(grad) == 0
    assert_finite(out, grad)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_std_groups_give_zero_gradient(loss_type):
    G = 4
    rewards = torch.tensor([1.0] * G + [0.0] * G + [0.3] * G)  # three constant groups
    adv = sapo.group_advantages(rewards, G)
    assert torch.equal(adv, torch.zeros_like(adv))
    logp, old, _, mask = random_batch(2, B=3 * G)
    out, grad = loss_and_grad(torch.tensor(logp), torch.tensor(old), adv, torch.tensor(mask), loss_type=loss_type)
    assert out.loss.item() == 0.0 and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("others, adv", [(0.0, 1.0), (20.0 / 99, -1.0)])
def test_gspo_sequence_ratio_sees_a_token_beyond_the_clamp(others, adv):
    # One token at l = -25 among 99: GSPO's s = exp(mean l) must include it, and the token keeps
    # its gradient. With the others at +20/99, s = 0.951 is outside the band and (A < 0) the whole
    # sequence is clipped; a per-token clamp to -20 would put s at 1.0 and miss it.
    old = torch.zeros(1, 100, dtype=torch.float64)
    logp = torch.full((1, 100), others, dtype=torch.float64)
    logp[0, 7] = -25.0
    A, mask = torch.tensor([adv], dtype=torch.float64), torch.ones(1, 100)
    out, grad = loss_and_grad(logp, old, A, mask, loss_type="gspo")
    want_loss, want_grad = reference_loss(logp.numpy(), old.numpy(), A.numpy(), mask.numpy(), loss_type="gspo")
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-12, atol=1e-300)
    s = np.exp((25.0 - 99 * others) / -100)
    assert out.metrics["gspo/seq_ratio_mean"] == pytest.approx(s)
    if adv > 0:
        assert grad[0, 7].item() == pytest.approx(-s / 100) and want_grad[0, 7] != 0
    else:
        assert out.metrics["gspo/seq_clip_frac"] == 1.0 and torch.count_nonzero(grad) == 0


def test_gspo_clamps_the_sequence_mean():
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.tensor([[30.0, 30.0, 30.0], [-30.0, -30.0, -30.0]], dtype=torch.float64)
    out, grad = loss_and_grad(logp, old, torch.tensor([-1.0, 1.0]), torch.ones(2, 3), loss_type="gspo")
    assert_finite(out, grad)
    assert torch.count_nonzero(grad) == 0  # beyond the clamp, as GRPO's tokens: no gradient
    assert out.metrics["gspo/seq_ratio_max"] == pytest.approx(np.exp(sapo.LOG_RATIO_CLAMP))
    assert out.metrics["gspo/seq_ratio_min"] == pytest.approx(np.exp(-sapo.LOG_RATIO_CLAMP))


def test_clamp_zeroes_the_gradient_only_beyond_the_bound():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[19.0, 21.0, -21.0]], dtype=torch.float64)
    out, grad = loss_and_grad(logp, old, torch.tensor([-1.0]), torch.ones(1, 3), loss_type="grpo")
    assert grad[0, 0].item() == pytest.approx(np.exp(19.0) / 3)  # -A * r / |y|
    assert grad[0, 1].item() == 0.0 and grad[0, 2].item() == 0.0
    assert out.metrics["ratio/max"] == pytest.approx(np.exp(sapo.LOG_RATIO_CLAMP))


NONFINITE_ARGS = ["logprobs", "old_logprobs", "advantages", "token_advantages", "ref_logprobs", "importance_weights"]


def batch_with_nan_padding(B=2, T=3):
    """Inputs whose masked position (0, T-1) holds NaN in every tensor, as padding may."""
    mask = torch.ones(B, T)
    mask[0, -1] = 0
    pad = torch.zeros(B, T)
    pad[0, -1] = torch.nan
    kw = {"logprobs": pad - 1.0, "old_logprobs": pad - 1.2, "advantages": torch.tensor([1.0, -1.0]),
          "token_advantages": pad + 0.5, "ref_logprobs": pad - 1.1, "importance_weights": pad + 1.0}
    return kw, mask


def call_policy_loss(kw, mask, **extra):
    token, adv = kw.pop("token_advantages", None), kw.pop("advantages")
    adv = adv if token is None else token
    return sapo.policy_loss(kw.pop("logprobs"), kw.pop("old_logprobs"), adv, mask, beta=0.1, **kw, **extra)


@pytest.mark.parametrize("name", NONFINITE_ARGS)
@pytest.mark.parametrize("value", [torch.nan, torch.inf, -torch.inf])
def test_nonfinite_unmasked_inputs_are_errors_naming_the_argument(name, value):
    kw, mask = batch_with_nan_padding()
    if name != "token_advantages":
        kw.pop("token_advantages")
    assert torch.isfinite(call_policy_loss(dict(kw), mask).loss)  # NaN padding alone is fine
    if name == "advantages":
        kw[name][1] = value
    else:
        kw[name] = kw[name].clone()
        kw[name][1, 1] = value
    argument = "advantages" if name == "token_advantages" else name
    with pytest.raises(ValueError, match=rf"^{argument} is NaN or infinite at {3 if name == 'advantages' else 1} "
                                         r"position\(s\) where mask is nonzero; only masked \(padding\) positions"):
        call_policy_loss(dict(kw), mask)
    out = call_policy_loss(dict(kw), mask, check_finite=False)  # the trainer's path: it checks by itself
    assert out.loss.dtype == torch.float32

