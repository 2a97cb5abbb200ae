"""sapo-rl: reinforcement-learning post-training of language models with SAPO, GRPO and GSPO."""

from importlib.metadata import PackageNotFoundError, version

from .advantages import group_advantages
from .losses import (
    LOG_RATIO_CLAMP,
    PolicyLossInputs,
    PolicyLossOutput,
    PolicyLossSettings,
    TokenLoss,
    aggregate,
    available_aggregations,
    available_policy_losses,
    hard_gate,
    policy_loss,
    register_policy_loss,
    soft_gate,
    soft_gate_weight,
)

try:
    __version__ = version("sapo-rl")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "LOG_RATIO_CLAMP",
    "PolicyLossInputs",
    "PolicyLossOutput",
    "PolicyLossSettings",
    "TokenLoss",
    "__version__",
    "aggregate",
    "available_aggregations",
    "available_policy_losses",
    "group_advantages",
    "hard_gate",
    "policy_loss",
    "register_policy_loss",
    "soft_gate",
    "soft_gate_weight",
]
