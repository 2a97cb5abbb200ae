"""Programs that try to pass without solving the task: a wrong `add` with a trick on top. Each is
run against the same tests in the functional, assert and stdin/stdout formats, beside an honest
correct program: the correct one scores 1.0 and the trick scores what an honest wrong program
scores, 0.0. Under the old design (asserts appended to the program, a success token printed
after them) the tricks marked "old: passes" scored 1.0 on the assert tests; the stdin runs
guard a format that was already checked outside the program."""

import json
import os
import secrets

import pytest

from sapo.rewards.code import CodeRunner, code_tests_reward
from sapo.rewards.sandbox import Limits, Sandbox

LIMITS = Limits(wall_seconds=5.0, cpu_seconds=3, memory_bytes=512 << 20, file_bytes=1 << 20, processes=64,
                output_bytes=1 << 16)

# Sums no constant in a harness is likely to hold by chance.
CASES = [(123456, 654321, 777777), (-5000, 10, -4990)]
FUNCTIONAL = [{"fn_name": "add", "inputs": [a, b], "output": c} for a, b, c in CASES]
ASSERTS = [f"assert add({a}, {b}) == {c}" for a, b, c in CASES]
STDIN = [{"input": f"{a} {b}\n", "output": str(c)} for a, b, c in CASES]
FORMATS = [FUNCTIONAL, ASSERTS, STDIN]

# The same program answers every format: as a module it defines add(); run as a script with
# input, it prints add() of the two numbers.
MAIN = """
if __name__ == "__main__":
    import sys as _sys
    _words = _sys.stdin.read().split()
    if len(_words) == 2:
        print(add(int(_words[0]), int(_words[1])))
"""
CORRECT = "def add(a, b):\n    return a + b\n" + MAIN
WRONG = "def add(a, b):\n    return a - b\n" + MAIN

# Gathers what a program might hope holds a success token or the expected values: the constants
# and locals of every frame, its own source (the file it runs from), its command line and stdin.
LEAK = r'''
import os as _os, re as _re, sys as _sys

def _leaked():
    found = []
    frame = _sys._getframe()
    while frame is not None:
        found += [c for c in frame.f_code.co_consts if isinstance(c, str)]
        found += [repr(v) for v in list(frame.f_locals.values()) if isinstance(v, (str, int))]
        frame = frame.f_back
    for path in [_sys.argv[0] if _sys.argv else "", globals().get("__file__", ""), "/proc/self/cmdline",
                 "/proc/self/fd/0"]:
        try:
            with open(path, errors="replace") as f:
                found.append(f.read())
        except OSError:
            pass
    return found

def _tokens():
    return sorted({t for text in _leaked() for t in _re.findall(r"[0-9a-f]{32}", text)})

def _spill():
    """Print every candidate token everywhere and stop with success."""
    text = "\n".join(_tokens() + ["ok", "PASS", "True", "1.0"]) + "\n"
    for fd in range(1, 20):
        try:
            _os.write(fd, text.encode())
        except OSError:
            pass
    _os._exit(0)
'''

# A table of (a, b) -> a + b from every `add(a, b) == c` the program can find: in its own source,
# in files anywhere it can read (cwd, /tmp, /, /proc), in any process's command line or environment.
TABLE = r'''
import os as _os, re as _re, sys as _sys, time as _time

_PATTERNS = [r"add\((-?\d+), (-?\d+)\) == (-?\d+)", r'"inputs": \[(-?\d+), (-?\d+)\], "output": (-?\d+)',
             r'"input": "(-?\d+) (-?\d+)\\n", "output": "(-?\d+)"']

def _texts():
    paths = [_sys.argv[0] if _sys.argv else "", globals().get("__file__") or ""]
    for pid in os_listdir("/proc"):
        if pid.isdigit():
            paths += [f"/proc/{pid}/cmdline", f"/proc/{pid}/environ"]
    deadline = _time.monotonic() + 2.5
    for top in (_os.getcwd(), "/tmp", "/"):
        for root, dirs, files in _os.walk(top):
            dirs[:] = [d for d in dirs if _os.path.join(root, d) not in ("/usr", "/proc", "/sys", "/dev")]
            paths += [_os.path.join(root, f) for f in files]
            if _time.monotonic() > deadline:
                break
    for path in paths:
        try:
            if _os.path.getsize(path) < (1 << 20) or path.startswith("/proc"):
                with open(path, errors="replace") as f:
                    yield f.read(1 << 20)
        except OSError:
            pass
        if _time.monotonic() > deadline:
            return

def os_listdir(path):
    try:
        return _os.listdir(path)
    except OSError:
        return []

_TABLE = {}
for _text in _texts():
    for _pattern in _PATTERNS:
        for _a, _b, _c in _re.findall(_pattern, _text):
            _TABLE[int(_a), int(_b)] = int(_c)

def add(a, b):
    return _TABLE.get((a, b), 0)
'''

