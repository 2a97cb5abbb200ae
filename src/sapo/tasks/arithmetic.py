"""`arithmetic`: integer expressions such as "47+85=" or "12-7+30=", answered with one integer."""

from __future__ import annotations

import random
import re

from ..rewards import completion_text, register_reward
from . import Task, register_task, split_problems

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
    if digits < 1 or operands < 2 or not ops or set(ops) - set("+-"):
        raise ValueError(f"arithmetic: need digits >= 1, operands >= 2 and ops made of '+' and '-', "
                         f"got digits={digits}, operands={operands}, ops={ops!r}")
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
                   reward="arithmetic", target="answer", options="digits=2, operands=2, ops='+' (use '+-' for subtraction)"))
