"""Reward functions with TRL's signature, `f(prompts, completions, **kwargs) -> list[float | None]`:
the registry of names (`registry.py`), scoring a batch with several of them (`scoring.py`), and
the built-in rewards: math answers, code run in a sandbox, answer formats."""

from ..errors import RewardError
from .code import code_tests
from .formats import format_reward
from .math_answers import math_accuracy
from .registry import (
    REWARDS,
    NamedReward,
    RewardFunc,
    available_rewards,
    completion_text,
    exact_match,
    load_reward_function,
    register_reward,
)
from .scoring import CONTEXT_KWARGS, RewardContext, RewardResult, RewardSettings, check_signature, score

__all__ = [
    "CONTEXT_KWARGS",
    "REWARDS",
    "NamedReward",
    "RewardContext",
    "RewardError",
    "RewardFunc",
    "RewardResult",
    "RewardSettings",
    "available_rewards",
    "check_signature",
    "code_tests",
    "completion_text",
    "exact_match",
    "format_reward",
    "load_reward_function",
    "math_accuracy",
    "register_reward",
    "score",
]
