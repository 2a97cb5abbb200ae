import pytest

from sapo.tasks import get_task
from sapo.tasks.arithmetic import arithmetic_reward, load, parse_integer
from sapo.tasks.countdown import evaluate


def test_deterministic_under_a_seed_and_disjoint_splits():
    assert load("train", seed=3) == load("train", seed=3)
    assert load("train", seed=3) != load("train", seed=4)
    train, test = load("train"), load("test")
    assert len(train) == 5000 and len(test) == 200 == len({r["prompt"] for r in test})
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


@pytest.mark.parametrize("kwargs", [dict(), dict(digits=3, operands=3, ops="+-"), dict(digits=1, operands=4, ops="-")])
def test_answers_are_the_value_of_the_expression(kwargs):
    rows = load("test", **kwargs)
    for row in rows:
        expression = row["prompt"].rstrip("=")
        numbers = [int(x) for x in expression.replace("-", "+").split("+")]
        assert len(numbers) == kwargs.get("operands", 2)
        assert all(n < 10 ** kwargs.get("digits", 2) for n in numbers)
        assert evaluate(expression)[0] == int(row["answer"])
    if "-" in kwargs.get("ops", "+"):
        assert any(int(r["answer"]) < 0 for r in rows)


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="ops must be made of"):
        load("test", ops="*")


@pytest.mark.parametrize("text", ["46", " 46", "46\n", "+46", "046", "\t46  "])
def test_accepts_every_form_of_the_right_integer(text):
    assert arithmetic_reward(["12+34="], [text], ["46"]) == [1.0]


@pytest.mark.parametrize("text", ["45", "-46", "46.0", "4 6", "46 46", "", "forty-six", "46abc", "=46", "١٤", "４６",
                                  "46=46", "0" * 5000 + "46"])
def test_rejects_everything_else(text):
    assert arithmetic_reward(["12+34="], [text], ["46"]) == [0.0]


def test_negative_answers_and_conversational_completions():
    assert parse_integer("-5") == -5
    assert arithmetic_reward(["3-8="], [[{"role": "assistant", "content": "-5"}]], ["-5"]) == [1.0]


def test_registered_with_its_reward():
    task = get_task("arithmetic")
    assert task.reward == "arithmetic" and task.target == "answer"
