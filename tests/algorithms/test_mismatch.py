"""The importance weights of each correction mode against a float64 computation by hand."""

import math

import pytest
import torch

from sapo.algorithms.mismatch import MODES, CorrectionSettings, importance_weights

OLD = [[-1.0, -2.0, -0.5, 0.0], [-0.2, -3.0, -1.0, -1.0], [-4.0, -0.1, 0.0, 0.0]]
ROLLOUT = [[-1.5, -1.0, -0.6, 0.0], [-0.2, -1.0, -1.2, -1.0], [-1.0, -0.1, 0.0, 0.0]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]


def by_hand(mode: str, low: float | None, high: float | None):
    """Weights (lists of lists) and masked token count, one token at a time in float64."""
    lo, hi = (low if low is not None else -math.inf), (high if high is not None else math.inf)
    weights, masked = [], 0
    for old, new, mask in zip(OLD, ROLLOUT, MASK):
        ratios = [math.exp(o - n) for o, n, m in zip(old, new, mask) if m]
        if mode.startswith("sequence"):
            ratios = [math.prod(ratios)] * len(ratios)
        if mode.endswith("truncate"):
            row = [min(max(r, lo), hi) for r in ratios]
        else:
            row = [0.0 if (r < lo or r > hi) else r for r in ratios]
            masked += sum(1 for r in ratios if r < lo or r > hi)
        weights.append(row + [0.0] * (len(mask) - len(row)))
    return weights, masked


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("low,high", [(None, 3.0), (0.5, 2.0), (None, None)])
def test_weights_and_masked_fraction_match_a_computation_by_hand(mode, low, high):
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    weights, metrics = importance_weights(t(OLD), t(ROLLOUT), t(MASK), CorrectionSettings(mode, low, high))
    expected, masked = by_hand(mode, low, high)
    assert torch.allclose(weights.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    tokens = sum(map(sum, MASK))
    assert metrics["rollout/is_masked_frac"] == pytest.approx(masked / tokens)
    applied = [w for row, m in zip(expected, MASK) for w, k in zip(row, m) if k]
    assert metrics["rollout/is_weight_mean"] == pytest.approx(sum(applied) / tokens, rel=1e-5)
    assert metrics["rollout/is_weight_max"] == pytest.approx(max(applied), rel=1e-5)
    k3 = [math.expm1(o - n) - (o - n) for old, new, mask in zip(OLD, ROLLOUT, MASK)
          for o, n, m in zip(old, new, mask) if m]
    assert metrics["rollout/mismatch_kl"] == pytest.approx(sum(k3) / tokens, rel=1e-5)


def test_equal_log_probabilities_give_weights_of_one_and_no_mismatch():
    old = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    for mode in MODES:
        weights, metrics = importance_weights(old, old.clone(), mask, CorrectionSettings(mode))
        assert torch.equal(weights, torch.ones(3, 5)) and metrics["rollout/mismatch_kl"] == 0.0


def test_a_huge_sequence_ratio_is_masked_or_capped_without_overflow():
    old = torch.full((1, 200), 0.0)
    rollout = torch.full((1, 200), -5.0)  # ratio e^1000 for the sequence
    for mode in MODES:
        weights, metrics = importance_weights(old, rollout, torch.ones(1, 200), CorrectionSettings(mode))
        assert torch.isfinite(weights).all() and all(math.isfinite(v) for v in metrics.values())
        assert weights.max() <= 3.0 + 1e-5


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'tis' is not one of"):
        importance_weights(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), CorrectionSettings("tis"))


def test_padding_may_hold_anything_and_no_bound_still_gives_finite_weights():
    old = torch.tensor([[0.0, -1.0, float("nan")], [0.0, 0.0, float("-inf")]])
    rollout = torch.tensor([[-60.0, -60.0, float("inf")], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    for mode in MODES:
        weights, metrics = importance_weights(old, rollout, mask, CorrectionSettings(mode, None, None))
        assert torch.isfinite(weights).all() and weights[:, 2].eq(0).all(), mode
        assert all(math.isfinite(v) for v in metrics.values()), (mode, metrics)
