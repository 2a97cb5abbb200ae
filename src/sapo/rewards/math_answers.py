"""`math_accuracy`: is the completion's final answer equivalent to the gold one (math-verify)?

math-verify guards against slow sympy calls with `signal.alarm`, which works only on a main
thread, and gives up by raising a BaseException. So every check runs in a worker process
(where it is on the main thread), and the trainer waits for it at most `timeout` seconds: a
worker that does not answer in time is killed, a spare that has already started takes its
place (so the next answer does not wait for sympy to import), and the sample scores 0 and
counts in `rewards/math_accuracy/timeouts`. Workers also run under an address-space limit. A
worker that does not start within STARTUP_SECONDS is killed and replaced; samples that no
worker could take score None (not the answer's fault). The checking itself is in _math_worker.
"""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path

from ._math_worker import final_answer, last_boxed, verify_answer
from .registry import completion_text, register_reward

__all__ = ["MathChecker", "final_answer", "last_boxed", "math_accuracy", "verify_answer"]

WORKER_MEMORY_BYTES = 4 * 2**30
STARTUP_SECONDS = 120  # importing math-verify and sympy in a new worker, on a busy machine
WORKER_FILE = str(Path(__file__).with_name("_math_worker.py"))
# run_path rather than `python WORKER_FILE`, which would put this directory (its code.py) first on sys.path
WORKER_COMMAND = [sys.executable, "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
                  WORKER_FILE]


