import json
import sys
import threading
import time

import pytest

import sapo
from sapo.data import gsm8k_rows, math_rows
from sapo.rewards import (
    format_reward,
    load_reward_function,
    math_accuracy,
    math_answers,
)
from sapo.rewards.math_answers import MathChecker, final_answer, last_boxed

PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"  # sympy computes the power in C: only a kill stops it
SLOW_START = 3.0
SLOW_WORKER = [sys.executable, "-c", (f"import runpy, time; time.sleep({SLOW_START}); "
                                      f"runpy.run_path({math_answers.WORKER_FILE!r}, run_name='__main__')")]


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
    ("3", "\\boxed{x = 3}"), ("3", "\\boxed{x=3}"), ("3", "\\boxed{y_1 = 3}"), ("3", "\\boxed{\\theta = 3}"),
    ("3", "\\boxed{AB = 3}"), ("(1,3)", "\\boxed{x \\in (1,3)}"),  # naming the unknown is fine
    ("3", "\\boxed{f(2) = 3}"), ("3", "\\boxed{P(A) = 3}"), ("3", "\\boxed{|x| = 3}"), ("3", "\\boxed{x^2 = 3}"),
    ("30", "\\boxed{\\angle ABC = 30}"), ("12", "\\boxed{\\text{Area} = 12}"),  # naming any quantity is too
    ("3", "\\boxed{\\frac{6}{2} = 3}"), ("3", "\\boxed{x = 6/2 = 3}"),  # a chain whose values agree
    ("2, 3", "\\boxed{x = 2, x = 3}"), ("2, 3", "\\boxed{x = 2 \\text{ or } x = 3}"),  # one value per piece
    ("\\frac{1}{3}", "\\boxed{x = \\frac{1}{3} \\approx 0.33}"), ("3", "\\boxed{x \\approx 3}"),  # approximations
    ("3", "\\boxed{x \\equiv 3 \\pmod{5}}"), ("3", "\\boxed{e = 3}"), ("(1,2)", "\\boxed{(x,y) = (1,2)}"),
    ("x=3", "\\boxed{x = 3}"), ("x>3", "\\boxed{x > 3}"), ("y=2x+1", "\\boxed{y = 2x+1}"),  # gold relations
    ("1, 3", "\\boxed{1 \\text{ or } 3}"), ("3", "\\boxed{\\{3\\}}"),
    ("3", "\\boxed{3} and later \\boxed{4"),  # a box cut off by the length limit does not count
])
def test_equivalent_forms_earn_the_reward(gold, completion):
    assert math_accuracy(["q"], [completion], [gold]) == [1.0]


@pytest.mark.parametrize("gold,completion", [
    ("12", "\\boxed{13}"), ("12", "no number here"), ("12", ""), ("0.5", "\\boxed{\\frac{1}{3}}"),
    ("12", "12 then \\boxed{7}"),  # a box beats a bare number
])
def test_wrong_or_missing_answers_do_not(gold, completion):
    assert math_accuracy(["q"], [completion], [gold]) == [0.0]


@pytest.mark.parametrize("gold,completion", [
    ("3", "\\boxed{4 = 3}"), ("4", "\\boxed{\\frac{6}{2} = 4}"), ("3", "\\boxed{4 \\equiv 3 \\pmod{5}}"),  # false
    ("3", "\\boxed{x = 2, x = 3}"), ("3", "\\boxed{x = }"), ("4", "\\boxed{x = 3 \\approx 4}"),
    ("3", "\\boxed{(x = 4), x = 3}"), ("4", "\\boxed{x = 3 \\text{ or } (x = 4)}"),  # relations inside brackets
    ("3", "\\boxed{\\boxed{3} = 4}"), ("3", "\\boxed{4 = \\boxed{3}}"),  # the outer box counts
    ("57", "\\boxed{x = 3 = 57}"), ("3", "\\boxed{a = b = 3}"), ("3", "\\boxed{4 == 3}"),  # chains
    ("3", "\\boxed{4 \\equiv 3}"), ("3", "\\boxed{2 \\implies 3}"), ("3", "\\boxed{x = 2 \\Rightarrow 3}"),
    ("3", "\\boxed{4 \\sim 3}"), ("3", "\\boxed{x \\to 3}"), ("3", "\\boxed{x := 3}"), ("3", "\\boxed{2 \\in 3}"),
    ("3", "\\boxed{1 \\lor 3}"), ("3", "\\boxed{1 \\vee 3}"), ("3", "\\boxed{1 \\land 3}"),
    ("3", "\\boxed{1 \\wedge 3}"),
])
def test_a_relation_or_connective_does_not_score_by_its_last_part(gold, completion):
    # math-verify alone scores each of these 1.0: it reads a relation or a chain by its last part
    assert math_accuracy(["q"], [completion], [gold]) == [0.0]


@pytest.mark.parametrize("gold,completion", [("1, 3", "\\boxed{1 \\lor 3}"), ("1, 3", "\\boxed{3 \\vee 1}")])
def test_a_disjunction_scores_against_a_gold_set(gold, completion):
    assert math_accuracy(["q"], [completion], [gold]) == [1.0]


def test_unparseable_gold_does_not_count():
    assert math_accuracy(["q"], ["\\boxed{3}"], [""]) == [None]
    assert math_accuracy(["q"] * 3, ["\\boxed{3}"] * 3, [None, "3", None]) == [None, 1.0, None]  # missing gold


def test_extraction():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert final_answer("3 then 1,234.5 apples") == "1234.5"