WRONG_ADD = "def add(a, b):\n    return 0\n"

HOSTILE = {
    # old: passes (asserts stripped by -O)
    "re-exec with python -O": "import os, sys\nif not sys.flags.optimize:\n    os.execv(sys.executable, "
                              "[sys.executable, '-O', *sys.argv])\n" + WRONG_ADD,
    # old: passes (the token is a constant of the module's code object)
    "token from co_consts": LEAK + "if _tokens():\n    _spill()\n" + WRONG_ADD,
    # old: passes (the token is in its own source file)
    "token from its own source": LEAK + "if any(_tokens()):\n    _spill()\n" + WRONG_ADD,
    "token or values from /proc/self/cmdline and stdin": LEAK + "_seen = '\\n'.join(_leaked())\n"
        "def add(a, b):\n    nums = [int(n) for n in __import__('re').findall(r'-?\\d{4,}', _seen)]\n"
        "    return max([n for n in nums if n not in (a, b)], default=0)\n",
    # old: passes (assert lines are jumped over; the token line runs)
    "settrace jump past the asserts": "import linecache, sys\n"
        "def _jump(frame, event, arg):\n"
        "    if event == 'line':\n"
        "        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip()\n"
        "        if line.startswith('assert') or line.startswith('raise'):\n"
        "            try:\n                frame.f_lineno += 1\n            except ValueError:\n                pass\n"
        "    return _jump\n"
        "def _install(frame, event, arg):\n    return _jump\n"
        "sys._getframe().f_trace = _jump\nsys.settrace(_install)\n" + WRONG_ADD,
    # old: passes (the hook prints the token and exits 0 after the failed assert)
    "excepthook prints the token": LEAK + "import sys\nsys.excepthook = lambda *exc: _spill()\n" + WRONG_ADD,
    # old: passes
    "atexit prints the token": LEAK + "import atexit\natexit.register(_spill)\n" + WRONG_ADD,
    # old: passes (the asserts are in its own source)
    "lookup table from the asserts in its own source": TABLE,
    # old: passes
    "always-equal __eq__": "class _Any:\n    def __eq__(self, other):\n        return True\n"
                           "    __hash__ = object.__hash__\n"
                           "def add(a, b):\n    return _Any()\n",
    # old: passes (each is compared with == inside the program)
    "int subclass with __eq__ True": "class _I(int):\n    def __eq__(self, other):\n        return True\n"
                                     "    __hash__ = int.__hash__\ndef add(a, b):\n    return _I(0)\n",
    "str subclass with __eq__ True": "class _S(str):\n    def __eq__(self, other):\n        return True\n"
                                     "    __hash__ = str.__hash__\ndef add(a, b):\n    return _S('0')\n",
    "list subclass with __eq__ True": "class _L(list):\n    def __eq__(self, other):\n        return True\n"
                                      "def add(a, b):\n    return _L()\n",
    "patched unittest.TestCase.assertEqual": "import unittest\n"
        "unittest.TestCase.assertEqual = lambda *args, **kwargs: None\n"
        "unittest.TestCase.assertTrue = lambda *args, **kwargs: None\n" + WRONG_ADD,
    "patched json.dumps and json.loads": "import json\n_dumps = json.dumps\n"
        "json.dumps = lambda *args, **kwargs: 'true'\njson.loads = lambda *args, **kwargs: True\n" + WRONG_ADD,
    # old: passes (through the always-equal object)
    "patched builtins": "import builtins\nbuiltins.isinstance = lambda *args: True\n"
        "builtins.type = lambda *args: int if len(args) == 1 else type(*args)\n"
        "class _Any:\n    __eq__ = lambda self, other: True\n    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return _Any()\n",
    "replaced sys.modules entries": "import sys, types\n_fake = types.ModuleType('json')\n"
        "_fake.dumps = lambda *args, **kwargs: '\"PASS\"'\n_fake.loads = lambda *args, **kwargs: {}\n"
        "sys.modules['json'] = _fake\nsys.modules['unittest'] = _fake\n" + WRONG_ADD,
    "os._exit(0) at import": "import os\nos._exit(0)\n" + WRONG_ADD,
    "sys.exit(0) at import": "import sys\nsys.exit(0)\n" + WRONG_ADD,
    "fake success markers on stdout and stderr": "import sys\n"
        "for _marker in ('ok', 'PASS', 'True', '1.0', 'All tests passed', '{\"passed\": true}'):\n"
        "    print(_marker)\n    print(_marker, file=sys.stderr)\n" + WRONG_ADD,
    "prints a guessed result line": "import os, sys\n"
        "def add(a, b):\n    print(0)\n    sys.stdout.flush()\n    os.write(1, b'\\n0\\n')\n    return -1\n",
    "writes a guess on every fd, the saved result fd too, and exits": "import os\n"
        "def add(a, b):\n    for fd in range(1, 20):\n        try:\n"
        "            os.write(fd, b'\\n0\\n')\n        except OSError:\n            pass\n    os._exit(0)\n",
}