class _Worker:
    def __init__(self, memory_bytes: int) -> None:
        self.proc = subprocess.Popen([*WORKER_COMMAND, str(memory_bytes)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.out = self.proc.stdout
        self.started = time.monotonic()
        self.ready = False

    def startup_deadline(self) -> float:
        return self.started + STARTUP_SECONDS  # read now, so a changed STARTUP_SECONDS applies to started workers

    def send(self, pair: tuple[str, str]) -> None:
        self.proc.stdin.write(json.dumps(pair) + "\n")
        self.proc.stdin.flush()


class MathChecker:
    """A small pool of math-verify worker processes with a hard per-answer time limit.

    Workers are separate Python processes running _math_worker.py, so nothing of the caller's
    __main__ is re-imported and no torch state is forked. Besides the
    `workers` that check answers, the pool keeps `spares` more started, so that a worker killed
    at its time limit is replaced at once rather than after a new worker's start-up (seconds:
    importing sympy); each spare costs a process's memory (about 60 MB)."""

    def __init__(self, workers: int = 2, timeout: float = 5.0, memory_bytes: int = WORKER_MEMORY_BYTES,
                 spares: int = 1) -> None:
        self.size, self.timeout, self.memory_bytes, self.spares = workers, timeout, memory_bytes, spares
        self._slots: list[_Worker | None] = [None] * workers
        self._reserve: list[_Worker] = []  # the spares
        self._dying: list[subprocess.Popen] = []  # killed, not yet reaped: a check does not wait for that
        self._lock = threading.Lock()  # the pool serves one batch at a time, from any thread
        self.timeouts = self.errors = self.startup_failures = self.unscored = 0

    def start(self) -> None:
        """Start the workers and the spares now and wait until they are ready (at most
        STARTUP_SECONDS), so that no later check waits for a start-up."""
        with self._lock:
            self._fill()
            while starting := self._starting():
                readable = wait([w.out for w in starting],
                                timeout=max(min(w.startup_deadline() for w in starting) - time.monotonic(), 0))
                self._advance(starting, readable)

    def check(self, pairs: list[tuple[str, str]]) -> list[float | None]:
        """Scores of (gold, completion) pairs, in order; None for a pair no worker could check
        because none had started within STARTUP_SECONDS (counted in `unscored`)."""
        with self._lock:
            self._fill()
            results: list[float | None] = [None] * len(pairs)
            pending = deque(range(len(pairs)))
            requeued: set[int] = set()
            busy: dict[int, tuple[int, float]] = {}  # slot -> (item, deadline)
            while pending or busy:
                for slot, worker in enumerate(self._slots):
                    if pending and worker is not None and worker.ready and slot not in busy:
                        item = pending.popleft()
                        try:
                            worker.send(pairs[item])
                        except OSError:  # it died since its last answer: not the answer's fault, retry once
                            self._replace(slot)
                            if item not in requeued:
                                requeued.add(item)
                                pending.appendleft(item)
                            else:
                                self.unscored += 1
                            continue
                        busy[slot] = (item, time.monotonic() + self.timeout)  # set after the write, never before
                if pending and not busy and all(w is None for w in self._slots):
                    self.unscored += len(pending)  # every worker failed to start in this call: give up on the rest
                    break
                starting = self._starting()
                deadlines = [d for _, d in busy.values()] + [w.startup_deadline() for w in starting]
                readable = wait([self._slots[s].out for s in busy] + [w.out for w in starting],
                                timeout=max(min(deadlines, default=0) - time.monotonic(), 0))
                now = time.monotonic()
                for slot, (item, deadline) in list(busy.items()):
                    worker = self._slots[slot]
                    if worker.out in readable:
                        line = worker.out.readline()
                        answer = json.loads(line) if line else {"error": "worker died"}
                        if not line:  # e.g. it hit its memory limit
                            self._replace(slot)
                        results[item] = answer.get("ok", 0.0)  # ok may be None: gold unparseable
                        self.errors += "error" in answer
                        del busy[slot]
                    elif now >= deadline:
                        results[item] = 0.0
                        self.timeouts += 1
                        self._replace(slot)
                        del busy[slot]
                self._advance(starting, readable)
            return results

    def _fill(self) -> None:
        self._dying = [p for p in self._dying if p.poll() is None]
        self._slots = [w or _Worker(self.memory_bytes) for w in self._slots]
        self._reserve += [_Worker(self.memory_bytes) for _ in range(self.spares - len(self._reserve))]

    def _starting(self) -> list[_Worker]:
        return [w for w in (*self._slots, *self._reserve) if w is not None and not w.ready]

    def _advance(self, starting: list[_Worker], readable: list) -> None:
        """Mark the starting workers that said they are ready; kill those that died or ran past
        STARTUP_SECONDS. A killed slot worker gives way to a spare, else stays empty until the
        next call; neither is respawned here, so that workers that cannot start are not in a loop."""
        now = time.monotonic()
        for worker in starting:
            if worker.out in readable:
                line = worker.out.readline()
                try:
                    worker.ready = bool(line) and "ready" in json.loads(line)
                except ValueError:
                    worker.ready = False
                if worker.ready:
                    continue
            elif now < worker.startup_deadline():
                continue
            self.startup_failures += 1
            self._kill(worker)
            if worker in self._reserve:
                self._reserve.remove(worker)
            else:
                self._slots[self._slots.index(worker)] = self._take_spare()

    def _replace(self, slot: int) -> None:
        self._kill(self._slots[slot])
        self._slots[slot] = self._take_spare() or _Worker(self.memory_bytes)
        if len(self._reserve) < self.spares:
            self._reserve.append(_Worker(self.memory_bytes))

    def _take_spare(self) -> _Worker | None:
        if not self._reserve:
            return None
        best = min(self._reserve, key=lambda w: (not w.ready, w.started))  # else the one closest to ready
        self._reserve.remove(best)
        return best

    def _kill(self, worker: _Worker) -> None:
        worker.proc.kill()
        for pipe in (worker.proc.stdin, worker.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        self._dying.append(worker.proc)

    def metrics(self) -> dict[str, float]:
        """Counts since the last call, for the trainer's log."""
        out = {"timeouts": float(self.timeouts), "errors": float(self.errors),
               "startup_failures": float(self.startup_failures), "unscored": float(self.unscored)}
        self.timeouts = self.errors = self.startup_failures = self.unscored = 0
        return out

    def close(self) -> None:
        for worker in (*self._slots, *self._reserve):
            if worker is not None:
                self._kill(worker)
        self._slots, self._reserve = [None] * self.size, []
        for proc in self._dying:
            proc.wait(timeout=5)
        self._dying.clear()


_CHECKER: MathChecker | None = None


def checker() -> MathChecker:
    global _CHECKER
    if _CHECKER is None:
        _CHECKER = MathChecker()
        atexit.register(_CHECKER.close)
    return _CHECKER


@register_reward("math_accuracy")
def math_accuracy(prompts: list, completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer (last closed \\boxed{}, else last number) is equivalent to
    the gold `answer` (a plain string: "0.5", "\\frac{1}{2}", "12"), else 0.0; None when the gold
    answer is missing or cannot be parsed, or when no checker worker could start (see MathChecker)."""
    given = [i for i, a in enumerate(answer) if a is not None]
    scores = checker().check([(str(answer[i]), completion_text(completions[i])) for i in given])
    out: list[float | None] = [None] * len(completions)
    for i, score in zip(given, scores):
        out[i] = score
    return out


math_accuracy.reward_metrics = lambda: checker().metrics()  # type: ignore[attr-defined]
