"""The paper's mathematics: group advantages, the gates and the registered policy objectives
(SAPO, GRPO, GSPO and yours), token aggregation, and `policy_loss`, which applies them once.
Pure tensor functions; nothing here knows about models, configs or the trainer."""

from . import objectives as _builtin_objectives  # noqa: F401  (registers sapo, grpo, gspo)
from .advantages import SCALES, group_advantages
from .aggregation import aggregate, aggregation_denominator, available_aggregations
from .objectives import hard_gate, soft_gate, soft_gate_weight
from .policy_loss import LOG_RATIO_CLAMP, LossSettings, PolicyLossOutput, check_settings, policy_loss
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
    "SCALES",
    "LossSettings",
    "PolicyLossInputs",
    "PolicyLossOutput",
    "PolicyLossSettings",
    "TokenLoss",
    "aggregate",
    "aggregation_denominator",
    "available_aggregations",
    "available_policy_losses",
    "check_settings",
    "get_policy_loss",
    "group_advantages",
    "hard_gate",
    "policy_loss",
    "register_policy_loss",
    "soft_gate",
    "soft_gate_weight",
]
