"""Built-in tasks: a name that `dataset=` (and `eval_dataset=`) accepts in place of a file,
whose rows come from its own loader ("train" and "test" splits). Tasks register themselves
here (`register_task`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .._registry import Registry


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[str, int], list[dict]]
    """load(split, seed) -> rows with a "prompt" column and whatever the rewards need."""
    description: str = ""


TASKS: Registry[Task] = Registry("dataset")


def register_task(task: Task) -> Task:
    return TASKS.add(task.name, task)


def available_tasks() -> list[str]:
    return TASKS.names()


def get_task(name: str) -> Task:
    return TASKS.get(name)
