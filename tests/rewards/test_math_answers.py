import json
import threading
import time

import pytest

import sapo
from sapo.data import gsm8k_rows, math_rows
from sapo.rewards import format_reward, load_reward_function, math_accuracy
from sapo.rewards.math_answers import MathChecker, final_answer, last_boxed


@pytest.mark.parametrize("gold,completion", [
    ("0.5", "so the answer is \\boxed{\\frac{1}{2}}"),
    ("\\frac{1}{2}", "\\boxed{0.5}"),
    ("\\sqrt{8}", "We get $\\boxed{2\\sqrt{2}}$."),
    ("12", "There are 12 apples."),
    ("12", "\\boxed{12.0}"),
    ("1000", "It costs 1,000 dollars"),
    ("10", "\\boxed{10\\text{ cm}}"),
    ("x^2+1", "\\boxed{1+x^2}"),
    ("3", "first 5, then \\boxed{4}, finally \\boxed{3}"),  # the last box counts
])
def test_equivalent_forms_earn_the_reward(gold, completion):
    assert math_accuracy(["q"], [completion], [gold]) == [1.0]


@pytest.mark.parametrize("gold,completion", [
    ("12", "\\boxed{13}"), ("12", "no number here"), ("12", ""), ("0.5", "\\boxed{\\frac{1}{3}}"),
    ("12", "12 then \\boxed{7}"),  # a box beats a bare number
])
def test_wrong_or_missing_answers_do_not(gold, completion):
    assert math_accuracy(["q"], [completion], [gold]) == [0.0]


def test_unparseable_gold_does_not_count():
    assert math_accuracy(["q"], ["\\boxed{3}"], [""]) == [None]
    assert math_accuracy(["q"] * 3, ["\\boxed{3}"] * 3, [None, "3", None]) == [None, 1.0, None]  # missing gold


def test_extraction():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert final_answer("3 then 1,234.5 apples") == "1234.5"


def test_a_pathological_answer_cannot_hang_or_crash_training():
    checker = MathChecker(workers=1, timeout=2.0)
    try:
        start = time.monotonic()
        out = checker.check([("3", "\\boxed{9^{9^{9^{9}}}}"), ("3", "\\boxed{3}")])
        assert out == [0.0, 1.0] and time.monotonic() - start < 10
        assert checker.metrics() == {"timeouts": 1.0, "errors": 0.0}
        assert checker.check([("2", "\\boxed{2}")]) == [1.0]  # the killed worker was replaced
    finally:
        checker.close()


def test_a_workers_start_up_does_not_count_against_an_answers_time_limit():
    checker = MathChecker(workers=1, timeout=0.5)  # starting a worker (math-verify, sympy) takes longer
    try:
        assert checker.check([("2", "\\boxed{2}"), ("3", "\\boxed{3}")]) == [1.0, 1.0]
        assert checker.metrics() == {"timeouts": 0.0, "errors": 0.0}
    finally:
        checker.close()


def test_works_from_a_worker_thread():
    out = []
    thread = threading.Thread(target=lambda: out.append(math_accuracy(["q"], ["\\boxed{2\\sqrt{2}}"], ["\\sqrt{8}"])))
    thread.start()
    thread.join(timeout=60)
    assert out == [[1.0]]


def test_format_rewards():
    boxed = load_reward_function("format_boxed").fn
    assert boxed(["q"] * 2, ["so \\boxed{3}", "3"]) == [1.0, 0.0]
    tag = load_reward_function("format_answer_tag").fn
    assert tag(["q"] * 3, ["think <answer>3</answer>", "<answer></answer>", "<answer>3</answer> more"]) == [1.0, 0.0, 0.0]
    custom = format_reward(r"^Answer: \d+$", name="answer_line")
    assert custom(["q"] * 2, ["Answer: 42", "answer 42"]) == [1.0, 0.0]


def test_gsm8k_and_math_loaders(tmp_path):
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": "How many?", "answer": "3 + 4 = 7\n#### 1,007"}))
    (tmp_path / "math.jsonl").write_text(json.dumps({"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$.",
                                                     "level": "Level 1"}))
    g = gsm8k_rows(str(tmp_path / "gsm8k.jsonl"))
    assert g == [{"prompt": "How many?\nPut your final answer within \\boxed{}.", "answer": "1007"}]
    m = math_rows(str(tmp_path / "math.jsonl"), template="Q: {question}")
    assert m == [{"prompt": "Q: Half?", "answer": "\\frac{1}{2}", "level": "Level 1"}]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "no marker"}))
    with pytest.raises(sapo.ConfigError, match="#### <number>"):
        gsm8k_rows(str(tmp_path / "bad.jsonl"))


def test_training_with_math_rewards(base_config, tmp_path):
    rows = [{"prompt": f"What is {a}+{b}? Put it in \\boxed{{}}.", "answer": str(a + b)} for a in range(4) for b in range(4)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "dataset": str(tmp_path / "m.jsonl"), "max_prompt_length": 64,
                                              "reward_funcs": ["math_accuracy", "format_boxed"], "max_steps": 1}))
    history = trainer.train()
    assert history[0]["rewards/math_accuracy/timeouts"] == 0.0
    assert "rewards/math_accuracy/mean" in history[0] and "rewards/format_boxed/mean" in history[0]


def test_training_on_a_gsm8k_file(base_config, tmp_path):
    rows = [{"question": f"{a}+{b}?", "answer": f"work\n#### {a + b}"} for a in range(4) for b in range(4)]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "dataset": str(tmp_path / "g.jsonl"), "dataset_format": "gsm8k",
                                              "prompt_template": "Q: {question} A:", "max_prompt_length": 64,
                                              "reward_funcs": ["math_accuracy"], "max_steps": 1}))
    assert trainer.train_set.rows[0]["prompt"].startswith("Q: ") and "answer" in trainer.train_set.rows[0]
    assert len(trainer.train()) == 1
