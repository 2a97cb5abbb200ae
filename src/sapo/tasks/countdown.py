"""`countdown`: reach a target from given numbers with + - * / and parentheses, each number used
exactly once ("3,7,25->46:" -> "25+3*7"). Completions are checked by a small parser over exact
fractions; model text is never handed to `eval`."""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

from ..rewards.registry import completion_text, register_reward
from .registry import MAX_SPLIT_SIZE, Task, check_int_option, register_task, split_problems

MAX_CHARS = 200  # longer text is not a plausible answer, and bounds the parser's work
MAX_DEPTH = 32  # parenthesis nesting
MAX_MAGNITUDE = 10**12  # larger intermediate values are rejected before they grow further


class InvalidExpression(ValueError):
    pass


def evaluate(text: str) -> tuple[Fraction, list[int]]:
    """Value and the numbers used of an expression of non-negative integers, + - * / and
    parentheses (no unary operators, no other characters). Raises InvalidExpression."""
    if len(text) > MAX_CHARS:
        raise InvalidExpression("too long")
    tokens = _tokenize(text)
    parser = _Parser(tokens)
    value = parser.expression(0)
    if parser.pos != len(tokens):
        raise InvalidExpression(f"unexpected {tokens[parser.pos]!r}")
    return value, parser.numbers


def _tokenize(text: str) -> list[str]:
    tokens, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch in " \t":
            i += 1
        elif ch in "0123456789":  # ASCII digits only: str.isdigit also accepts '４' and '²'
            j = i
            while j < len(text) and text[j] in "0123456789":
                j += 1
            tokens.append(text[i:j])
            i = j
        elif ch in "+-*/()":
            tokens.append(ch)
            i += 1
        else:
            raise InvalidExpression(f"character {ch!r} is not allowed")
    return tokens


class _Parser:
    """expression := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*;
    factor := NUMBER | '(' expression ')'."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.pos, self.numbers = tokens, 0, []

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expression(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.term(depth)
            value = _checked(value + rhs if op == "+" else value - rhs)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.factor(depth)
            if op == "/" and rhs == 0:
                raise InvalidExpression("division by zero")
            value = _checked(value * rhs if op == "*" else value / rhs)
        return value

    def factor(self, depth: int) -> Fraction:
        token = self._peek()
        if token is None:
            raise InvalidExpression("expression ends early")
        self.pos += 1
        if token == "(":
            if depth >= MAX_DEPTH:
                raise InvalidExpression("parentheses nested too deeply")
            value = self.expression(depth + 1)
            if self._peek() != ")":
                raise InvalidExpression("missing ')'")
            self.pos += 1
            return value
        if token.isdigit():
            if len(token) > 1 and token[0] == "0":
                raise InvalidExpression("numbers have no leading zeros")
            self.numbers.append(int(token))
            return Fraction(int(token))
        raise InvalidExpression(f"unexpected {token!r}")


def _checked(value: Fraction) -> Fraction:
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise InvalidExpression("value too large")
    return value


def is_solution(text: str, numbers: list[int], target: int) -> bool:
    """Whether `text` (optionally ending in "=target") reaches `target` using each of `numbers`
    exactly once."""
    text = text.strip()
    if "=" in text:
        text, _, stated = text.partition("=")
        if stated.strip() != str(target):
            return False
    try:
        value, used = evaluate(text)
    except InvalidExpression:
        return False
    return value == target and Counter(used) == Counter(numbers)


@register_reward("countdown")
def countdown_reward(prompts: list, completions: list, numbers: list, target: list, **kwargs) -> list[float]:
    """1.0 for an expression that reaches `target` with each of `numbers` exactly once."""
    return [float(is_solution(completion_text(c), list(n), int(t))) for c, n, t in zip(completions, numbers, target)]


def make_problem(rng: random.Random, operands: int = 3, max_number: int = 20) -> dict:
    """Numbers and a target built from a random expression over them, so a solution exists."""
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(operands)]
        parts = [str(n) for n in numbers]
        while len(parts) > 1:
            i = rng.randrange(len(parts) - 1)
            op = rng.choice("+-*/")
            parts[i:i + 2] = [f"({parts[i]}{op}{parts[i + 1]})"]
        solution = parts[0][1:-1]
        try:
            value, _ = evaluate(solution)
        except InvalidExpression:
            continue
        if value.denominator == 1 and 0 < value <= 1000:
            shown = sorted(numbers)
            return {"prompt": f"{','.join(map(str, shown))}->{int(value)}:", "numbers": shown, "target": int(value),
                    "solution": solution}


def load(split: str, seed: int = 0, *, operands: int = 3, max_number: int = 20, train_size: int = 5000,
         test_size: int = 200) -> list[dict]:
    check_int_option("countdown", "operands", operands, 2, 10)
    # Targets are at most 1000: with larger numbers most random expressions miss that range and
    # drawing a split takes minutes (10 operands up to 1000: 5 s for 40 problems).
    check_int_option("countdown", "max_number", max_number, 1, 100)
    check_int_option("countdown", "train_size", train_size, 1, MAX_SPLIT_SIZE)
    check_int_option("countdown", "test_size", test_size, 1, MAX_SPLIT_SIZE)
    return split_problems(lambda rng: make_problem(rng, operands, max_number), split, seed,
                          train_size=train_size, test_size=test_size, key="prompt")


register_task(Task("countdown", load, "reach the target with each number once: '3,7,25->46:' -> '25+3*7'",
                   reward="countdown", target="solution",
                   options="operands=3 (2-10), max_number=20 (1-100), train_size=5000, test_size=200"))
