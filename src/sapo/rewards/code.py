"""`code_tests`: run the completion's program against the row's tests, in the sandbox.

Pass/fail is never decided inside the program's process: whatever runs there can rewrite
anything in it (asserts, hooks, `__eq__`, the test harness itself). A stdin/stdout test compares
the program's whole stdout; a functional test runs a fixed harness that calls the function and
writes its return value as JSON, which this process parses and compares. Neither an expected
value nor anything derived from one is sent into the sandbox, so a program passes only by
producing the right output from the inputs.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .registry import completion_text, register_reward
from .sandbox import Limits, Sandbox

# A fence opens and closes at the start of a line; the language tag is optional.
_FENCE = re.compile(r"^```[ \t]*(\w*)[ \t]*\r?\n(.*?)^```", re.DOTALL | re.MULTILINE)

# Floats (on either side) compare with math.isclose at these tolerances; ints exactly.
REL_TOL = 1e-9
ABS_TOL = 1e-12

_DOCS = "see the Code section of docs/rewards.md"


def extract_program(completion: str) -> str | None:
    """The last ```python block (any case of "python", "py", "python3"); if there is none, the
    last untagged block."""
    blocks = _FENCE.findall(completion)
    python = [code for tag, code in blocks if tag.lower() in ("python", "py", "python3")]
    bare = [code for tag, code in blocks if not tag]
    chosen = python or bare
    return chosen[-1].replace("\r\n", "\n") if chosen else None


def same_output(actual: str, expected: str) -> bool:
    """Whole outputs equal after stripping trailing whitespace on every line (and trailing blank
    lines): no prefix matches."""
    def norm(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().split("\n")]

    return norm(actual) == norm(expected)


def same_value(actual: Any, expected: Any) -> bool:
    """Type-aware equality of plain JSON values: a bool equals only a bool (True is not 1), None
    only None, a str only a str; an expected int equals only that int (or a float of exactly that
    integer value); an expected float equals a number within math.isclose(rel_tol=REL_TOL,
    abs_tol=ABS_TOL); lists (tuples count as lists) and dicts compare element by element."""
    try:
        return _same(actual, expected)
    except (RecursionError, OverflowError):  # deep nesting; an int too large for a float
        return False


def _same(a: Any, e: Any) -> bool:
    if isinstance(e, bool) or e is None or isinstance(a, bool) or a is None:
        return type(a) is type(e) and a == e
    if isinstance(e, (int, float)):
        if type(a) not in (int, float):
            return False
        if type(e) is int:
            # An integer answer is exact: with a tolerance, float(n + 1) passes n for n past 1e9,
            # and an off-by-one modulo 1e9+7 scores. A float only as the very same integer.
            return a == e if type(a) is int else a.is_integer() and int(a) == e
        return math.isclose(a, e, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    if isinstance(e, str):
        return type(a) is str and a == e
    if isinstance(e, (list, tuple)):
        return type(a) in (list, tuple) and len(a) == len(e) and all(_same(x, y) for x, y in zip(a, e))
    if isinstance(e, dict):
        return type(a) is dict and a.keys() == e.keys() and all(_same(a[k], e[k]) for k in e)
    return False


@dataclass(frozen=True)
class StdinTest:
    input: str
    output: str


@dataclass(frozen=True)
class CallTest:
    """`fn_name(*args)` must return `expected`; `args` travel to the sandbox as a Python literal."""
    fn_name: str
    args: tuple
    expected: Any


# The trusted program the sandbox runs for a functional test. The candidate's source is a string
# literal in it; the call's name and arguments come on stdin. The candidate's prints go to stderr
# (fd 1 is pointed there), and the result is the last line written on a saved copy of fd 1, after
# which the process ends at once, so that atexit hooks and leftover threads cannot add lines. The
# candidate can still write on that copy, but it never sees the expected value, so what it writes
# is only a guess. Nothing here needs to be tamper-proof: the decision is made outside.
_HARNESS = r'''import ast, builtins, json, os, sys, types
result = os.fdopen(os.dup(1), "w", encoding="utf-8")
os.dup2(2, 1)
sys.stdout = sys.stderr
request = json.loads(sys.stdin.read())
args = ast.literal_eval(request["args"])
module = types.ModuleType("solution")
module.__dict__["__builtins__"] = builtins


def plain(value):
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind in (list, tuple):
        return [plain(item) for item in value]
    if kind is dict:
        if any(type(key) is not str for key in value):
            raise TypeError("a returned dict must have str keys")
        return {key: plain(item) for key, item in value.items()}
    raise TypeError(f"the return value must be None, bool, int, float, str, list, tuple or dict, not {kind!r}")


try:
    exec(compile(SOURCE, "<solution>", "exec"), module.__dict__)
    space = module.__dict__
    solution = space.get("Solution")
    if isinstance(solution, type) and hasattr(solution, request["fn_name"]):
        function = getattr(solution(), request["fn_name"])
    else:
        function = space[request["fn_name"]]
    line = json.dumps(plain(function(*args)))
    result.write("\n" + line + "\n")
    result.flush()
except BaseException:
    import traceback  # only now: importing it costs as much as the rest of a run's start
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
os._exit(0)
'''


def harness(program: str) -> str:
    """The sandbox's program for a functional test of `program` (no test data in it)."""
    return f"SOURCE = {program!r}\n" + _HARNESS


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class CodeRunner:
    """Scores programs against tests with a bounded number of sandboxed runs in parallel: at most
    `parallel`, and never more than the cores this process may use, since each program may take
    a full core up to its CPU limit (more at once would only make correct programs time out)."""

    def __init__(self, sandbox: Sandbox | None = None, parallel: int = 4) -> None:
        if not isinstance(parallel, int) or parallel < 1:
            raise ValueError(f"CodeRunner(parallel=...) must be a positive int, got {parallel!r}")
        self._sandbox = sandbox
        self.parallel = min(parallel, _cores())
        self._lock = threading.Lock()
        # Shared by every score() call on this runner, so concurrent callers add up to the cap too.
        self._turns = threading.BoundedSemaphore(self.parallel)
        self.infra_errors = 0
        self.timeouts = 0

    def prepare(self, allow_unsandboxed: bool = False) -> None:
        """Set up the sandbox now (the trainer calls this at start-up): raises SandboxUnavailable,
        naming the fix, where programs cannot be isolated and the user did not opt in."""
        with self._lock:
            if self._sandbox is None:
                self._sandbox = Sandbox(allow_unsandboxed=allow_unsandboxed, concurrency=self.parallel)

    @property
    def sandbox(self) -> Sandbox:
        self.prepare()
        return self._sandbox

    def run_test(self, program: str, test: Any) -> bool | None:
        """True/False for a passed/failed test; None when the sandbox itself failed."""
        if not isinstance(test, (StdinTest, CallTest)):
            test = parse_test(test)
        with self._turns:
            if isinstance(test, StdinTest):
                result = self.sandbox.run_python(program, test.input)
            else:
                request = json.dumps({"fn_name": test.fn_name, "args": repr(test.args)})
                result = self.sandbox.run_python(harness(program), request)
        if result.status == "infra":
            return None
        if result.status == "timeout":
            with self._lock:
                self.timeouts += 1
        if result.status != "ok" or result.returncode != 0:
            return False
        if isinstance(test, StdinTest):
            return same_output(result.stdout, test.output)
        return _returned(result.stdout, test.expected)

    def score(self, programs: list[str | None], tests: list[list[Any]], *, all_or_nothing: bool) -> list[float | None]:
        # Every test is checked before any program runs: a bad dataset fails at once, not midway.
        parsed = [[t if isinstance(t, (StdinTest, CallTest)) else parse_test(t, row=i, index=j)
                   for j, t in enumerate(row_tests)] for i, row_tests in enumerate(tests)]
        jobs = [(i, p, t) for i, (p, ts) in enumerate(zip(programs, parsed)) if p is not None for t in ts]
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            outcomes = list(pool.map(lambda job: (job[0], self.run_test(job[1], job[2])), jobs))
        scores: list[float | None] = []
        for i, (program, row_tests) in enumerate(zip(programs, parsed)):
            if not row_tests:
                scores.append(None)  # nothing to check: does not apply
                continue
            if program is None:
                scores.append(0.0)
                continue
            passed = [ok for j, ok in outcomes if j == i]
            if any(ok is None for ok in passed):
                with self._lock:
                    self.infra_errors += 1
                scores.append(None)  # not the program's fault: not scored 0
                continue
            fraction = sum(passed) / len(passed)
            scores.append(float(fraction == 1.0) if all_or_nothing else fraction)
        return scores

    def metrics(self) -> dict[str, float]:
        """Counts since the last call: rows not scored for a sandbox failure, and test runs killed
        at the wall-clock limit (scored as failed; many of them under load mean the limit is too
        tight for the machine, not that the programs are wrong)."""
        with self._lock:
            out = {"infra_errors": float(self.infra_errors), "timeouts": float(self.timeouts)}
            self.infra_errors = self.timeouts = 0
        return out


def _returned(stdout: str, expected: Any) -> bool:
    """Whether the harness's last line of output is the JSON of a value equal to `expected`."""
    line = stdout.rstrip("\n").rpartition("\n")[2]
    try:
        actual = json.loads(line)
    except (ValueError, RecursionError):  # also ints past Python's digit limit
        return False
    return same_value(actual, expected)


_STDIN_KEYS = {"input", "output", "testtype"}
_CALL_KEYS = {"fn_name", "inputs", "input", "output", "testtype"}
_FUNCTIONAL_FORM = '{"fn_name": "add", "inputs": [1, 2], "output": 3}'


def parse_test(test: Any, row: int | None = None, index: int | None = None) -> StdinTest | CallTest:
    """One test of a row's `tests`, checked: a stdin/stdout dict, a functional dict (ours or
    LiveCodeBench's) or an `assert NAME(literals) == literal` string. Raises ValueError naming the
    row, the test and the field."""
    where = "a test" if row is None else f"test {index} of completion {row}"
    if isinstance(test, str):
        return _parse_assert(test, where)
    if not isinstance(test, dict):
        # ValueError like every other bad field of a dataset, so one except clause catches them all
        raise ValueError(f"{where} is a {type(test).__name__}; a test is a dict ({{'input': ..., 'output': ...}} for "  # noqa: TRY004
                         f"stdin/stdout, {_FUNCTIONAL_FORM} for a function) or an assert string; {_DOCS}")
    testtype = test.get("testtype")
    if testtype not in (None, "stdin", "functional"):
        raise ValueError(f"{where}: 'testtype' must be 'stdin' or 'functional' (LiveCodeBench's values), "
                         f"got {testtype!r}")
    if testtype == "functional" or (testtype is None and "fn_name" in test):
        return _parse_call(test, where)
    unknown = sorted(set(test) - _STDIN_KEYS, key=str)
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}: a stdin/stdout test has 'input' (optional) and "
                         f"'output' (and LiveCodeBench's 'testtype'); a functional test has 'fn_name'; {_DOCS}")
    if "output" not in test:
        raise ValueError(f"{where}: a stdin/stdout test needs an 'output' (the expected stdout, a string), "
                         f"got {test!r}")
    for field in ("input", "output"):
        if field in test and not isinstance(test[field], str):
            value = test[field]
            hint = ("'' for no input" if field == "input" else
                    "e.g. '6', not 6; to test a function's return value use a functional test with 'fn_name'")
            raise ValueError(f"{where}: '{field}' must be a string, got {type(value).__name__} {value!r} "
                             f"(JSON null is not the text 'None'); write {hint}")
    return StdinTest(test.get("input", ""), test["output"])


def _parse_call(test: dict, where: str) -> CallTest:
    unknown = sorted(set(test) - _CALL_KEYS, key=str)
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}: a functional test has 'fn_name', 'inputs' (a list "
                         f"of arguments) or LiveCodeBench's 'input' (one JSON argument per line), 'output' and "
                         f"optionally 'testtype'; e.g. {_FUNCTIONAL_FORM}")
    fn_name = test.get("fn_name")
    if not isinstance(fn_name, str) or not fn_name.isidentifier():
        raise ValueError(f"{where}: a functional test needs 'fn_name', the name of the function to call (a Python "
                         f"identifier), got {fn_name!r}; LiveCodeBench keeps it in the row's metadata as 'func_name': "
                         "copy it into each test")
    if ("inputs" in test) == ("input" in test):
        raise ValueError(f"{where}: a functional test needs exactly one of 'inputs' (a list of arguments) and "
                         "'input' (LiveCodeBench's text: one JSON argument per line)")
    if "output" not in test:
        raise ValueError(f"{where}: a functional test needs an 'output' (the expected return value)")
    if "inputs" in test:
        args, expected = test["inputs"], test["output"]
        if not isinstance(args, (list, tuple)):
            raise ValueError(f"{where}: 'inputs' must be a list of the arguments, got {type(args).__name__} {args!r} "
                             "(for one list argument write [[1, 2]])")
    else:
        text, out = test["input"], test["output"]
        if not isinstance(text, str) or not isinstance(out, str):
            raise ValueError(f"{where}: with 'input' (LiveCodeBench's form), 'input' and 'output' must be JSON text, "
                             f"got {type(text).__name__} and {type(out).__name__}; or use 'inputs' with a list of "
                             "arguments and 'output' with the value")
        try:
            args = [json.loads(line) for line in text.split("\n") if line.strip()]
            expected = json.loads(out)
        except ValueError as err:
            raise ValueError(f"{where}: LiveCodeBench's 'input' must hold one JSON value per line and 'output' one "
                             f"JSON value: {err}") from None
    return _call_test(fn_name, tuple(args), expected, where)


def _call_test(fn_name: str, args: tuple, expected: Any, where: str) -> CallTest:
    try:
        same = ast.literal_eval(repr(args)) == args
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        same = False
    if not same:
        raise ValueError(f"{where}: the arguments {args!r} must be Python literals that survive repr() "
                         "(no NaN or infinity, no objects)")
    bad = _not_plain(expected)
    if bad is not None:
        raise ValueError(f"{where}: the expected value {expected!r} holds {bad}; expected values are JSON-like: None, "
                         "bool, int, float, str, list or tuple, dict with str keys")
    return CallTest(fn_name, args, expected)


def _not_plain(value: Any) -> str | None:
    if value is None or type(value) in (bool, int, float, str):
        return None
    if type(value) in (list, tuple):
        return next((b for b in map(_not_plain, value) if b is not None), None)
    if type(value) is dict:
        if any(type(k) is not str for k in value):
            return "a dict key that is not a str"
        return next((b for b in map(_not_plain, value.values()) if b is not None), None)
    return f"a {type(value).__name__}"


def _parse_assert(snippet: str, where: str) -> CallTest:
    """`assert NAME(literal, ...) == literal` (either side), turned into a functional test: the
    expected value stays here, never in the program's process, where any assert can be defeated."""
    refuse = (f"{where}: {snippet!r} is not of the form `assert NAME(literal, ...) == literal`. Assert snippets "
              "cannot run inside the program's own process (a program can pass them without solving the task), so "
              f"only that form is kept, compared outside the sandbox; write other tests as functional tests, e.g. "
              f"{_FUNCTIONAL_FORM}, or as stdin/stdout tests; {_DOCS}")
    try:
        tree = ast.parse(snippet)
    except SyntaxError:
        raise ValueError(refuse) from None
    if len(tree.body) > 1:
        raise ValueError(refuse + " (one assert per test)")
    if not tree.body or not isinstance(tree.body[0], ast.Assert):
        raise ValueError(refuse)
    check = tree.body[0].test
    if not (isinstance(check, ast.Compare) and len(check.ops) == 1 and isinstance(check.ops[0], ast.Eq)):
        raise ValueError(refuse)
    left, right = check.left, check.comparators[0]
    call, literal = (left, right) if _is_call(left) else (right, left)
    if not _is_call(call):
        raise ValueError(refuse)
    try:
        args = tuple(ast.literal_eval(arg) for arg in call.args)
        expected = ast.literal_eval(literal)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        raise ValueError(refuse + " (the arguments and the expected value must be literals)") from None
    return _call_test(call.func.id, args, expected, where)


def _is_call(node: ast.expr) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords
            and not any(isinstance(arg, ast.Starred) for arg in node.args))


_RUNNER = CodeRunner()


def code_tests_reward(*, all_or_nothing: bool = False, runner: CodeRunner | None = None,
                      limits: Limits | None = None) -> Callable[..., list[float | None]]:
    """A reward that runs each completion's program against the row's `tests` and returns the
    fraction passed (or 1.0 only if all pass)."""
    own = runner or (CodeRunner(Sandbox(limits)) if limits else _RUNNER)

    def code_tests(prompts: list, completions: list, tests: list, **kwargs) -> list[float | None]:
        programs = [extract_program(completion_text(c)) for c in completions]
        return own.score(programs, [_test_list(t, i) for i, t in enumerate(tests)], all_or_nothing=all_or_nothing)

    code_tests.reward_metrics = own.metrics  # type: ignore[attr-defined]
    code_tests.prepare = own.prepare  # type: ignore[attr-defined]
    return code_tests


def _test_list(tests: Any, row: int) -> list:
    """A row's `tests` as a list; a lone string or dict would be iterated as characters or keys."""
    if tests is None:
        return []
    if not isinstance(tests, (list, tuple)):
        raise ValueError(f"the `tests` column must hold a list of tests ({{'input': ..., 'output': ...}} dicts, "  # noqa: TRY004
                         f"functional {_FUNCTIONAL_FORM} dicts or assert strings); completion {row} has a "
                         f"{type(tests).__name__} (a JSON string? decode it with json.loads when preparing the "
                         "dataset)")
    return list(tests)


code_tests = register_reward("code_tests")(code_tests_reward())
code_tests_all = register_reward("code_tests_all")(code_tests_reward(all_or_nothing=True))
