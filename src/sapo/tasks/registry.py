"""The task registry: a name that `dataset=` (and `eval_dataset=`) accepts in place of a file,
whose rows come from a seeded generator with disjoint "train" and "test" splits, scored by a
reward function of the same name. Tasks register themselves here (`register_task`)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from .._registry import Registry


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[..., list[dict]]
    """load(split, seed=0, **options) -> rows with a "prompt" column and what the reward needs."""
    description: str = ""
    reward: str | None = None
    """Name of the task's reward function in the reward registry."""
    target: str | None = None
    """Column holding a correct completion, for supervised warm starts (`sapo warmstart`)."""
    options: str = ""
    """The task_kwargs it accepts, with defaults, for `sapo tasks`."""


TASKS: Registry[Task] = Registry("dataset")
MAX_SPLIT_SIZE = 10**6  # problems per split: beyond it generating them takes minutes and gigabytes


def register_task(task: Task) -> Task:
    return TASKS.add(task.name, task)


def available_tasks() -> list[str]:
    return TASKS.names()


def get_task(name: str) -> Task:
    return TASKS.get(name)


def check_int_option(task: str, name: str, value: object, low: int, high: int) -> None:
    """A task option is an integer in [low, high]: outside it a task would fail deep inside Python
    (an int too long to print, a loop that never finds enough problems), not with its own words."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{task}: task_kwargs.{name} must be an integer from {low} to {high}, got {value!r}")


def split_problems(make: Callable[[random.Random], dict], split: str, seed: int, *, train_size: int,
                   test_size: int, key: str) -> list[dict]:
    """Draw `test_size` distinct problems, then `train_size` more that are not among them, from
    one seeded stream: the same seed always gives the same splits, and they never overlap."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"sapo-task-{seed}")
    test: dict[str, dict] = {}
    attempts = 0
    while len(test) < test_size:
        problem = make(rng)
        test.setdefault(problem[key], problem)
        attempts += 1
        if attempts > 100 * test_size:
            raise ValueError(f"only {len(test)} distinct problems exist at this difficulty; lower test_size")
    if split == "test":
        return list(test.values())
    train, misses = [], 0
    while len(train) < train_size:
        problem = make(rng)
        if problem[key] in test:
            misses += 1
            if misses > 100 * max(train_size, 100):  # the test split holds (nearly) every problem there is
                raise ValueError(f"only {len(train)} problems are left for train once the {test_size} test problems "
                                 "are set aside at this difficulty; lower test_size or raise the difficulty")
            continue
        train.append(problem)
    return train
