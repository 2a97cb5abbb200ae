"""Train/inference mismatch correction (docs/algorithms.md, "Rollouts from another engine").

An engine other than the training forward (a bfloat16 copy of the policy, vLLM) samples from
pi_rollout, slightly different from the trainer's own pi_old of the same tokens. The objective is
an expectation under pi_old, so each token's term is reweighted by rho = pi_old / pi_rollout
(token level) or by the sequence's product of them (sequence level), truncated to [C_min, C_max]
or masked to 0 outside it. The four modes carry TRL's names (verl's: token_truncate = TIS,
token_mask / sequence_mask = MIS, the rejection-sampling variants); pure tensor functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass(frozen=True)
class CorrectionSettings:
    """TRL's vllm_importance_sampling_mode, _clip_min and _clip_max."""

    mode: str = "sequence_mask"
    """One of MODES."""
    clip_min: float | None = None
    """C_min: truncated modes raise weights below it to it, mask modes zero them (None: no bound)."""
    clip_max: float | None = 3.0
    """C_max: truncated modes cap weights at it, mask modes zero weights above it (None: no bound)."""


# Largest log-weight kept before exp: a weight of e^80 (1e34) stays finite in float32, so an
# extreme sequence can never give inf (and inf * 0 = NaN at a masked position).
MAX_LOG_WEIGHT = 80.0


def importance_weights(old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor,
                       settings: CorrectionSettings) -> tuple[Tensor, dict[str, float]]:
    """(B, T) float32 weights rho for `policy_loss(importance_weights=...)`, 0 at padding, and
    the step's metrics over the unmasked tokens: `rollout/mismatch_kl` (k3 estimate of
    KL(pi_rollout || pi_old) = E[rho - 1 - log rho] under pi_rollout), `rollout/is_weight_mean`
    and `rollout/is_weight_max` (of the weights applied) and `rollout/is_masked_frac` (tokens
    whose weight a mask mode set to 0). Masked positions may hold anything, even inf or NaN."""
    if settings.mode not in MODES:
        raise ValueError(f"importance sampling mode {settings.mode!r} is not one of {list(MODES)}")
    valid_BT = mask_BT != 0
    m_BT = valid_BT.to(torch.float32)
    token_log_rho_BT = torch.where(valid_BT, old_logp_BT.float() - rollout_logp_BT.float(), 0.0)
    log_rho_BT = token_log_rho_BT
    if settings.mode.startswith("sequence"):
        # One ratio per sequence: the product of its tokens' ratios, applied to each of them.
        log_rho_BT = log_rho_BT.sum(-1, keepdim=True).expand_as(log_rho_BT)
    low = math.log(settings.clip_min) if settings.clip_min else -math.inf
    high = math.inf if settings.clip_max is None else math.log(settings.clip_max)
    if settings.mode.endswith("truncate"):
        rho_BT = log_rho_BT.clamp(min=low, max=high).clamp(max=MAX_LOG_WEIGHT).exp()
        masked_BT = torch.zeros_like(valid_BT)
    else:
        masked_BT = ((log_rho_BT < low) | (log_rho_BT > high)) & valid_BT
        rho_BT = torch.where(masked_BT, 0.0, log_rho_BT.clamp(max=min(high, MAX_LOG_WEIGHT)).exp())
    rho_BT = torch.where(valid_BT, rho_BT, 0.0)
    n = m_BT.sum().clamp(min=1.0)
    bounded_BT = token_log_rho_BT.clamp(-MAX_LOG_WEIGHT, MAX_LOG_WEIGHT)  # a finite metric for any input
    k3_BT = torch.expm1(bounded_BT) - bounded_BT
    metrics = torch.stack([(k3_BT * m_BT).sum() / n, (rho_BT * m_BT).sum() / n,
                           rho_BT.masked_fill(~valid_BT, 0.0).amax(), masked_BT.float().sum() / n]).tolist()
    names = ("rollout/mismatch_kl", "rollout/is_weight_mean", "rollout/is_weight_max", "rollout/is_masked_frac")
    return rho_BT, dict(zip(names, metrics))
