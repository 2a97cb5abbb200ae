import builtins

import pytest

from sapo.tasks.countdown import InvalidExpression, countdown_reward, evaluate, is_solution, load

NUMBERS, TARGET = [3, 7, 25], 46


def test_deterministic_under_a_seed_and_disjoint_splits():
    assert load("test", seed=1) == load("test", seed=1) != load("test", seed=2)
    train, test = load("train", train_size=2000), load("test")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


@pytest.mark.parametrize("kwargs", [dict(), dict(operands=4, max_number=50), dict(operands=2)])
def test_every_generated_problem_has_a_checked_solution(kwargs):
    for row in load("test", **kwargs):
        assert len(row["numbers"]) == kwargs.get("operands", 3)
        assert is_solution(row["solution"], row["numbers"], row["target"])
        assert row["prompt"] == f"{','.join(map(str, row['numbers']))}->{row['target']}:"


@pytest.mark.parametrize("text", ["25+3*7", "3*7+25", "(3*7)+25", "7*3+25", "25+(7*3)", " 25 + 3 * 7 ", "25+3*7=46",
                                  "25+3*7 = 46", "((25))+3*7", "25+3*7\n"])
def test_accepts_any_correct_expression(text):
    assert is_solution(text, NUMBERS, TARGET)


def test_division_is_exact():
    assert is_solution("(7-3)/4*25", [3, 4, 7, 25], 25)
    assert is_solution("7/2*2", [2, 2, 7], 7)  # exact fractions: no rounding to 3*2
    assert not is_solution("7/3*3", [3, 3, 7], 8)


@pytest.mark.parametrize("text", [
    "25+3*7=45",  # states the wrong target
    "25+3+7",  # wrong value
    "25+25-4",  # numbers not given / reused
    "25+21",  # 21 is not given
    "25+3*7+0",  # an extra number
    "25*3",  # a number left out
    "46",  # the target itself
    "__import__('os').system('echo pwned')",
    "eval('25+3*7')",
    "25+3**7",
    "2.5*10+21",
    "-3+7*25",  # unary minus
    "25+3*7)",
    "(25+3*7",
    "025+3*7",  # leading zero
    "２５+3*7",  # full-width digits
    "25+3×7",
    "1/0+25+3*7",
    "(" * 40 + "25" + ")" * 40 + "+3*7",  # nesting past the limit
    "9" * 30 + "*" + "9" * 30,
    "",
])
def test_rejects_wrong_and_hostile_text(text):
    assert not is_solution(text, NUMBERS, TARGET)


def test_never_calls_eval_or_exec(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("model text reached eval/exec")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    out = countdown_reward(["p"] * 3, ["25+3*7", "__import__('os')", "(" * 10000], [NUMBERS] * 3, [TARGET] * 3)
    assert out == [1.0, 0.0, 0.0]


def test_operand_count_is_bounded():
    with pytest.raises(ValueError, match="operands must be an integer from 2 to 10"):
        load("test", operands=70)


def test_parser_errors_are_its_own():
    with pytest.raises(InvalidExpression, match="too long"):
        evaluate("1+" * 100 + "1")
    for text in ("1/0", "2**3", "(1"):
        with pytest.raises(InvalidExpression):
            evaluate(text)
