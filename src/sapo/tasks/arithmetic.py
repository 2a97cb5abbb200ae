"""`arithmetic`: integer expressions such as "47+85=" or "12-7+30=", answered with one integer."""

from __future__ import annotations

import random
import re

from ..rewards.registry import completion_text, register_reward
from .registry import MAX_SPLIT_SIZE, Task, check_int_option, register_task, split_problems

MAX_DIGITS, MAX_OPERANDS = 40, 50
_INTEGER = re.compile(r"[+-]?[0-9]{1,50}")  # ASCII digits only (\d also matches '４' and '٤')


def make_problem(rng: random.Random, digits: int = 2, operands: int = 2, ops: str = "+") -> dict:
    """One problem: `operands` numbers of up to `digits` digits joined by operators from `ops`."""
    numbers = [rng.randint(0, 10**digits - 1) for _ in range(operands)]
    operators = [rng.choice(ops) for _ in range(operands - 1)]
    expression = str(numbers[0]) + "".join(f"{op}{n}" for op, n in zip(operators, numbers[1:]))
    value = numbers[0]
    for op, n in zip(operators, numbers[1:]):  # left to right: only + and - are allowed
        value = value + n if op == "+" else value - n
    return {"prompt": f"{expression}=", "answer": str(value)}


def load(split: str, seed: int = 0, *, digits: int = 2, operands: int = 2, ops: str = "+",
         train_size: int = 5000, test_size: int = 200) -> list[dict]:
    """Rows of a split. The test problems are drawn first and never appear in train."""
    # Answers stay within the 50 digits the reward reads (MAX_DIGITS + 2 for a sum of MAX_OPERANDS).
    check_int_option("arithmetic", "digits", digits, 1, MAX_DIGITS)
    check_int_option("arithmetic", "operands", operands, 2, MAX_OPERANDS)
    check_int_option("arithmetic", "train_size", train_size, 1, MAX_SPLIT_SIZE)
    check_int_option("arithmetic", "test_size", test_size, 1, MAX_SPLIT_SIZE)
    if not isinstance(ops, str) or not ops or set(ops) - set("+-"):
        raise ValueError(f"arithmetic: task_kwargs.ops must be made of '+' and '-' (e.g. '+-'), got {ops!r}")
    return split_problems(lambda rng: make_problem(rng, digits, operands, ops), split, seed,
                          train_size=train_size, test_size=test_size, key="prompt")


def parse_integer(text: str) -> int | None:
    """The integer a completion states: the whole stripped text, optionally signed ("+46",
    " 046 " and "46" all read 46). Anything else is not an answer."""
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        return None
    return int(text)


@register_reward("arithmetic")
def arithmetic_reward(prompts: list, completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 when the completion is exactly the integer in `answer` (sign, leading zeros and
    surrounding whitespace aside), else 0.0."""
    out = []
    for completion, gold in zip(completions, answer):
        value = parse_integer(completion_text(completion))
        out.append(float(value is not None and value == int(gold)))
    return out


register_task(Task("arithmetic", load, "integer addition (and subtraction): '47+85=' -> '132'",
                   reward="arithmetic", target="answer",
                   options="digits=2 (1-40), operands=2 (2-50), ops='+' (use '+-' for subtraction), "
                   "train_size=5000, test_size=200"))
