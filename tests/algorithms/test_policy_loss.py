"""policy_loss against the independent float64 reference, autograd's gradcheck, and the
identities of the spec."""

import math

import numpy as np
import pytest
import torch

import sapo
from tests.algorithms.reference import random_batch, reference_loss

LOSS_TYPES = ["sapo", "grpo", "gspo"]
AGGREGATIONS = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def run(logp, old, adv, mask, dtype=torch.float32, **kw):
    logp_t = torch.tensor(logp, dtype=dtype, requires_grad=True)
    out = sapo.policy_loss(logp_t, torch.tensor(old, dtype=dtype), torch.tensor(adv, dtype=dtype),
                           torch.tensor(mask), **kw)
    out.loss.backward()
    return out, logp_t.grad


def kwargs_for(loss_type, aggregation):
    kw = dict(loss_type=loss_type, aggregation=aggregation)
    if aggregation == "seq-mean-token-sum-norm":
        kw["max_tokens"] = 12
    if loss_type == "gspo":
        # GSPO's own 3e-4 band clips nearly every random sequence: widen it so both sides show.
        kw.update(epsilon=0.3, epsilon_high=0.4)
    return kw


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("token_adv", [False, True])
def test_matches_float64_reference(loss_type, aggregation, token_adv):
    for seed in range(3):
        logp, old, adv, mask = random_batch(seed, token_adv=token_adv)
        kw = kwargs_for(loss_type, aggregation)
        ref_loss, ref_grad = reference_loss(logp, old, adv, mask, **kw)
        out, grad = run(logp, old, adv, mask, torch.float32, **kw)
        assert out.loss.dtype == torch.float32
        assert out.loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
        np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-4, atol=1e-6)
        out64, grad64 = run(logp, old, adv, mask, torch.float64, **kw)
        assert out64.loss.item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-14)
        np.testing.assert_allclose(grad64.numpy(), ref_grad, rtol=1e-10, atol=1e-13)


def test_gradients_are_nonzero_where_the_reference_says_so():
    # Guards the reference test against passing on all-zero gradients.
    logp, old, adv, mask = random_batch(0)
    for loss_type in LOSS_TYPES:
        _, grad = reference_loss(logp, old, adv, mask, **kwargs_for(loss_type, "seq-mean-token-mean"))
        assert (np.abs(grad) > 1e-6).sum() >= 5, loss_type
    _, grad = reference_loss(logp, old, adv, mask, loss_type="grpo")
    _, grad_sapo = reference_loss(logp, old, adv, mask, loss_type="sapo")
    assert ((grad == 0) & (mask > 0) & (adv[:, None] != 0)).any(), "some GRPO tokens should be clipped"
    assert (np.abs(grad_sapo[(mask > 0) & (adv[:, None] != 0)]) > 0).all(), "SAPO never zeroes a token"


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kl_and_importance_weights_match_reference(loss_type, beta):
    logp, old, adv, mask = random_batch(7)
    gen = np.random.default_rng(1)
    ref = logp + gen.uniform(-1, 1, size=logp.shape)
    iw = gen.uniform(0.0, 2.0, size=logp.shape)
    kw = kwargs_for(loss_type, "seq-mean-token-mean")
    ref_loss, ref_grad = reference_loss(logp, old, adv, mask, ref_logprobs=ref, beta=beta, importance_weights=iw, **kw)
    out, grad = run(logp, old, adv, mask, torch.float64, ref_logprobs=torch.tensor(ref), beta=beta,
                    importance_weights=torch.tensor(iw), **kw)
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10, atol=1e-13)
    m = mask > 0
    d = ref - logp
    assert out.metrics["kl/mean"] == pytest.approx((np.exp(d) - d - 1)[m].mean(), rel=1e-10)
    assert out.metrics["importance_weights/mean"] == pytest.approx(iw[m].mean(), rel=1e-10)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_gradcheck_float64(loss_type, aggregation):
    logp, old, adv, mask = random_batch(3, B=4, T=5, spread=0.5)
    kw = kwargs_for(loss_type, aggregation)
    old_t, adv_t, mask_t = torch.tensor(old), torch.tensor(adv), torch.tensor(mask)

    def f(x):
        return sapo.policy_loss(x, old_t, adv_t, mask_t, **kw).loss

    assert torch.autograd.gradcheck(f, (torch.tensor(logp, requires_grad=True),), eps=1e-7, atol=1e-8)


