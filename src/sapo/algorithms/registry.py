"""Typed inputs of a policy objective, and the registry that maps a name to one.

A policy objective is a pure function ``(PolicyLossInputs, PolicyLossSettings) -> TokenLoss``:
it turns per-token log-ratios and advantages into a per-token loss (B, T) and a few
diagnostics. Masking, float32 casting, the log-ratio clamp, the KL term and the
aggregation over tokens are done once, by :func:`sapo.policy_loss`, for every objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .._registry import Registry

LOG_RATIO_CLAMP = 20.0
"""|l| beyond this is treated as this, as verl does (GSPO clamps its sequence mean of l
instead). exp(20) = 4.9e8 keeps every objective and gradient finite in float32, and SAPO's
true gradient weight there, sech^2(tau(r-1)/2) r, is below 1e-100: nothing is lost. See
docs/algorithms.md, "Numerics"."""


@dataclass(frozen=True)
class PolicyLossInputs:
    """What an objective sees. Every tensor is (B, T), float32 (float64 if the inputs are),
    and already zeroed at masked positions, so an objective never has to guard padding."""

    logprobs: Tensor
    """log pi_theta(y_t) of the policy being trained; carries the gradient."""
    old_logprobs: Tensor
    """log pi_old(y_t) of the behaviour policy that sampled the tokens; a constant."""
    log_ratio: Tensor
    """l = logprobs - old_logprobs, clamped to +-LOG_RATIO_CLAMP (see docs/algorithms.md)."""
    ratio: Tensor
    """r = exp(log_ratio): the token importance ratio."""
    advantages: Tensor
    """A per token (a sequence-level advantage is broadcast over its tokens); a constant."""
    mask: Tensor
    """1.0 for tokens that count, 0.0 for padding."""


@dataclass(frozen=True)
class PolicyLossSettings:
    """The knobs of the built-in objectives; a custom objective reads those it needs."""

    tau_pos: float = 1.0
    """SAPO gate temperature for tokens with A > 0."""
    tau_neg: float = 1.05
    """SAPO gate temperature for tokens with A <= 0."""
    epsilon: float | None = None
    """Lower clip width (GRPO/GSPO); None means the objective's own default."""
    epsilon_high: float | None = None
    """Upper clip width (GRPO/GSPO); None means the objective's own default."""


@dataclass
class TokenLoss:
    """What an objective returns."""

    loss: Tensor
    """(B, T) per-token loss to minimise, -f(r) * A for the gated objectives."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """Detached 0-dim tensors, named "<objective>/<what>"; turned into floats once."""


PolicyLossFn = Callable[[PolicyLossInputs, PolicyLossSettings], TokenLoss]

POLICY_LOSSES: Registry[PolicyLossFn] = Registry("loss_type")


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: make ``fn(inputs, settings) -> TokenLoss`` available as ``loss_type=name``.

    Registering a different function under a name already taken is an error, so a typo
    cannot silently replace a built-in objective.
    """

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        return POLICY_LOSSES.add(name, fn)

    return decorator


def available_policy_losses() -> list[str]:
    """Names accepted as ``loss_type``."""
    return POLICY_LOSSES.names()


def get_policy_loss(name: str) -> PolicyLossFn:
    return POLICY_LOSSES.get(name)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over positions where mask is 1; 0 when nothing is unmasked (never NaN)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_fraction(cond: Tensor, mask: Tensor) -> Tensor:
    """Fraction of unmasked positions where cond holds."""
    return masked_mean(cond.to(mask.dtype), mask)


def masked_extreme(x: Tensor, mask: Tensor, *, largest: bool, empty: float) -> Tensor:
    """Max (or min) of x over unmasked positions; `empty` when there are none."""
    if x.numel() == 0:
        return x.new_tensor(empty)
    fill = -torch.inf if largest else torch.inf
    picked = torch.where(mask > 0, x, torch.full_like(x, fill))
    value = picked.amax() if largest else picked.amin()
    return torch.where(mask.sum() > 0, value, torch.full_like(value, empty))
