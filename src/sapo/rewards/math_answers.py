"""`math_accuracy`: is the completion's final answer equivalent to the gold one (math-verify)?

math-verify guards against slow sympy calls with `signal.alarm`, which works only on a main
thread, and gives up by raising a BaseException. So every check runs in a worker process
(where it is on the main thread), and the trainer waits for it at most `timeout` seconds: a
worker that does not answer in time is killed and replaced, and the sample scores 0 and
counts in `rewards/math_accuracy/timeouts`. Workers also run under an address-space limit.
"""

from __future__ import annotations

import atexit
import json
import re
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait

from . import completion_text, register_reward

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
WORKER_MEMORY_BYTES = 4 * 2**30


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None


def final_answer(completion: str) -> str | None:
    """The answer a completion states: its last \\boxed{} content, else its last number."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(completion)
    return numbers[-1].replace(",", "") if numbers else None


def verify_answer(gold: str, completion: str) -> float | None:
    """1.0 / 0.0, or None when the gold answer cannot be parsed. Runs math-verify in this process:
    call it through MathChecker from a trainer."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(f"${gold}$", extraction_config=config)
    if not gold_parsed:
        return None
    answer = final_answer(completion)
    if answer is None:
        return 0.0
    predicted = parse(f"${answer}$", extraction_config=config)
    return float(bool(predicted) and verify(gold_parsed, predicted))


def _serve(memory_bytes: int) -> None:
    """Worker process main loop: one JSON job per stdin line, one JSON answer per stdout line."""
    import json
    import resource
    import sys

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    verify_answer("1", "\\boxed{1}")  # imports math-verify and sympy before saying ready
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        gold, completion = json.loads(line)
        try:
            answer = {"ok": verify_answer(gold, completion)}
        except BaseException as err:  # math-verify's own timeouts are BaseExceptions
            answer = {"error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


STARTUP_SECONDS = 120  # importing math-verify and sympy in a new worker, on a busy machine


class MathChecker:
    """A small pool of math-verify worker processes with a hard per-answer time limit.

    Workers are separate Python processes started with `python -m sapo.rewards._math_worker`, so
    nothing of the caller's __main__ is re-imported and no torch state is forked."""

    def __init__(self, workers: int = 2, timeout: float = 5.0, memory_bytes: int = WORKER_MEMORY_BYTES) -> None:
        self.size, self.timeout, self.memory_bytes = workers, timeout, memory_bytes
        self._workers: list[subprocess.Popen] = []
        self._lock = threading.Lock()  # the pool serves one batch at a time, from any thread
        self._ready: set[int] = set()  # pids of workers that have said they are ready
        self.timeouts = self.errors = 0

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "sapo.rewards._math_worker", str(self.memory_bytes)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, bufsize=1)

    def check(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        """Scores of (gold, completion) pairs, in order."""
        with self._lock:
            while len(self._workers) < self.size:
                self._workers.append(self._spawn())
            results: list[float | None] = [0.0] * len(pairs)
            pending = list(range(len(pairs)))[::-1]
            busy: dict[int, tuple[int, float]] = {}  # worker slot -> (item, deadline)
            while pending or busy:
                for slot in range(self.size):
                    if slot not in busy and pending:
                        self._await_ready(slot)  # a worker's start-up is not part of an answer's time
                        item = pending.pop()
                        try:
                            self._workers[slot].stdin.write(json.dumps(pairs[item]) + "\n")
                            self._workers[slot].stdin.flush()
                        except OSError:  # a worker that died between batches
                            self._replace(slot)
                            pending.append(item)
                            continue
                        busy[slot] = (item, time.monotonic() + self.timeout)
                if not busy:
                    continue
                soonest = min(deadline for _, deadline in busy.values())
                ready = wait([self._workers[s].stdout for s in busy], timeout=max(soonest - time.monotonic(), 0))
                for slot in list(busy):
                    item, deadline = busy[slot]
                    worker = self._workers[slot]
                    if worker.stdout in ready:
                        line = worker.stdout.readline()
                        answer = json.loads(line) if line else {"error": "worker died"}
                        if not line:  # e.g. it hit its memory limit
                            self._replace(slot)
                        results[item] = answer.get("ok", 0.0) if "ok" in answer else 0.0
                        self.errors += "error" in answer
                        del busy[slot]
                    elif time.monotonic() >= deadline:
                        self._replace(slot)
                        self.timeouts += 1
                        del busy[slot]
            return results

    def _await_ready(self, slot: int) -> None:
        worker = self._workers[slot]
        if worker.pid in self._ready:
            return
        line = worker.stdout.readline() if wait([worker.stdout], timeout=STARTUP_SECONDS) else ""
        if not line or "ready" not in json.loads(line):
            worker.kill()
            raise RuntimeError(f"a math-verify worker did not start within {STARTUP_SECONDS} s")
        self._ready.add(worker.pid)

    def _replace(self, slot: int) -> None:
        worker = self._workers[slot]
        worker.kill()
        worker.wait(timeout=5)
        self._workers[slot] = self._spawn()

    def metrics(self) -> dict[str, float]:
        """Counts since the last call, for the trainer's log."""
        out = {"timeouts": float(self.timeouts), "errors": float(self.errors)}
        self.timeouts = self.errors = 0
        return out

    def close(self) -> None:
        for worker in self._workers:
            worker.kill()
            worker.wait(timeout=5)
        self._workers.clear()


_CHECKER: MathChecker | None = None


def checker() -> MathChecker:
    global _CHECKER
    if _CHECKER is None:
        _CHECKER = MathChecker()
        atexit.register(_CHECKER.close)
    return _CHECKER


@register_reward("math_accuracy")
def math_accuracy(prompts: list, completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer (last \\boxed{}, else last number) is equivalent to
    the gold `answer` (a plain string: "0.5", "\\frac{1}{2}", "12"), else 0.0; None when the gold
    answer is missing or cannot be parsed."""
    given = [i for i, a in enumerate(answer) if a is not None]
    scores = checker().check([(str(answer[i]), completion_text(completions[i])) for i in given])
    out: list[float | None] = [None] * len(completions)
    for i, score in zip(given, scores):
        out[i] = score
    return out


math_accuracy.reward_metrics = lambda: checker().metrics()  # type: ignore[attr-defined]
