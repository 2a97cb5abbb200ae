"""Users add their own objective by name, and bad names or inputs get a clear error."""

import numpy as np
import pytest
import torch

import sapo
from sapo.algorithms import registry


@pytest.fixture
def clean_registry():
    saved = dict(registry.POLICY_LOSSES._entries)
    yield
    registry.POLICY_LOSSES._entries.clear()
    registry.POLICY_LOSSES._entries.update(saved)


def test_builtins_are_registered():
    assert {"sapo", "grpo", "gspo"} <= set(sapo.available_policy_losses())
    assert sapo.available_aggregations() == sorted(
        ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
def test_custom_loss_runs_through_policy_loss(clean_registry, aggregation):
    seen = {}

    @sapo.register_policy_loss("linear_test_gate")
    def linear(inputs: sapo.PolicyLossInputs, settings: sapo.PolicyLossSettings) -> sapo.TokenLoss:
        seen["settings"] = settings
        seen["masked_ratio"] = inputs.ratio[inputs.mask == 0]
        return sapo.TokenLoss(loss=-inputs.ratio * inputs.advantages,
                              metrics={"linear/ratio_sum": (inputs.ratio * inputs.mask).sum(), "linear/const": 2.5})

    assert "linear_test_gate" in sapo.available_policy_losses()
    B, T = 3, 4
    logp = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    old = logp.detach() + 0.1 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[2, 2:] = 0
    ref = old - 0.05
    iw = torch.full((B, T), 0.5, dtype=torch.float64)
    out = sapo.policy_loss(logp, old, adv, mask, loss_type="linear_test_gate", aggregation=aggregation, tau_pos=0.7,
                           beta=0.2, ref_logprobs=ref, importance_weights=iw)
    out.loss.backward()
    assert seen["settings"].tau_pos == 0.7
    assert torch.all(seen["masked_ratio"] == 1.0)  # padding is zeroed before the objective sees it
    assert out.metrics["linear/ratio_sum"] > 0 and out.metrics["linear/const"] == 2.5
    # The same machinery as the built-ins: importance weights, KL and aggregation applied once.
    r = torch.exp(logp.detach() - old)
    d = ref - logp.detach()
    per_token = -r * adv[:, None] * 0.5 + 0.2 * (torch.exp(d) - d - 1)
    expected = sapo.aggregate(per_token, mask.double(), aggregation)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_registering_another_function_under_a_taken_name_is_an_error(clean_registry):
    with pytest.raises(ValueError, match="already registered"):
        @sapo.register_policy_loss("sapo")
        def impostor(inputs, settings):
            raise AssertionError

    fn = registry.get_policy_loss("sapo")
    assert sapo.register_policy_loss("sapo")(fn) is fn  # re-registering the same one is harmless


def args(B=2, T=3):
    return torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B), torch.ones(B, T)


@pytest.mark.parametrize("kwargs,message", [
    (dict(loss_type="sapoo"), r"loss_type='sapoo' is not known.*Did you mean 'sapo'"),
    (dict(aggregation="seq-mean"), r"aggregation='seq-mean' is not known"),
    (dict(aggregation="token_mean"), r"Did you mean 'token-mean'"),
    (dict(aggregation="seq-mean-token-sum-norm"), r"pass max_tokens"),
    (dict(aggregation="seq-mean-token-sum-norm", max_tokens=0), r"pass max_tokens"),
    (dict(beta=0.1), r"pass ref_logprobs"),
    (dict(beta=-1.0), r"beta must be a non-negative"),
    (dict(tau_pos=0.0), r"tau_pos must be a positive"),
    (dict(tau_neg=float("nan")), r"tau_neg must be a positive"),
    (dict(epsilon=-0.1), r"epsilon must be a non-negative"),
    (dict(epsilon=1.0), r"epsilon must be below 1"),
    (dict(epsilon_high="0.2"), r"epsilon_high must be a non-negative"),
])
def test_bad_settings_are_errors_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sapo.policy_loss(*args(), **kwargs)


@pytest.mark.parametrize("which,bad,message", [
    (0, torch.zeros(2, 3, 1), r"logprobs must be a floating-point tensor of shape \(B, T\)"),
    (0, torch.zeros(2, 3, dtype=torch.long), r"logprobs must be a floating-point"),
    (1, torch.zeros(2, 4), r"old_logprobs must have the shape of logprobs \(2, 3\), got \(2, 4\)"),
    (2, torch.zeros(3), r"advantages must have shape \(B,\) = \(2,\) or \(B, T\)"),
    (3, torch.ones(3, 2), r"mask must have the shape"),
])
def test_bad_shapes_are_errors(which, bad, message):
    a = list(args())
    a[which] = bad
    with pytest.raises(ValueError, match=message):
        sapo.policy_loss(*a)


def test_optional_tensors_are_shape_checked():
    with pytest.raises(ValueError, match="importance_weights must have the shape"):
        sapo.policy_loss(*args(), importance_weights=torch.ones(2))
    with pytest.raises(ValueError, match="ref_logprobs must have the shape"):
        sapo.policy_loss(*args(), ref_logprobs=torch.ones(3, 3), beta=0.1)


def test_every_registered_name_is_usable():
    logp = torch.randn(2, 3, requires_grad=True)
    for loss_type in sapo.available_policy_losses():
        for aggregation in sapo.available_aggregations():
            out = sapo.policy_loss(logp, logp.detach() + 0.1, torch.tensor([1.0, -1.0]), torch.ones(2, 3),
                                   loss_type=loss_type, aggregation=aggregation, max_tokens=4)
            assert np.isfinite(out.loss.item())
