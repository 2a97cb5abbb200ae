"""An independent float64 reference for the policy objectives, written token by token from the
formulas of shared/spec/algorithm.md with Python's `math`, with the gradient w.r.t. logprobs
derived by hand (not by autograd). Slow and obvious on purpose."""

from __future__ import annotations

import math

import numpy as np


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _hard_gate(r: float, adv: float, eps_low: float, eps_high: float) -> tuple[float, float]:
    """f and df/dr of the clipped gate."""
    if adv > 0:
        return (r, 1.0) if r < 1 + eps_high else (1 + eps_high, 0.0)
    return (r, 1.0) if r > 1 - eps_low else (1 - eps_low, 0.0)


def default_eps(loss_type: str, epsilon, epsilon_high) -> tuple[float, float]:
    """The issue's defaults: epsilon None -> 0.2 (grpo), 3e-4 (gspo); epsilon_high None ->
    epsilon (grpo), 4e-4 (gspo)."""
    low = epsilon if epsilon is not None else {"grpo": 0.2, "gspo": 3e-4}.get(loss_type, 0.0)
    if epsilon_high is not None:
        return low, epsilon_high
    return low, (4e-4 if loss_type == "gspo" else low)


def aggregation_weights(mask: np.ndarray, aggregation: str, max_tokens: int | None) -> np.ndarray:
    """c[i, t] = d loss / d per_token_loss[i, t]."""
    B, _ = mask.shape
    nseq = max(B, 1)
    if aggregation == "seq-mean-token-mean":
        lengths = np.maximum(mask.sum(1, keepdims=True), 1)
        return mask / lengths / nseq
    if aggregation == "token-mean":
        return mask / max(mask.sum(), 1)
    if aggregation == "seq-mean-token-sum":
        return mask / nseq
    if aggregation == "seq-mean-token-sum-norm":
        return mask / (nseq * max_tokens)
    raise ValueError(aggregation)


def reference_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    loss_type="sapo",
    tau_pos=1.0,
    tau_neg=1.05,
    epsilon=None,
    epsilon_high=None,
    aggregation="seq-mean-token-mean",
    max_tokens=None,
    ref_logprobs=None,
    beta=0.0,
    importance_weights=None,
):
    """Returns (loss, d loss / d logprobs as a (B, T) array)."""
    logp = np.asarray(logprobs, dtype=np.float64)
    old = np.asarray(old_logprobs, dtype=np.float64)
    m = (np.asarray(mask) != 0).astype(np.float64)
    adv = np.asarray(advantages, dtype=np.float64)
    if adv.ndim == 1:
        adv = np.repeat(adv[:, None], logp.shape[1], axis=1)
    eps_low, eps_high = default_eps(loss_type, epsilon, epsilon_high)
    c = aggregation_weights(m, aggregation, max_tokens)
    B, T = logp.shape
    loss, grad = 0.0, np.zeros((B, T))
    for i in range(B):
        valid = [t for t in range(T) if m[i, t]]
        seq_l = sum(logp[i, t] - old[i, t] for t in valid) / max(len(valid), 1)
        s = math.exp(seq_l)
        for t in valid:
            l = logp[i, t] - old[i, t]
            r = math.exp(l)
            A = adv[i, t]
            if loss_type == "sapo":
                tau = tau_pos if A > 0 else tau_neg
                f = 4.0 / tau * _sigmoid(tau * (r - 1))
                w = 1.0 / math.cosh(tau * (r - 1) / 2) ** 2  # sech^2
                tok, g = -f * A, -w * r * A
            elif loss_type == "grpo":
                f, df = _hard_gate(r, A, eps_low, eps_high)
                tok, g = -f * A, -df * r * A
            elif loss_type == "gspo":
                # GSPO-token: s_it has the value s_i and d s_it / d logp_it = s_i.
                f, df = _hard_gate(s, A, eps_low, eps_high)
                tok, g = -f * A, -df * s * A
            else:
                raise ValueError(loss_type)
            if importance_weights is not None:
                iw = float(importance_weights[i][t])
                tok, g = tok * iw, g * iw
            if beta > 0:
                d = float(ref_logprobs[i][t]) - logp[i, t]
                tok += beta * (math.exp(d) - d - 1)
                g += beta * (1 - math.exp(d))
            loss += c[i, t] * tok
            grad[i, t] = c[i, t] * g
    return loss, grad


def random_batch(seed: int, B: int = 6, T: int = 9, *, spread: float = 2.0, token_adv: bool = False):
    """Off-policy float64 inputs: log-ratios uniform in +-spread, ragged masks with one empty
    row, advantages of both signs and one exactly zero."""
    gen = np.random.default_rng(seed)
    old = -gen.uniform(0.05, 4.0, size=(B, T))
    logp = old + gen.uniform(-spread, spread, size=(B, T))
    lengths = gen.integers(1, T + 1, size=B)
    lengths[1 % B] = 0
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    adv = gen.normal(size=(B, T) if token_adv else (B,))
    adv.flat[0] = 0.0
    return logp, old, adv, mask
