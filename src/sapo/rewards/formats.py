"""Optional rewards for the shape of an answer, to combine with a correctness reward."""

from __future__ import annotations

import re
from typing import Callable

from .registry import completion_text, register_reward


def format_reward(pattern: str, *, name: str = "format") -> Callable[..., list[float]]:
    """A reward of 1.0 for completions in which the regular expression `pattern` matches
    (re.search, DOTALL), else 0.0. Register it or pass it to the trainer by import path."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts: list, completions: list, **kwargs) -> list[float]:
        return [float(compiled.search(completion_text(c)) is not None) for c in completions]

    reward.__name__ = name
    return reward


format_boxed = register_reward("format_boxed")(format_reward(r"\\boxed\{.+?\}", name="format_boxed"))
format_answer_tag = register_reward("format_answer_tag")(
    format_reward(r"<answer>.+?</answer>\s*$", name="format_answer_tag"))
