"""Policy objectives (SAPO, GRPO, GSPO and yours), their aggregation, and `policy_loss`."""

from . import objectives as _builtin_objectives  # noqa: F401  (registers sapo, grpo, gspo)
from .aggregation import aggregate, aggregation_denominator, available_aggregations
from .objectives import hard_gate, soft_gate, soft_gate_weight
from .policy_loss import LOG_RATIO_CLAMP, PolicyLossOutput, policy_loss
from .registry import (
    PolicyLossInputs,
    PolicyLossSettings,
    TokenLoss,
    available_policy_losses,
    get_policy_loss,
    register_policy_loss,
)

__all__ = [
    "LOG_RATIO_CLAMP",
    "PolicyLossInputs",
    "PolicyLossOutput",
    "PolicyLossSettings",
    "TokenLoss",
    "aggregate",
    "aggregation_denominator",
    "available_aggregations",
    "available_policy_losses",
    "get_policy_loss",
    "hard_gate",
    "policy_loss",
    "register_policy_loss",
    "soft_gate",
    "soft_gate_weight",
]
