"""Model-written programs: correct and wrong ones, and hostile ones that must be contained with
reward 0 while the test (trainer) process is unharmed."""

import os
import socket
import threading

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
    for cheat in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(0)"):
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
    program = fenced(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\nprint('sent')")
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

    rows = [{"prompt": f"Write a program that prints {i}.", "tests": [{"input": "", "output": str(i)}]} for i in range(8)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "dataset": str(tmp_path / "c.jsonl"), "max_prompt_length": 64,
                                              "reward_funcs": ["code_tests"], "max_steps": 1}))
    history = trainer.train()
    assert history[0]["rewards/code_tests/infra_errors"] == 0.0 and history[0]["rewards/code_tests/mean"] == 0.0


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
