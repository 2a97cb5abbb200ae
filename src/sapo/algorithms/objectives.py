"""The built-in policy objectives: SAPO's soft gate and the hard-clipped GRPO and GSPO.

All three maximise the paper's unified objective J = E[ 1/G sum_i 1/|y_i| sum_t f_{i,t}(r_{i,t}) A_i ]
and differ only in the gate f (docs/algorithms.md, "Notation"). Each function here returns the per-token loss -f * A;
aggregation over tokens and sequences happens once, in :func:`sapo.policy_loss`.

The gate functions (`soft_gate`, `soft_gate_weight`, `hard_gate`) are public so that plots and
diagnostics use the very code that trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import (
    LOG_RATIO_CLAMP,
    PolicyLossInputs,
    PolicyLossSettings,
    TokenLoss,
    masked_extreme,
    masked_fraction,
    masked_mean,
    register_policy_loss,
)

GRPO_EPSILON = 0.2
GSPO_EPSILON, GSPO_EPSILON_HIGH = 3e-4, 4e-4  # GSPO paper's bands, much tighter than GRPO's


def soft_gate(ratio: Tensor, tau: Tensor | float) -> Tensor:
    """SAPO's gate f(r) = 4/tau * sigmoid(tau (r - 1))  (arXiv 2511.20347; docs/algorithms.md, "SAPO").

    Written as exp(logsigmoid(x)) so that autograd forms df/dr = 4 p sigmoid(-x) rather than
    4 p (1 - p): the latter cancels catastrophically in float32 once p is near 1.
    """
    x = tau * (ratio - 1.0)
    return (4.0 / tau) * torch.exp(F.logsigmoid(x))


def soft_gate_weight(ratio: Tensor, tau: Tensor | float) -> Tensor:
    """w = df/dr = 4 p (1 - p) = sech^2(tau (r - 1) / 2): the weight SAPO puts on a token's
    policy gradient (times r for the gradient w.r.t. log pi). w(1) = 1 for every tau."""
    x = tau * (ratio - 1.0)
    return 4.0 * torch.sigmoid(x) * torch.sigmoid(-x)


def hard_gate(ratio: Tensor, positive: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """The clipped gate of GRPO/GSPO (docs/algorithms.md, "GRPO"): min(r, 1+eps_high) where A > 0,
    max(r, 1-eps_low) where A <= 0. Equal to PPO's -min(rA, clip(r)A) / -A; its gradient is
    exactly zero outside the band. clamp, not torch.minimum against a constant: on an edge
    (r = 1 on-policy with a zero width) minimum would give half its gradient to the constant."""
    upper = ratio.clamp(max=1.0 + eps_high)
    lower = ratio.clamp(min=1.0 - eps_low)
    return torch.where(positive, upper, lower)


def _clip_widths(settings: PolicyLossSettings, eps: float, eps_high: float | None) -> tuple[float, float]:
    low = eps if settings.epsilon is None else settings.epsilon
    if settings.epsilon_high is not None:
        high = settings.epsilon_high
    else:
        high = low if eps_high is None else eps_high
    return low, high


@register_policy_loss("sapo")
def sapo_loss(inputs: PolicyLossInputs, settings: PolicyLossSettings) -> TokenLoss:
    """SAPO: -f(r) A with tau = tau_pos if A > 0 else tau_neg. Per token, the gradient w.r.t.
    log pi is -A * sech^2(tau (r-1)/2) * r: smooth, never exactly zero, and only the
    off-policy token itself is damped."""
    adv, mask, ratio = inputs.advantages, inputs.mask, inputs.ratio
    tau = torch.where(adv > 0, adv.new_tensor(settings.tau_pos), adv.new_tensor(settings.tau_neg))
    loss = -soft_gate(ratio, tau) * adv

    r = ratio.detach()
    w = soft_gate_weight(r, tau)
    damped = w < 0.5
    metrics = {
        "sapo/gate_weight_mean": masked_mean(w, mask),
        "sapo/weighted_ratio_mean": masked_mean(w * r, mask),
        "sapo/damped_frac_low": masked_fraction(damped & (r < 1), mask),
        "sapo/damped_frac_high": masked_fraction(damped & (r > 1), mask),
        "gated_frac": masked_fraction(damped, mask),
    }
    return TokenLoss(loss, metrics)


@register_policy_loss("grpo")
def grpo_loss(inputs: PolicyLossInputs, settings: PolicyLossSettings) -> TokenLoss:
    """GRPO: token-level hard clipping, -min(rA, clip(r, 1-eps, 1+eps_high) A).
    Defaults eps = eps_high = 0.2."""
    eps_low, eps_high = _clip_widths(settings, GRPO_EPSILON, None)
    adv, mask, ratio = inputs.advantages, inputs.mask, inputs.ratio
    positive = adv > 0
    loss = -hard_gate(ratio, positive, eps_low, eps_high) * adv

    r = ratio.detach()
    clipped_low = (r < 1 - eps_low) & (adv < 0)
    clipped_high = (r > 1 + eps_high) & positive
    metrics = {
        "grpo/clip_frac_low": masked_fraction(clipped_low, mask),
        "grpo/clip_frac_high": masked_fraction(clipped_high, mask),
        "grpo/clip_frac": masked_fraction(clipped_low | clipped_high, mask),
        "gated_frac": masked_fraction(clipped_low | clipped_high, mask),
    }
    return TokenLoss(loss, metrics)


@register_policy_loss("gspo")
def gspo_loss(inputs: PolicyLossInputs, settings: PolicyLossSettings) -> TokenLoss:
    """GSPO-token (docs/algorithms.md, "GSPO"): s_i = exp(mean_t l_{i,t}) and s_{i,t} = sg[s_i] * pi/sg[pi],
    hard-clipped like GRPO. With a sequence-wide advantage it has the value and gradient of the
    sequence form; it also accepts per-token advantages. Defaults eps = 3e-4, eps_high = 4e-4."""
    eps_low, eps_high = _clip_widths(settings, GSPO_EPSILON, GSPO_EPSILON_HIGH)
    adv, mask, logp = inputs.advantages, inputs.mask, inputs.logprobs
    lengths_B = mask.sum(-1)
    # The mean of the raw token log-ratios (not of the clamped ones: a single token far off
    # policy must move s_i, and keeps its gradient); only the mean is clamped, before exp.
    raw_log_ratio = (logp - inputs.old_logprobs).detach()
    raw_seq_log_ratio_B = (raw_log_ratio * mask).sum(-1) / lengths_B.clamp(min=1)
    seq_log_ratio_B = raw_seq_log_ratio_B.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    # pi/sg[pi] is exp(log pi - sg[log pi]): value 1, gradient that of log pi; none for a
    # sequence whose mean was clamped, as the token clamp does for GRPO.
    within = (raw_seq_log_ratio_B.abs() < LOG_RATIO_CLAMP).unsqueeze(-1)
    token_log_ratio = seq_log_ratio_B.unsqueeze(-1) + torch.where(within, logp - logp.detach(), 0.0)
    seq_ratio_BT = torch.exp(token_log_ratio)
    positive = adv > 0
    loss = -hard_gate(seq_ratio_BT, positive, eps_low, eps_high) * adv

    s = seq_ratio_BT.detach()
    clipped_BT = ((s > 1 + eps_high) & positive) | ((s < 1 - eps_low) & (adv < 0))
    has_tokens_B = (lengths_B > 0).to(mask.dtype)
    clipped_B = ((clipped_BT & (mask > 0)).any(-1)).to(mask.dtype)
    seq_ratio_B = torch.exp(seq_log_ratio_B)
    metrics = {
        "gspo/seq_clip_frac": masked_mean(clipped_B, has_tokens_B),
        "gspo/token_clip_frac": masked_fraction(clipped_BT, mask),
        "gated_frac": masked_fraction(clipped_BT, mask),
        "gspo/seq_ratio_mean": masked_mean(seq_ratio_B, has_tokens_B),
        "gspo/seq_ratio_min": masked_extreme(seq_ratio_B, has_tokens_B, largest=False, empty=1.0),
        "gspo/seq_ratio_max": masked_extreme(seq_ratio_B, has_tokens_B, largest=True, empty=1.0),
    }
    return TokenLoss(loss, metrics)