def test_at_ratio_one_all_objectives_give_the_plain_policy_gradient():
    logp, _, adv, mask = random_batch(11)
    lengths = np.maximum(mask.sum(1, keepdims=True), 1)
    plain = -adv[:, None] * mask / lengths / mask.shape[0]  # d(-J)/d log pi with r == 1
    for loss_type in LOSS_TYPES:
        for tau in (0.5, 1.0, 3.0):
            _, grad = run(logp, logp, adv, mask, torch.float64, loss_type=loss_type, tau_pos=tau, tau_neg=2 * tau)
            np.testing.assert_allclose(grad.numpy(), plain, rtol=1e-12, atol=1e-15, err_msg=loss_type)
    for loss_type in ("grpo", "gspo"):  # zero clip widths: r = 1 sits on both band edges, inside the band
        _, grad = run(logp, logp, adv, mask, torch.float64, loss_type=loss_type, epsilon=0.0, epsilon_high=0.0)
        np.testing.assert_allclose(grad.numpy(), plain, rtol=1e-12, atol=1e-15, err_msg=loss_type)


def test_sapo_token_gradient_is_minus_a_sech2_r():
    logp, old, adv, mask = random_batch(5, token_adv=True)
    tau_pos, tau_neg = 0.8, 1.7
    _, grad = run(logp, old, adv, mask, torch.float64, tau_pos=tau_pos, tau_neg=tau_neg, aggregation="token-mean")
    r = np.exp(logp - old)
    tau = np.where(adv > 0, tau_pos, tau_neg)
    expected = -adv / np.cosh(tau * (r - 1) / 2) ** 2 * r * mask / mask.sum()
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_sapo_loss_at_ratio_one_is_two_over_tau():
    B, T = 3, 4
    zeros, mask = torch.zeros(B, T), torch.ones(B, T)
    for tau in (0.5, 1.0, 1.05, 4.0):
        pos = sapo.policy_loss(zeros, zeros, torch.ones(B), mask, tau_pos=tau, tau_neg=9.0)
        neg = sapo.policy_loss(zeros, zeros, -torch.ones(B), mask, tau_pos=9.0, tau_neg=tau)
        assert pos.loss.item() == pytest.approx(-2 / tau, rel=1e-6)
        assert neg.loss.item() == pytest.approx(2 / tau, rel=1e-6)


def test_tau_neg_applies_when_advantage_is_not_positive():
    logp, old, _, mask = random_batch(2)
    B = logp.shape[0]
    for adv in (-np.abs(np.random.default_rng(0).normal(size=B)) - 0.1, np.zeros(B)):
        base, g_base = run(logp, old, adv, mask, torch.float64, tau_pos=1.0, tau_neg=1.05)
        moved_pos, g_pos = run(logp, old, adv, mask, torch.float64, tau_pos=3.0, tau_neg=1.05)
        moved_neg, _ = run(logp, old, adv, mask, torch.float64, tau_pos=1.0, tau_neg=3.0)
        assert moved_pos.loss.item() == base.loss.item()
        assert torch.equal(g_pos, g_base)
        assert moved_pos.metrics["sapo/gate_weight_mean"] == base.metrics["sapo/gate_weight_mean"]
        assert moved_neg.metrics["sapo/gate_weight_mean"] != base.metrics["sapo/gate_weight_mean"]
    # and tau_pos for A > 0
    pos_adv = np.ones(B)
    a, _ = run(logp, old, pos_adv, mask, torch.float64, tau_pos=1.0, tau_neg=3.0)
    b, _ = run(logp, old, pos_adv, mask, torch.float64, tau_pos=3.0, tau_neg=3.0)
    assert a.loss.item() != b.loss.item()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_advantage_gives_zero_gradient(loss_type):
    logp, old, _, mask = random_batch(4)
    out, grad = run(logp, old, np.zeros(logp.shape[0]), mask, loss_type=loss_type)
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0


