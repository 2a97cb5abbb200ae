"""Built-in tasks: a name that `dataset=` accepts in place of a file, with its own rows and
reward functions. Tasks register themselves here (`register_task`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..losses.registry import unknown_name_message


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[str, int], list[dict]]
    """load(split, seed) -> rows with a "prompt" column and whatever the rewards need."""
    reward_funcs: list[str] = field(default_factory=list)
    """Reward function names used when the config gives none."""
    description: str = ""


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    _TASKS[task.name] = task
    return task


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(unknown_name_message("dataset", name, _TASKS)) from None
