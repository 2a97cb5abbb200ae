"""Reward functions by name: the registry that `reward_funcs` names look up (built-in rewards and
the built-in tasks' rewards register themselves in it when imported), and loading a function
from a file or module path."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .._registry import Registry
from ..errors import ConfigError

RewardFunc = Callable[..., list]
REWARDS: Registry[RewardFunc] = Registry("reward_funcs")


def register_reward(name: str) -> Callable[[RewardFunc], RewardFunc]:
    """Make a reward function available by name in `reward_funcs`."""

    def decorator(fn: RewardFunc) -> RewardFunc:
        return REWARDS.add(name, fn)

    return decorator


def available_rewards() -> list[str]:
    return REWARDS.names()


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of a conversational message list."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


@register_reward("exact_match")
def exact_match(prompts: list, completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the completion, stripped, equals the row's `answer` column, stripped; else 0.0."""
    return [None if a is None else float(completion_text(c).strip() == str(a).strip())
            for c, a in zip(completions, answer)]


@dataclass(frozen=True)
class NamedReward:
    name: str
    fn: RewardFunc


def load_reward_function(spec: str | RewardFunc) -> NamedReward:
    """A built-in name, "path/to/file.py:function", "package.module:function", or a Python
    function (named as config.yaml saves it: a name of a registered function is refused, since
    a resume from config.yaml would load that one instead)."""
    if callable(spec):
        taken = REWARDS.get(spec.__name__) if spec.__name__ in REWARDS else spec
        if taken is not spec:
            raise ConfigError(f"reward_funcs: the name {spec.__name__!r} of {spec!r} is taken by another reward "
                              "function; rename yours, or register it under another name with "
                              "@sapo.rewards.register_reward('other_name') and give that name")
        return NamedReward(spec.__name__, spec)
    if spec in REWARDS:
        return NamedReward(spec, REWARDS.get(spec))
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ConfigError(f"reward_funcs: {spec!r} is not a built-in reward ({available_rewards()}) nor "
                          "'path/to/file.py:function' nor 'package.module:function'")
    try:
        if module_part.endswith(".py"):
            path = Path(module_part)
            if not path.is_file():
                raise ConfigError(f"reward_funcs: file {module_part!r} (from {spec!r}) does not exist")
            module_name = f"sapo_user_rewards_{abs(hash(str(path.resolve())))}"
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module  # lets worker processes and pickling find it
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_part)
    except ConfigError:
        raise
    except SystemExit as err:  # else `sapo train` would end with the module's exit code, often 0, and no word
        raise ConfigError(f"reward_funcs: importing {module_part!r} for {spec!r} called sys.exit({err.code!r}); a "
                          "reward module must not exit when imported (guard script code with "
                          "`if __name__ == \"__main__\":`)") from err
    except Exception as err:
        raise ConfigError(f"reward_funcs: could not import {module_part!r} for {spec!r}: "
                          f"{type(err).__name__}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward_funcs: {module_part!r} has no function {attr!r} (from {spec!r})")
    return NamedReward(attr, fn)
