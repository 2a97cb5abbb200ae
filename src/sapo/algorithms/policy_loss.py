"""`policy_loss`: one call from per-token log-probabilities to the scalar loss and its metrics.

The steps every objective shares live here, once: check the inputs, compute in float32,
zero the padding, clamp the log-ratio, call the registered objective, weight by importance
weights, add the KL term, aggregate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .aggregation import aggregate, check_aggregation
from .registry import (
    LOG_RATIO_CLAMP,
    PolicyLossInputs,
    PolicyLossSettings,
    get_policy_loss,
    masked_extreme,
    masked_mean,
)


@dataclass(frozen=True)
class LossSettings:
    """The knobs of `policy_loss` as one value, named as its keyword arguments: the trainer builds
    it once from the config and passes it whole (`policy_loss(..., **settings.kwargs())`)."""

    loss_type: str = "sapo"
    """A registered objective: "sapo", "grpo", "gspo", or one of yours."""
    tau_pos: float = 1.0
    """SAPO gate temperature for A > 0."""
    tau_neg: float = 1.05
    """SAPO gate temperature for A <= 0."""
    epsilon: float | None = None
    """Lower clip width (GRPO/GSPO); None: the objective's default."""
    epsilon_high: float | None = None
    """Upper clip width (GRPO/GSPO); None: the objective's default."""
    beta: float = 0.0
    """Coefficient of the k3 KL term to the reference policy."""
    aggregation: str = "seq-mean-token-mean"
    """How per-token losses become one scalar (aggregation.py)."""
    max_tokens: int | None = None
    """The fixed length "seq-mean-token-sum-norm" divides by (max_completion_length)."""

    def kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class PolicyLossOutput:
    loss: Tensor
    """Scalar float32 (float64 for float64 inputs) tensor to minimise."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Diagnostics; names are listed in docs/algorithms.md."""