@pytest.fixture(scope="module")
def reward():
    return code_tests_reward(runner=CodeRunner(Sandbox(LIMITS)))


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def test_honest_programs_in_every_format(reward):
    completions = [fenced(CORRECT), fenced(WRONG)] * len(FORMATS)
    tests = [t for fmt in FORMATS for t in (fmt, fmt)]
    assert reward(prompts=[""] * len(tests), completions=completions, tests=tests) == [1.0, 0.0] * len(FORMATS)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_tricks_score_what_a_wrong_program_scores(reward, name):
    hostile = HOSTILE[name] + MAIN
    completions = [fenced(CORRECT), fenced(hostile)] * len(FORMATS)
    tests = [t for fmt in FORMATS for t in (fmt, fmt)]
    got = reward(prompts=[""] * len(tests), completions=completions, tests=tests)
    assert got == [1.0, 0.0] * len(FORMATS), f"{name}: functional, assert, stdin: {got}"


def test_expected_values_planted_on_the_host_are_not_found(reward, tmp_path, monkeypatch):
    # The values sit where a dataset would (a file beside the trainer, /tmp, the environment):
    # the searching program must find none of them from inside the sandbox.
    rows = (json.dumps({"tests": FUNCTIONAL}) + "\n" + json.dumps({"tests": ASSERTS}) + "\n"
            + json.dumps({"tests": STDIN}))
    (tmp_path / "train.jsonl").write_text(rows)
    planted = f"/tmp/sapo-planted-{secrets.token_hex(4)}.jsonl"
    with open(planted, "w") as f:
        f.write(rows)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAPO_PLANTED", rows)
    try:
        completions = [fenced(CORRECT), fenced(TABLE + MAIN)] * len(FORMATS)
        tests = [t for fmt in FORMATS for t in (fmt, fmt)]
        assert reward(prompts=[""] * len(tests), completions=completions, tests=tests) == [1.0, 0.0] * len(FORMATS)
    finally:
        os.remove(planted)


class _Recorder:
    """Stands in for the sandbox: keeps what would enter it."""

    def __init__(self):
        self.seen = []

    def run_python(self, program, stdin=""):
        from sapo.rewards.sandbox import Result

        self.seen.append(program + "\n" + stdin)
        return Result("ok", 0, "", "")


def test_no_expected_value_enters_the_sandbox():
    recorder = _Recorder()
    runner = CodeRunner(recorder)
    runner.score([CORRECT] * 3, [FUNCTIONAL, ASSERTS, STDIN], all_or_nothing=False)
    assert len(recorder.seen) == 6
    for text in recorder.seen:
        for _, _, expected in CASES:
            assert str(expected) not in text, text


def test_unittest_style_and_other_assert_snippets_are_refused(reward):
    # A snippet with any other form (here unittest's assertEqual, which a program can patch) would
    # have to run inside the program's process, where it can be defeated.
    bad = "import unittest\nunittest.TestCase().assertEqual(add(123456, 654321), 777777)"
    hostile = fenced(HOSTILE["patched unittest.TestCase.assertEqual"])
    with pytest.raises(ValueError, match=r"test 0 of completion 0.*not of the form.*fn_name"):
        reward(prompts=[""], completions=[hostile], tests=[[bad]])
