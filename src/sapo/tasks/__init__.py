"""Built-in tasks: procedurally generated problems with disjoint train and test splits and an
exact reward of the same name, usable as `dataset=<name>` (`sapo tasks` lists them)."""

from . import arithmetic, countdown  # noqa: F401  (they register themselves and their rewards)
from .registry import MAX_SPLIT_SIZE, TASKS, Task, available_tasks, check_int_option, get_task, register_task

__all__ = ["MAX_SPLIT_SIZE", "TASKS", "Task", "available_tasks", "check_int_option", "get_task", "register_task"]