class _UpcastSaturatingGrad(torch.autograd.Function):
    """x.to(float32) whose backward casts the gradient back saturated to the input dtype's
    finite range, so a float32 gradient above 65504 cannot become inf in an fp16 model."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        ctx.in_dtype = x.dtype
        return x.to(dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        info = torch.finfo(ctx.in_dtype)
        return grad.clamp(info.min, info.max).to(ctx.in_dtype), None


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _upcast(x: Tensor, dtype: torch.dtype) -> Tensor:
    if x.dtype in (torch.float16, torch.bfloat16) and x.requires_grad:
        return _UpcastSaturatingGrad.apply(x, dtype)
    return x.to(dtype)


def _check_inputs(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None,
    importance_weights: Tensor | None,
    settings: PolicyLossSettings,
    beta: float,
) -> None:
    if not isinstance(logprobs, Tensor) or logprobs.dim() != 2 or not logprobs.is_floating_point():
        got = tuple(logprobs.shape) if isinstance(logprobs, Tensor) else type(logprobs).__name__
        raise ValueError(f"logprobs must be a floating-point tensor of shape (B, T), got {got}")
    shape = tuple(logprobs.shape)
    named = {"old_logprobs": old_logprobs, "mask": mask}
    named.update({k: v for k, v in (("ref_logprobs", ref_logprobs), ("importance_weights", importance_weights))
                  if v is not None})
    for name, t in named.items():
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must have the shape of logprobs {shape}, got {got}")
    if not isinstance(advantages, Tensor) or tuple(advantages.shape) not in (shape[:1], shape):
        got = tuple(advantages.shape) if isinstance(advantages, Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must have shape (B,) = {shape[:1]} or (B, T) = {shape}, got {got}")
    check_settings(settings.tau_pos, settings.tau_neg, settings.epsilon, settings.epsilon_high, beta)
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} adds a KL penalty to a reference policy: pass ref_logprobs, or set beta=0")


def check_settings(tau_pos: float, tau_neg: float, epsilon: float | None, epsilon_high: float | None,
                   beta: float) -> None:
    """Raise ValueError naming the first setting out of range (shared with TrainConfig.validate)."""
    for name, value in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
        if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
            raise ValueError(f"{name} must be a positive finite number (the paper uses 1.0 and 1.05), got {value!r}")
    for name, value in (("epsilon", epsilon), ("epsilon_high", epsilon_high)):
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
            raise ValueError(f"{name} must be a non-negative number or None for the loss type's default, got {value!r}")
    if epsilon is not None and epsilon >= 1:
        raise ValueError(f"epsilon must be below 1 (the band's lower edge is 1 - epsilon), got {epsilon!r}")
    if not (isinstance(beta, (int, float)) and 0 <= beta < float("inf")):
        raise ValueError(f"beta must be a non-negative number (0 disables the KL term), got {beta!r}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "sapo",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    epsilon: float | None = None,
    epsilon_high: float | None = None,
    aggregation: str = "seq-mean-token-mean",
    max_tokens: int | None = None,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    importance_weights: Tensor | None = None,
    denominator: float | Tensor | None = None,
    check_finite: bool = True,
) -> PolicyLossOutput:
    """The policy-gradient loss of a batch of sampled responses.

    Args:
        logprobs: (B, T) log pi_theta of the sampled tokens; gradients flow into it.
        old_logprobs: (B, T) log pi_old of the same tokens (the policy that sampled them).
        advantages: (B,) per response or (B, T) per token.
        mask: (B, T) nonzero where a token counts; masked positions may hold anything, even inf.
        loss_type: a registered objective: "sapo", "grpo", "gspo", or one of yours.
        tau_pos, tau_neg: SAPO temperatures for A > 0 and A <= 0.
        epsilon, epsilon_high: clip widths; None means 0.2/0.2 for grpo and 3e-4/4e-4 for gspo.
        aggregation: "seq-mean-token-mean" (the paper's), "token-mean", "seq-mean-token-sum",
            or "seq-mean-token-sum-norm" (needs max_tokens).
        ref_logprobs, beta: beta > 0 adds beta * k3 KL to the reference policy per token.
        importance_weights: (B, T) constants multiplying each token's policy term (train /
            inference mismatch correction), before the KL term is added.
        denominator: when this batch is one micro-batch of a larger one, the larger one's
            `sapo.aggregation_denominator` (summed over micro-batches), so that the accumulated
            gradient equals that of the whole batch. None: this batch's own.
        check_finite: raise ValueError naming the argument when an entry of logprobs,
            old_logprobs, advantages, ref_logprobs or importance_weights is NaN or +-inf where
            mask is nonzero. The check rides on the metrics' one device-to-host copy, so it
            costs no extra sync. The trainer passes False and skips such an optimizer step
            instead (`sapo.training.update`), since a raise on one process would hang the others.

    old_logprobs, advantages, ref_logprobs and importance_weights are treated as constants.
    Computation is in float32 (float64 if logprobs is float64) whatever the input dtype.
    """
    settings = PolicyLossSettings(tau_pos=tau_pos, tau_neg=tau_neg, epsilon=epsilon, epsilon_high=epsilon_high)
    _check_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, importance_weights, settings, beta)
    objective = get_policy_loss(loss_type)
    check_aggregation(aggregation, max_tokens)

    dtype = _compute_dtype(logprobs)
    valid_BT = mask != 0
    mask_BT = valid_BT.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)

    def constant(t: Tensor) -> Tensor:
        return torch.where(valid_BT, t.detach().to(dtype), zero)

    # torch.where, not multiplication by the mask: padding may hold -inf, and inf * 0 is NaN.
    logp_BT = torch.where(valid_BT, _upcast(logprobs, dtype), zero)
    old_logp_BT = constant(old_logprobs)
    raw_log_ratio_BT = logp_BT - old_logp_BT
    log_ratio_BT = raw_log_ratio_BT.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1).expand_as(logprobs)
    nonfinite = {}
    if check_finite:
        nonfinite = unmasked_nonfinite(valid_BT, logprobs=logprobs, old_logprobs=old_logprobs, advantages=adv,
                                       ref_logprobs=ref_logprobs, importance_weights=importance_weights)
    inputs = PolicyLossInputs(
        logprobs=logp_BT,
        old_logprobs=old_logp_BT,
        log_ratio=log_ratio_BT,
        ratio=torch.exp(log_ratio_BT),
        advantages=constant(adv),
        mask=mask_BT,
    )

    token = objective(inputs, settings)
    per_token_BT = token.loss
    metrics: dict[str, Tensor] = _common_metrics(inputs, raw_log_ratio_BT.detach())

    if importance_weights is not None:
        weights_BT = constant(importance_weights)
        per_token_BT = per_token_BT * weights_BT
        metrics["importance_weights/mean"] = masked_mean(weights_BT, mask_BT)
    if ref_logprobs is not None:
        # k3 = exp(ref - cur) - (ref - cur) - 1 >= 0 (Schulman's unbiased, low-variance estimator).
        delta_BT = (constant(ref_logprobs) - logp_BT).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl_BT = torch.exp(delta_BT) - delta_BT - 1.0
        if beta > 0:
            per_token_BT = per_token_BT + beta * kl_BT
        metrics["kl/mean"] = masked_mean(kl_BT.detach(), mask_BT)
        metrics["kl/max"] = masked_extreme(kl_BT.detach(), mask_BT, largest=True, empty=0.0)

    loss = aggregate(per_token_BT, mask_BT, aggregation, max_tokens=max_tokens, denominator=denominator)
    metrics.update(token.metrics)
    floats = _to_floats({**metrics, **{f"_nonfinite/{k}": v for k, v in nonfinite.items()}})
    counts = {name: int(floats.pop(f"_nonfinite/{name}")) for name in nonfinite}
    for name, count in counts.items():
        if count:
            raise ValueError(f"{name} is NaN or infinite at {count} position(s) where mask is nonzero; only masked "
                             f"(padding) positions may hold NaN or inf. {_NONFINITE_HINTS[name]}")
    return PolicyLossOutput(loss=loss, metrics=floats)


_NONFINITE_HINTS = {
    "logprobs": "A -inf log-prob is a token of probability 0: was it sampled at another temperature or from "
                "another model? NaN ones come from non-finite weights or a half-precision overflow.",
    "old_logprobs": "They must be the log-probs of the sampled tokens under the policy that sampled them.",
    "advantages": "Check the rewards and the advantage computation (a group's std of 0 with no epsilon?).",
    "ref_logprobs": "They must be the reference model's log-probs of the same tokens.",
    "importance_weights": "They must be finite constants (clip or truncate them).",
}


def unmasked_nonfinite(valid_BT: Tensor, **tensors: Tensor | None) -> dict[str, Tensor]:
    """For each tensor given (None ones are left out), a 0-d count on its device of its NaN or
    +-inf entries where `valid_BT` is True; masked positions may hold anything. No sync."""
    return {name: (~torch.isfinite(t) & valid_BT).sum() for name, t in tensors.items() if t is not None}


def _common_metrics(inputs: PolicyLossInputs, raw_log_ratio_BT: Tensor) -> dict[str, Tensor]:
    mask, ratio, adv = inputs.mask, inputs.ratio.detach(), inputs.advantages
    return {
        "ratio/mean": masked_mean(ratio, mask),
        "ratio/min": masked_extreme(ratio, mask, largest=False, empty=1.0),
        "ratio/max": masked_extreme(ratio, mask, largest=True, empty=1.0),
        "log_ratio/abs_max": masked_extreme(raw_log_ratio_BT.abs(), mask, largest=True, empty=0.0),
        "advantages/mean": masked_mean(adv, mask),
        "advantages/min": masked_extreme(adv, mask, largest=False, empty=0.0),
        "advantages/max": masked_extreme(adv, mask, largest=True, empty=0.0),
    }


def _to_floats(metrics: dict[str, Tensor | float]) -> dict[str, float]:
    # One device-to-host copy for all tensor metrics instead of one sync per .item().
    tensors = {k: v for k, v in metrics.items() if isinstance(v, Tensor)}
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
    if tensors:
        stacked = torch.stack([v.detach().to(torch.float64).reshape(()) for v in tensors.values()])
        out.update(zip(tensors.keys(), stacked.tolist()))
    return out