def test_a_completion_cut_inside_a_box_falls_back_to_the_last_closed_box():
    assert final_answer("\\boxed{3} so 7 ... \\boxed{4") == "3"  # not 4, nor the bare 7
    assert last_boxed("\\fbox{\\frac{1}{2}} then \\boxed{\\frac{3}{") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{a} \\boxed{\\sqrt{\\frac{1}{2}}} \\fbox{x^{2") == "\\sqrt{\\frac{1}{2}}"
    assert last_boxed("\\boxed{2} \\boxed{\\boxed{5}") == "5"  # a closed box inside a cut one is the last closed
    assert final_answer("it is 7, \\boxed{") == "7"  # no closed box at all: the last number


def test_a_pathological_answer_cannot_hang_or_crash_training():
    checker = MathChecker(workers=1, timeout=2.0)
    try:
        checker.start()  # start-up (two processes importing sympy) is not what this times
        start = time.monotonic()
        out = checker.check([("3", PATHOLOGICAL), ("3", "\\boxed{3}")])
        assert out == [0.0, 1.0] and time.monotonic() - start < 10
        assert checker.metrics() == {"timeouts": 1.0, "errors": 0.0, "startup_failures": 0.0, "unscored": 0.0}
        assert checker.check([("2", "\\boxed{2}")]) == [1.0]  # the killed worker was replaced
    finally:
        checker.close()


def test_a_workers_start_up_does_not_count_against_an_answers_time_limit(monkeypatch):
    monkeypatch.setattr(math_answers, "WORKER_COMMAND", SLOW_WORKER)  # surely longer than the time limit
    checker = MathChecker(workers=1, timeout=0.5)
    try:
        assert checker.check([("2", "\\boxed{2}"), ("3", "\\boxed{3}")]) == [1.0, 1.0]
        assert checker.metrics() == {"timeouts": 0.0, "errors": 0.0, "startup_failures": 0.0, "unscored": 0.0}
    finally:
        checker.close()


def test_a_timed_out_answer_does_not_make_the_next_one_wait_for_a_new_workers_start_up(monkeypatch):
    checker = MathChecker(workers=1, timeout=1.0)
    try:
        checker.start()  # the worker and its spare
        monkeypatch.setattr(math_answers, "WORKER_COMMAND", SLOW_WORKER)  # every replacement from now on
        start = time.monotonic()
        assert checker.check([("3", PATHOLOGICAL), ("2", "\\boxed{2}")]) == [0.0, 1.0]
        # The spare took over at the deadline; waiting for a replacement would take SLOW_START more.
        # Expected ~1.2 s: the bound is loose against a busy machine, not a measure of the cost.
        assert time.monotonic() - start < 1.0 + SLOW_START
        # Now the only spare is the slow one, still starting: the next answer waits for it, but
        # its start-up is not counted against that answer's time limit.
        assert checker.check([("3", PATHOLOGICAL), ("2", "\\boxed{2}")]) == [0.0, 1.0]
        assert checker.metrics() == {"timeouts": 2.0, "errors": 0.0, "startup_failures": 0.0, "unscored": 0.0}
    finally:
        checker.close()


@pytest.mark.parametrize("fault", ["slow", "crash"])
def test_the_pool_recovers_from_workers_that_do_not_start(monkeypatch, fault):
    if fault == "slow":  # starting takes longer than STARTUP_SECONDS
        monkeypatch.setattr(math_answers, "STARTUP_SECONDS", 0.01)
    else:  # the worker exits before saying it is ready
        monkeypatch.setattr(math_answers, "WORKER_COMMAND", [sys.executable, "-c", "raise SystemExit(1)"])
    checker = MathChecker(workers=2, timeout=5.0)
    try:
        start = time.monotonic()
        assert checker.check([("2", "\\boxed{2}"), ("3", "\\boxed{3}")]) == [None, None]  # not the answers' fault
        assert time.monotonic() - start < 60
        assert checker.metrics() == {"timeouts": 0.0, "errors": 0.0, "startup_failures": 3.0, "unscored": 2.0}
        monkeypatch.undo()
        assert checker.check([("2", "\\boxed{2}"), ("3", "\\boxed{4}")]) == [1.0, 0.0]  # new workers, scored again
        assert checker.metrics() == {"timeouts": 0.0, "errors": 0.0, "startup_failures": 0.0, "unscored": 0.0}
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
    assert tag(["q"] * 3, ["think <answer>3</answer>", "<answer></answer>",
                           "<answer>3</answer> more"]) == [1.0, 0.0, 0.0]
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
    rows = [{"prompt": f"What is {a}+{b}? Put it in \\boxed{{}}.", "answer": str(a + b)}
            for a in range(4) for b in range(4)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "dataset": str(tmp_path / "m.jsonl"),
                                              "max_prompt_length": 64,
                                              "reward_funcs": ["math_accuracy", "format_boxed"], "max_steps": 1}))
    history = trainer.train()
    assert history[0]["rewards/math_accuracy/timeouts"] == 0.0
    assert "rewards/math_accuracy/mean" in history[0] and "rewards/format_boxed/mean" in history[0]


def test_training_on_a_gsm8k_file(base_config, tmp_path):
    rows = [{"question": f"{a}+{b}?", "answer": f"work\n#### {a + b}"} for a in range(4) for b in range(4)]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "dataset": str(tmp_path / "g.jsonl"),
                                              "dataset_format": "gsm8k", "prompt_template": "Q: {question} A:",
                                              "max_prompt_length": 64,
                                              "reward_funcs": ["math_accuracy"], "max_steps": 1}))
    assert trainer.train_set.rows[0]["prompt"].startswith("Q: ") and "answer" in trainer.train_set.rows[0]
    assert len(trainer.train()) == 1
