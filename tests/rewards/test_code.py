"""Model-written programs: correct and wrong ones, and hostile ones that must be contained with
reward 0 while the test (trainer) process is unharmed."""

import os
import socket
import threading
import time

import pytest

import sapo
from sapo.rewards.code import CodeRunner, code_tests_reward, extract_program, same_output
from sapo.rewards.sandbox import Limits, Sandbox, _RunUids

LIMITS = Limits(wall_seconds=5.0, cpu_seconds=3, memory_bytes=512 << 20, file_bytes=1 << 20, processes=64,
                output_bytes=1 << 16)


@pytest.fixture(scope="module")
def reward():
    return code_tests_reward(runner=CodeRunner(Sandbox(LIMITS)))


def fenced(code: str) -> str:
    return f"Here you go:\n```python\n{code}\n```\n"


ECHO_TESTS = [{"input": "3\n", "output": "6"}, {"input": "10\n", "output": "20\n"}]


def test_correct_wrong_and_partial_programs(reward):
    completions = [fenced("print(int(input()) * 2)"), fenced("print(int(input()) + 1)"), "no code at all",
                   fenced("n = int(input())\nprint(6 if n == 3 else 0)")]
    assert reward(["p"] * 4, completions, [ECHO_TESTS] * 4) == [1.0, 0.0, 0.0, 0.5]
    strict = code_tests_reward(all_or_nothing=True, runner=CodeRunner(Sandbox(LIMITS)))
    assert strict(["p"], [completions[3]], [ECHO_TESTS]) == [0.0]


def test_assert_style_tests_and_no_tests(reward):
    program = fenced("def add(a, b):\n    return a + b")
    assert reward(["p"], [program], [["assert add(1, 2) == 3", "assert add(2, 2) == 5"]]) == [0.5]
    assert reward(["p"], [program], [[]]) == [None]


def test_exiting_early_does_not_pass_assert_tests(reward):
    for cheat in ("import sys\nsys.exit(0)", "import os\nos._exit(0)",
                  "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(0)"):
        program = fenced(f"{cheat}\ndef add(a, b):\n    return 0")
        assert reward(["p"], [program], [["assert add(1, 2) == 3"]]) == [0.0], cheat


def test_faking_a_sandbox_failure_scores_zero(reward):
    program = fenced("import sys\nsys.stderr.write('bwrap: Resource temporarily unavailable\\n')\nsys.exit(1)")
    assert reward(["p"], [program], [ECHO_TESTS[:1]]) == [0.0]


def test_large_input_streamed_through_the_program(reward):
    lines = "\n".join(str(i) for i in range(200_000))
    program = fenced("import sys\nprint(sum(int(line) for line in sys.stdin))")
    assert reward(["p"], [program], [[{"input": lines, "output": str(sum(range(200_000)))}]]) == [1.0]


def test_only_the_system_python_is_visible():
    result = Sandbox(LIMITS).run_python("import os\nprint(sorted(os.listdir('/')))")
    assert "root" not in result.stdout and "work" not in result.stdout and "usr" in result.stdout


def test_output_must_match_whole():
    assert same_output("6  \n\n", "6") and same_output("a\nb ", "a\nb\n")
    assert not same_output("6\n7", "6") and not same_output("66", "6") and not same_output("", "6")
    assert extract_program("```python\na\n```\ntext\n```\nb\n```") == "a\n"  # tagged beats bare output
    assert extract_program("```Python\r\nprint(1)\r\n```") == "print(1)\n"
    assert extract_program("```\nx = 1\n```\n```py\nprint('```')\n```") == "print('```')\n"
    assert extract_program("no fence") is None


