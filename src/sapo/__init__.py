"""sapo-rl: reinforcement-learning post-training of language models with SAPO, GRPO and GSPO."""

from importlib.metadata import PackageNotFoundError, version

from . import tasks as _tasks  # noqa: F401  (the built-in tasks register themselves and their rewards)
from .algorithms import (
    LOG_RATIO_CLAMP,
    PolicyLossInputs,
    PolicyLossOutput,
    PolicyLossSettings,
    TokenLoss,
    aggregate,
    aggregation_denominator,
    available_aggregations,
    available_policy_losses,
    group_advantages,
    hard_gate,
    policy_loss,
    register_policy_loss,
    soft_gate,
    soft_gate_weight,
)
from .config import TrainConfig
from .errors import ConfigError
from .model.chunked_logprobs import token_logprobs

try:
    __version__ = version("sapo-rl")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def __getattr__(name: str):
    # The trainer pulls in transformers and accelerate: import it only when asked for.
    if name in ("Trainer", "train"):
        from .training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'sapo' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "TrainConfig",
    "Trainer",
    "train",
    "LOG_RATIO_CLAMP",
    "PolicyLossInputs",
    "PolicyLossOutput",
    "PolicyLossSettings",
    "TokenLoss",
    "__version__",
    "aggregate",
    "aggregation_denominator",
    "available_aggregations",
    "available_policy_losses",
    "group_advantages",
    "hard_gate",
    "policy_loss",
    "register_policy_loss",
    "soft_gate",
    "soft_gate_weight",
    "token_logprobs",
]