def test_gspo_one_far_token_zeroes_its_sequence_sapo_damps_only_that_token():
    T = 8
    old = torch.full((1, T), -1.0, dtype=torch.float64)
    logp = old.clone()
    logp[0, 3] += 3.0  # one token far off-policy, the rest on-policy
    mask, adv = torch.ones(1, T), torch.ones(1)
    grads = {}
    for loss_type in ("gspo", "sapo"):
        x = logp.clone().requires_grad_()
        sapo.policy_loss(x, old, adv, mask, loss_type=loss_type).loss.backward()
        grads[loss_type] = x.grad[0]
    assert torch.count_nonzero(grads["gspo"]) == 0
    on_policy = torch.cat([grads["sapo"][:3], grads["sapo"][4:]])
    torch.testing.assert_close(on_policy, torch.full_like(on_policy, -1.0 / T))
    assert 0 > grads["sapo"][3] > -1e-3 / T


def test_metrics_match_their_definitions():
    logp, old, adv, mask = random_batch(9, token_adv=True)
    m = mask > 0
    r = np.exp(logp - old)
    out, _ = run(logp, old, adv, mask, torch.float64, loss_type="sapo", tau_pos=1.0, tau_neg=4.0)
    tau = np.where(adv > 0, 1.0, 4.0)
    w = 1 / np.cosh(tau * (r - 1) / 2) ** 2
    expected = {
        "ratio/mean": r[m].mean(), "ratio/min": r[m].min(), "ratio/max": r[m].max(),
        "log_ratio/abs_max": np.abs(logp - old)[m].max(),
        "advantages/mean": adv[m].mean(), "advantages/min": adv[m].min(), "advantages/max": adv[m].max(),
        "sapo/gate_weight_mean": w[m].mean(),
        "sapo/weighted_ratio_mean": (w * r)[m].mean(),
        "sapo/damped_frac_low": ((w < 0.5) & (r < 1))[m].mean(),
        "sapo/damped_frac_high": ((w < 0.5) & (r > 1))[m].mean(),
    }
    for k, v in expected.items():
        assert out.metrics[k] == pytest.approx(v, rel=1e-10, abs=1e-12), k
    assert 0 < out.metrics["sapo/damped_frac_high"] and 0 < out.metrics["sapo/damped_frac_low"]

    out, _ = run(logp, old, adv, mask, torch.float64, loss_type="grpo")
    low = (r < 0.8) & (adv < 0)
    high = (r > 1.2) & (adv > 0)
    assert out.metrics["grpo/clip_frac_low"] == pytest.approx(low[m].mean())
    assert out.metrics["grpo/clip_frac_high"] == pytest.approx(high[m].mean())
    assert out.metrics["grpo/clip_frac"] == pytest.approx((low | high)[m].mean())
    assert 0 < out.metrics["grpo/clip_frac_low"] and 0 < out.metrics["grpo/clip_frac_high"]

    logp, old, adv, mask = random_batch(9, spread=0.3)
    out, _ = run(logp, old, adv, mask, torch.float64, loss_type="gspo", epsilon=0.005, epsilon_high=0.01)
    lengths = mask.sum(1)
    nonempty = lengths > 0
    s = np.exp(((logp - old) * mask).sum(1)[nonempty] / lengths[nonempty])
    a = adv[nonempty]
    clipped = ((s > 1.01) & (a > 0)) | ((s < 0.995) & (a < 0))
    assert out.metrics["gspo/seq_clip_frac"] == pytest.approx(clipped.mean())
    assert out.metrics["gspo/seq_ratio_mean"] == pytest.approx(s.mean())
    assert out.metrics["gspo/seq_ratio_max"] == pytest.approx(s.max())
    assert 0 < out.metrics["gspo/seq_clip_frac"] < 1


def test_gspo_defaults_are_its_tight_band():
    # r within GRPO's band but outside GSPO's: only GRPO lets the gradient through.
    T = 4
    old = torch.zeros(1, T, dtype=torch.float64)
    logp = torch.full((1, T), math.log(1.001), dtype=torch.float64)
    for loss_type, expect_zero in (("gspo", True), ("grpo", False)):
        x = logp.clone().requires_grad_()
        sapo.policy_loss(x, old, torch.ones(1), torch.ones(1, T), loss_type=loss_type).loss.backward()
        assert (torch.count_nonzero(x.grad) == 0) == expect_zero, loss_type
    x = logp.clone().requires_grad_()
    sapo.policy_loss(x, old, torch.ones(1), torch.ones(1, T), loss_type="gspo", epsilon_high=2e-3).loss.backward()
    assert torch.count_nonzero(x.grad) == T