def test_functional_tests_compare_the_returned_value_outside_the_program(reward):
    # The program's own prints, and a main block that would read stdin, do not disturb the result.
    noisy = ("def f(x):\n    print('3', flush=True)\n    return {'a': [x, None]}\n"
             "if __name__ == '__main__':\n    input()\n")
    cases = [  # (body of f, expected, score): True is not 1, floats within 1e-9, tuples count as lists
        ("return True", 1, 0.0), ("return 1", True, 0.0), ("return 0", False, 0.0), ("return 0.1 + 0.2", 0.3, 1.0),
        ("return 3.0", 3, 1.0), ("return 0.3001", 0.3, 0.0), ("return (x, 2)", [1, 2], 1.0), ("return None", None, 1.0),
        ("return {x}", [1], 0.0), ("return [x]", [1, 2], 0.0), ("return str(x)", 1, 0.0),
        # An integer answer is exact: near-misses that a float tolerance would let through.
        ("return float(10**12 + 1)", 10**12, 0.0), ("return 1000000005.0", 1000000004, 0.0),
        ("return 1e30", 10**30 + 12345, 0.0), ("return 1e-13", 0, 0.0), ("return 7.5", 7, 0.0),
        ("return 1e15", 10**15, 1.0),
    ]
    completions = [fenced(noisy)] + [fenced(f"def f(x):\n    {body}") for body, _, _ in cases]
    tests = [[{"fn_name": "f", "inputs": [1], "output": {"a": [1, None]}}]] + [
        [{"fn_name": "f", "inputs": [1], "output": expected}] for _, expected, _ in cases]
    assert reward([""] * len(tests), completions, tests) == [1.0] + [score for _, _, score in cases]


def test_livecodebench_tests_and_solution_classes(reward):
    # LiveCodeBench keeps the function's name in the row's metadata ('func_name'); a converted
    # test carries it as 'fn_name', the rest as LiveCodeBench writes it.
    leetcode = "class Solution:\n    def maxSum(self, nums, k):\n        return sum(sorted(nums)[-k:])"
    functional = [{"input": "[2, 7, 1]\n2", "output": "9", "testtype": "functional", "fn_name": "maxSum"},
                  {"input": "[5]\n1", "output": "5", "testtype": "functional", "fn_name": "maxSum"}]
    stdin = [{"input": "2 7\n", "output": "9\n", "testtype": "stdin"}]
    got = reward([""] * 3, [fenced(leetcode), fenced(leetcode.replace("[-k:]", "[:k]")),
                            fenced("print(sum(map(int, input().split())))")], [functional, functional, stdin])
    assert got == [1.0, 0.5, 1.0]


def test_assert_snippets_are_checked_outside_the_program(reward):
    # Converted to calls: the literal stays in the trainer, tuple arguments stay tuples, and the
    # comparison is the type-aware one (a True does not pass `== 1`).
    program = fenced("def join(a, b):\n    return a + tuple(b)\ndef one():\n    return True")
    tests = ["assert join((1, 2), [3]) == (1, 2, 3)", "assert (4,) == join((), [4]), 'message'", "assert one() == 1"]
    assert reward([""], [program], [tests]) == [2 / 3]


BAD_TESTS = {
    "input null": ({"input": None, "output": "1"}, r"'input' must be a string.*null.*'' for no input"),
    "output null": ({"input": "", "output": None}, r"'output' must be a string.*null"),
    "output not text": ({"input": "", "output": 6}, r"'output' must be a string.*'6'.*fn_name"),
    "misspelt key": ({"input": "", "ouput": "1"}, r"unknown field\(s\) \['ouput'\]"),
    "inputs not a list": ({"fn_name": "f", "inputs": 3, "output": 1}, r"'inputs' must be a list"),
    "no fn_name": ({"testtype": "functional", "input": "1", "output": "1"}, r"needs 'fn_name'.*func_name"),
    "bad JSON lines": ({"testtype": "functional", "fn_name": "f", "input": "{x", "output": "1"},
                       r"one JSON value per line"),
    "unknown testtype": ({"testtype": "batch", "input": "", "output": "1"},
                         r"'testtype' must be 'stdin' or 'functional'"),
    "expected a set": ({"fn_name": "f", "inputs": [1], "output": {1, 2}}, r"expected value.*a set"),
    "NaN argument": ({"fn_name": "f", "inputs": [float("nan")], "output": 1}, r"arguments.*NaN"),
    "not a dict": (42, r"is a int; a test is a dict"),
    "other comparison": ("assert add(1, 2) > 2", r"not of the form `assert NAME\(literal, ...\) == literal`.*fn_name"),
    "non-literal argument": ("assert add(x, 2) == 3", r"must be literals"),
    "two asserts": ("assert add(1, 2) == 3\nassert add(2, 2) == 4", r"one assert per test"),
    "keyword argument": ("assert add(1, b=2) == 3", r"not of the form"),
}


