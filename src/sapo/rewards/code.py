"""`code_tests`: run the completion's program against the row's tests, in the sandbox."""

from __future__ import annotations

import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from . import completion_text, register_reward
from .sandbox import Limits, Result, Sandbox

# A fence opens and closes at the start of a line; the language tag is optional.
_FENCE = re.compile(r"^```[ \t]*(\w*)[ \t]*\r?\n(.*?)^```", re.DOTALL | re.MULTILINE)


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


class CodeRunner:
    """Scores programs against tests with a bounded number of sandboxed runs in parallel."""

    def __init__(self, sandbox: Sandbox | None = None, parallel: int = 4) -> None:
        self._sandbox = sandbox
        self.parallel = parallel
        self._lock = threading.Lock()
        self.infra_errors = 0

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
        if isinstance(test, dict):
            if "output" not in test:
                raise ValueError(f"a stdin/stdout test needs an 'output' (and optionally 'input'), got {test!r}")
            result = self.sandbox.run_python(program, str(test.get("input", "")))
            ok = result.status == "ok" and result.returncode == 0 and same_output(result.stdout, str(test["output"]))
        else:
            # An assert-style test is appended to the program; it passes only if a random token
            # printed after it shows up, so an early sys.exit(0) or os._exit(0) does not pass.
            token = secrets.token_hex(16)
            result = self.sandbox.run_python(f"{program}\n\n{test}\nprint({token!r}, flush=True)\n")
            ok = result.status == "ok" and result.returncode == 0 and token in result.stdout
        return None if result.status == "infra" else ok

    def score(self, programs: list[str | None], tests: list[list[Any]], *, all_or_nothing: bool) -> list[float | None]:
        jobs = [(i, p, t) for i, (p, ts) in enumerate(zip(programs, tests)) if p is not None for t in ts]
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            outcomes = list(pool.map(lambda job: (job[0], self.run_test(job[1], job[2])), jobs))
        scores: list[float | None] = []
        for i, (program, row_tests) in enumerate(zip(programs, tests)):
            if not row_tests:
                scores.append(None)  # nothing to check: does not apply
                continue
            if program is None:
                scores.append(0.0)
                continue
            passed = [ok for j, ok in outcomes if j == i]
            if any(ok is None for ok in passed):
                self.infra_errors += 1
                scores.append(None)  # not the program's fault: not scored 0
                continue
            fraction = sum(passed) / len(passed)
            scores.append(float(fraction == 1.0) if all_or_nothing else fraction)
        return scores

    def metrics(self) -> dict[str, float]:
        out = {"infra_errors": float(self.infra_errors)}
        self.infra_errors = 0
        return out


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
        raise ValueError(f"the `tests` column must hold a list of tests ({{'input': ..., 'output': ...}} dicts or "
                         f"assert strings); completion {row} has a {type(tests).__name__} (a JSON string? decode it "
                         "with json.loads when preparing the dataset)")
    return list(tests)


code_tests = register_reward("code_tests")(code_tests_reward())
code_tests_all = register_reward("code_tests_all")(code_tests_reward(all_or_nothing=True))
