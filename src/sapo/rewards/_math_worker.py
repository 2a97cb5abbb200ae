"""A math-verify worker process (see math_answers.MathChecker), and the checking it does.

It imports nothing of sapo, so that starting one does not import torch (seconds, and most of a
worker's memory): MathChecker runs this file by its path, not as `-m sapo.rewards._math_worker`,
which would import the sapo package first.
"""

from __future__ import annotations

import json
import re
import sys

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_BOX = re.compile(r"\\(?:boxed|fbox)\{")

# math-verify reads a relation or a chain of them by its last part (`4 = 3` and `x = 3 = 57` "are"
# 3 and 57) and drops everything before some symbols (`\implies`, `\sim`, `\lor`), so an answer
# that states a relation is judged here before math-verify sees it (see _stated_value).
_RELATION = re.compile(
    r":=|<|>|=|≤|≥|≠|≈|≡|∈|→|⇒|⇔|∴"
    r"|\\(?:le|leq|leqq|leqslant|ge|geq|geqq|geqslant|lt|gt|ne|neq|approx|equiv|sim|simeq|cong|propto|ll|gg|in"
    r"|to|mapsto|gets|implies|impliedby|iff|rightarrow|leftarrow|Rightarrow|Leftarrow|Leftrightarrow|longrightarrow"
    r"|Longrightarrow|Longleftrightarrow|therefore|because|coloneqq|eqqcolon|doteq)(?![A-Za-z])")
_OR = re.compile(r"∨|\\(?:lor|vee)(?![A-Za-z])")
_AND = re.compile(r"∧|\\(?:land|wedge)(?![A-Za-z])")


def last_boxed(text: str) -> str | None:
    """Content of the closed \\boxed{...} (or \\fbox{...}) that closes last, braces balanced (the
    outer one of nested boxes); None if there is none."""
    best: tuple[int, str] | None = None
    for box in _BOX.finditer(text):
        depth, i = 1, box.end()
        while i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                if best is None or i > best[0]:
                    best = (i, text[box.end():i])
                break
            i += 1
    return best[1] if best else None


def final_answer(completion: str) -> str | None:
    """The answer a completion states: its last closed \\boxed{} content, else its last number."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(completion)
    return numbers[-1].replace(",", "") if numbers else None


def _connectives_as_words(text: str) -> str:
    # math-verify reads "a \text{ or } b" as the set {a, b} but "a \lor b" as b alone
    return _AND.sub(r" \\text{ and } ", _OR.sub(r" \\text{ or } ", text))


def _pieces(answer: str) -> list[str] | None:
    """The answer split at its top-level commas, semicolons and "or"/"and" words: `x = 2, x = 3`
    states two values. Commas inside brackets (an interval, a tuple, a set) do not split; None
    when the brackets do not balance (a piece such as `4)` would be read as something else)."""
    pieces, depth, start = [], 0, 0
    for match in re.finditer(r"[({\[]|[)}\]]|[,;]|\\text\{\s*(?:or|and)\s*\}", answer):
        token = match.group()
        if token in "({[":
            depth += 1
        elif token in ")}]":
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0:
            pieces.append(answer[start:match.start()])
            start = match.end()
    return [*pieces, answer[start:]] if depth == 0 else None


_APPROX = ("\\approx", "≈")
_MOD = re.compile(r"\\(?:pmod\s*(?:\{[^{}]*\}|\S+)|bmod\s*\S+|mod\s*\S+)|\(\s*\\?mod\s*[^()]*\)")


def _stated_value(answer: str, parse) -> str | None:
    """The value an answer that states relations gives, when the gold is a plain value; None when
    it states something else. Each piece (see _pieces) must be `value`, `name = value`, a chain
    `name = v1 = v2` whose values all agree, `name \\approx value`, `name \\equiv value \\pmod{m}`
    or `name \\in set`; a trailing `\\approx v` after an exact value is left out. A left side
    that is itself a number (it has a digit) is a value that must agree too (`4 = 3` is no
    answer of 3, `\\frac{6}{2} = 3` is). Any other relation (`x \\le 3`, `2 \\implies 3`,
    `x := 3`) states no value."""
    from math_verify import verify

    values = []
    for piece in _pieces(answer) or [None]:
        if piece is None:
            return None
        relations = list(_RELATION.finditer(piece))
        if "\\equiv" in piece and _MOD.search(piece):  # a remainder: x \equiv 3 \pmod{5} states 3
            piece = _MOD.sub(" ", piece).replace("\\equiv", "=")
            relations = list(_RELATION.finditer(piece))
        if not relations:
            values.append(piece)
            continue
        parts = [piece[a.end() if a else 0:b.start() if b else len(piece)]
                 for a, b in zip([None, *relations], [*relations, None])]
        if not all(_balanced(part) for part in parts):
            return None  # `(x = 4), x = 3`: a relation inside brackets, its parts read as something else
        kinds = [r.group() for r in relations]
        if len(kinds) > 1 and kinds[-1] in _APPROX:  # `x = \frac{1}{3} \approx 0.33`: the exact value counts
            while kinds and kinds[-1] in _APPROX:
                kinds.pop()
                parts.pop()
        if kinds in (["\\approx"], ["≈"]):
            kinds = ["="]
        if set(kinds) <= {"\\in", "∈"} and len(parts) == 2 and not _is_number(parts[0], parse):
            values.append(parts[1])
            continue
        if set(kinds) != {"="}:
            return None
        if not _is_number(parts[0], parse):
            parts = parts[1:]  # what is named: `x`, `e`, `f(2)`, `\angle ABC`, `\text{Area}`
        parsed = [parse(f"${part}$") for part in parts]
        if not all(parsed) or not all(verify(parsed[0], other) for other in parsed[1:]):
            return None
        values.append(parts[0])
    return ", ".join(values)


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _is_number(text: str, parse) -> bool:
    """A left side with a digit that math-verify reads as a number (`4`, `\\frac{6}{2}`); names
    that it reads as constants (`e`, `I`, `\\pi`) are names here."""
    if not re.search(r"\d", text):
        return False
    parsed = parse(f"${text}$")
    return bool(parsed) and getattr(parsed[0], "is_number", False) is True


def verify_answer(gold: str, completion: str) -> float | None:
    """1.0 / 0.0, or None when the gold answer cannot be parsed. Runs math-verify in this process:
    call it through MathChecker from a trainer. When the gold is a plain value and the answer
    states relations, they must state a value (see _stated_value), which is then checked."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold = _connectives_as_words(gold)
    gold_parsed = parse(f"${gold}$", extraction_config=config)
    if not gold_parsed:
        return None
    answer = final_answer(completion)
    if answer is None:
        return 0.0
    answer = _connectives_as_words(answer)
    if not _RELATION.search(gold) and _RELATION.search(answer):  # relation vs relation: math-verify's to judge
        answer = _stated_value(answer, lambda text: parse(text, extraction_config=config))
        if answer is None:
            return 0.0
    predicted = parse(f"${answer}$", extraction_config=config)
    return float(bool(predicted) and verify(gold_parsed, predicted))


def _serve(memory_bytes: int) -> None:
    """Worker process main loop: one JSON job per stdin line, one JSON answer per stdout line."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    verify_answer("1", "\\boxed{1}")  # imports math-verify and sympy before saying ready
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        gold, completion = json.loads(line)
        try:
            answer = {"ok": verify_answer(gold, completion)}
        except BaseException as err:  # noqa: BLE001 - math-verify's own timeouts are BaseExceptions
            answer = {"error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[-1]))