@pytest.mark.parametrize("name", list(BAD_TESTS))
def test_malformed_tests_are_refused_naming_the_row_and_field(reward, name):
    bad, message = BAD_TESTS[name]
    with pytest.raises(ValueError, match=r"test 1 of completion 1\b.*" + message):
        reward([""] * 2, [fenced("print(1)")] * 2, [[], [{"input": "", "output": "1"}, bad]])


def test_timeouts_are_counted():
    limits = Limits(wall_seconds=1.0, cpu_seconds=5, memory_bytes=512 << 20, file_bytes=1 << 20, processes=64,
                    output_bytes=1 << 16)
    runner = CodeRunner(Sandbox(limits))
    slow = fenced("import time\ndef f():\n    time.sleep(3)\n    return 1\ntime.sleep(3)")
    got = code_tests_reward(runner=runner)([""] * 3, [slow, slow, fenced("def f():\n    return 1")],
                                           [[{"input": "", "output": "1"}],
                                            [{"fn_name": "f", "inputs": [], "output": 1}],
                                            [{"fn_name": "f", "inputs": [], "output": 1}]])
    assert got == [0.0, 0.0, 1.0]
    assert runner.metrics() == {"infra_errors": 0.0, "timeouts": 2.0}
    assert runner.metrics() == {"infra_errors": 0.0, "timeouts": 0.0}  # counts since the last call


def test_parallelism_never_exceeds_the_core_count(monkeypatch):
    from sapo.rewards.sandbox import Result

    class Counting:
        def __init__(self):
            self.now = self.most = 0
            self.lock = threading.Lock()

        def run_python(self, program, stdin=""):
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(0.05)
            with self.lock:
                self.now -= 1
            return Result("ok", 0, "1\n", "")

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    sandbox = Counting()
    runner = CodeRunner(sandbox, parallel=8)
    assert runner.parallel == 3 and CodeRunner(sandbox).parallel == 3
    # Two callers at once (two rewards sharing the runner) share the cap too.
    callers = [threading.Thread(target=runner.score, args=(["print(1)"] * 12, [[{"input": "", "output": "1"}]] * 12),
                                kwargs={"all_or_nothing": False}) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert sandbox.most == 3


HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "memory bomb": "x = []\nwhile True:\n    x.append(bytearray(50 << 20))",
    "huge file": "with open('big', 'wb') as f:\n    while True:\n        f.write(b'0' * (1 << 20))",
    "write outside": "open('/root/pwned', 'w').write('x')\nprint(int(input()) * 2)",
    "gigabytes of output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_programs_are_contained(reward, name):
    assert reward(["p"], [fenced(HOSTILE[name])], [ECHO_TESTS[:1]]) == [0.0]
    assert not os.path.exists("/root/pwned")


def test_no_secrets_from_the_environment(reward, monkeypatch):
    monkeypatch.setenv("SAPO_TEST_SECRET", "hunter2")
    program = fenced("import os\nprint(os.environ.get('SAPO_TEST_SECRET', 'none'))")
    assert reward(["p"], [program], [[{"input": "", "output": "none"}]]) == [1.0]


def test_no_network_even_to_localhost(reward):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(8)
    port = listener.getsockname()[1]
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_accept(listener)))
    thread.start()
    program = fenced(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
                     "print('sent')")
    assert reward(["p"], [program], [[{"input": "", "output": "sent"}]]) == [0.0]
    thread.join()
    listener.close()
    assert seen == [None], "the listener saw a connection"


def _accept(listener):
    try:
        conn, _ = listener.accept()
        conn.close()
        return "connected"
    except OSError:
        return None


def test_cannot_kill_the_trainer(reward):
    program = fenced(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\nprint('still here')")
    assert reward(["p"], [program], [[{"input": "", "output": "x"}]]) == [0.0]
    # and this test process is still running to say so


def test_training_with_code_rewards(base_config, tmp_path):
    import json

    rows = [{"prompt": f"Write a program that prints {i}.", "tests": [{"input": "", "output": str(i)}]}
            for i in range(8)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "dataset": str(tmp_path / "c.jsonl"),
                                              "max_prompt_length": 64, "reward_funcs": ["code_tests"], "max_steps": 1}))
    history = trainer.train()
    assert history[0]["rewards/code_tests/infra_errors"] == 0.0 and history[0]["rewards/code_tests/mean"] == 0.0
    assert history[0]["rewards/code_tests/timeouts"] == 0.0


def test_without_bubblewrap_the_run_refuses_to_start_unless_allowed(base_config, tmp_path, monkeypatch, recwarn):
    import json
    import shutil

    from sapo.rewards.sandbox import SandboxUnavailable

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap.*allow_unsandboxed_code=true"):
        Sandbox(LIMITS)
    rows = [{"prompt": "Print 1.", "tests": [{"input": "", "output": "1"}]}] * 4
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = {**base_config, "dataset": str(tmp_path / "c.jsonl"), "max_prompt_length": 64, "max_steps": 1}
    fresh = code_tests_reward(runner=CodeRunner())
    monkeypatch.setitem(sapo.rewards.REWARDS._entries, "code_tests_fresh", fresh)
    with pytest.raises(SandboxUnavailable):
        sapo.Trainer(sapo.TrainConfig(**{**config, "reward_funcs": ["code_tests_fresh"]}))
    unsandboxed = Sandbox(LIMITS, allow_unsandboxed=True)
    assert not unsandboxed.isolated and any("UNSANDBOXED" in str(w.message) for w in recwarn)
    result = unsandboxed.run_python("import os\nprint(os.environ.get('HOME'), os.getuid() if os.geteuid() else 'root')")
    home, uid = result.stdout.split()
    assert home == "None" and (int(uid) >= 1 << 16 if os.geteuid() == 0 else int(uid) == os.getuid())


def test_a_program_has_its_process_budget_whatever_runs_beside_it():
    # Each program needs 11 of its 16 processes/threads; four run at once, next to a program that
    # takes all of its own. With one budget per uid shared by the four, threads failed to start.
    limits = Limits(wall_seconds=5.0, cpu_seconds=3, memory_bytes=512 << 20, file_bytes=1 << 20, processes=16,
                    output_bytes=1 << 16)
    threads = ("import time\nfrom concurrent.futures import ThreadPoolExecutor\n"
               "def f(x):\n    time.sleep(0.3)\n    return x * x\n"
               "with ThreadPoolExecutor(10) as ex:\n    print(sum(ex.map(f, range(10))))")
    hog = ("import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(5)")
    runner = CodeRunner(Sandbox(limits, concurrency=4), parallel=4)
    tests = [[{"input": "", "output": "285"}]] * 8
    got = code_tests_reward(runner=runner)(prompts=[""] * 8, completions=[fenced(hog)] + [fenced(threads)] * 7,
                                           tests=tests)
    assert got == [0.0] + [1.0] * 7


def test_tests_that_are_not_a_list_are_an_error_naming_the_column(reward):
    for bad in ("assert add(1, 2) == 3", {"input": "", "output": "1"}):
        with pytest.raises(ValueError, match=r"`tests` column must hold a list.*completion 1"):
            reward(prompts=["", ""], completions=[fenced("print(1)")] * 2, tests=[[], bad])
    assert reward(prompts=[""], completions=[fenced("print(1)")], tests=[None]) == [None]


def test_run_uids_come_from_the_mapped_range_or_fall_back_to_nobody(monkeypatch):
    import sapo.rewards.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_can_become", lambda uid: True)
    monkeypatch.setattr(sandbox, "_mapped_uid_ranges", lambda: [(0, 65536)])  # a typical container
    assert {_RunUids().take() for _ in range(3)} == {65534}
    monkeypatch.setattr(sandbox, "_mapped_uid_ranges", lambda: [(0, 1_000_000_000)])  # LXD's default
    uids = [_RunUids().take() for _ in range(50)]
    assert all(500_000_000 <= u < 1_000_000_000 for u in uids) and len(set(uids)) == 50
    one = _RunUids()
    assert len({one.take() for _ in range(100)}) == 100
    monkeypatch.setattr(sandbox, "_can_become", lambda uid: False)  # setpriv refuses it: share nobody
    assert _RunUids().take() == 65534
