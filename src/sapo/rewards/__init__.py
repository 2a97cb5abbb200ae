"""Reward functions with TRL's signature, `f(prompts, completions, **kwargs) -> list[float | None]`:
loading them by name or path, and scoring a batch with several of them."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .._registry import Registry
from ..config import ConfigError

RewardFunc = Callable[..., list]
REWARDS: Registry[RewardFunc] = Registry("reward_funcs")

FLOAT32_MAX = torch.finfo(torch.float32).max


def register_reward(name: str) -> Callable[[RewardFunc], RewardFunc]:
    """Make a reward function available by name in `reward_funcs`."""

    def decorator(fn: RewardFunc) -> RewardFunc:
        return REWARDS.add(name, fn)

    return decorator


def available_rewards() -> list[str]:
    _load_task_rewards()
    return REWARDS.names()


def _load_task_rewards() -> None:
    from ..tasks import _load_builtins  # the built-in tasks register their rewards
    _load_builtins()


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of a conversational message list."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


@register_reward("exact_match")
def exact_match(prompts: list, completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the completion, stripped, equals the row's `answer` column, stripped; else 0.0."""
    return [None if a is None else float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


@dataclass(frozen=True)
class NamedReward:
    name: str
    fn: RewardFunc


def load_reward_function(spec: str) -> NamedReward:
    """A built-in name, "path/to/file.py:function" or "package.module:function"."""
    _load_task_rewards()
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
        raise ConfigError(f"reward_funcs: could not import {module_part!r} for {spec!r}: {type(err).__name__}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward_funcs: {module_part!r} has no function {attr!r} (from {spec!r})")
    return NamedReward(attr, fn)


@dataclass
class RewardContext:
    """What every call gets besides the batch, as TRL passes it: `trainer_state` (a
    transformers TrainerState: `global_step` rollout steps done, `max_steps`), `log_metric(name,
    value)` (a scalar averaged into the step's metrics) and `log_extra(column, values)` (a column of
    the logged completions, one value per sample of the call)."""

    trainer_state: Any = None
    metrics: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    columns: dict[str, list] = field(default_factory=lambda: defaultdict(list))

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name].append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        self.columns[column].extend(values)

    def kwargs(self) -> dict[str, Any]:
        return {"trainer_state": self.trainer_state, "log_metric": self.log_metric, "log_extra": self.log_extra}

    def mark(self) -> tuple[dict[str, int], dict[str, int]]:
        return {k: len(v) for k, v in self.metrics.items()}, {k: len(v) for k, v in self.columns.items()}

    def rollback(self, mark: tuple[dict[str, int], dict[str, int]]) -> None:
        """Forget what a call that then raised had logged (it is retried sample by sample)."""
        for logged, sizes in zip((self.metrics, self.columns), mark):
            for key in list(logged):
                if key in sizes:
                    del logged[key][sizes[key]:]
                else:
                    del logged[key]


CONTEXT_KWARGS = ("trainer_state", "log_metric", "log_extra")


def check_signature(reward: NamedReward, columns: list[str]) -> None:
    """The function must accept prompts, completions, completion_ids, TRL's trainer_state,
    log_metric and log_extra, and the dataset's columns as keywords (a **kwargs catches what it
    does not name)."""
    taken = [c for c in columns if c in CONTEXT_KWARGS]
    if taken:
        raise ConfigError(f"the dataset column {taken[0]!r} has the name of an argument every reward function gets "
                          f"({', '.join(CONTEXT_KWARGS)}, as in TRL); rename the column")
    names = ["prompts", "completions", "completion_ids", *CONTEXT_KWARGS, *columns]
    try:
        inspect.signature(reward.fn).bind(**{n: [] for n in names})
    except TypeError as err:
        raise ConfigError(
            f"reward function {reward.name!r} cannot be called as {reward.name}(prompts=..., completions=..., "
            f"completion_ids=..., {', '.join(f'{c}=...' for c in columns)}): {err}. "
            "Give it the signature f(prompts, completions, **kwargs)"
        ) from None
    except ValueError:
        pass  # builtins without an introspectable signature: checked on the first call


@dataclass
class RewardScores:
    per_func: torch.Tensor
    """(N, F) float64, NaN where a function returned None or raised (when skipping errors)."""
    extra: dict[str, float]
    """Counters a reward function reports through its optional `reward_metrics()` attribute,
    as "rewards/<name>/<key>" (e.g. math_accuracy's timeouts)."""
    total: torch.Tensor
    """(N,) weighted sum over the functions that apply; NaN where none applies."""
    errors: int
    """Samples scored as 'does not apply' because a function raised (skip_reward_errors)."""


def score(rewards: list[NamedReward], weights: list[float], prompts: list, completions: list,
          completion_ids: list[list[int]], columns: dict[str, list], *, skip_errors: bool,
          context: RewardContext | None = None) -> RewardScores:
    n = len(completions)
    per_func = torch.full((n, len(rewards)), math.nan, dtype=torch.float64)
    errors = set()
    context = context or RewardContext()
    for j, reward in enumerate(rewards):
        values, failed = _call(reward, prompts, completions, completion_ids, columns, context, skip_errors)
        errors |= failed
        for i, v in enumerate(values):
            if v is not None:
                per_func[i, j] = v
    w = torch.tensor(weights, dtype=torch.float64)
    applies = ~torch.isnan(per_func)
    total = torch.where(applies, per_func * w, 0.0).sum(-1)
    total = torch.where(applies.any(-1), total, math.nan)
    extra = {f"rewards/{r.name}/{k}": v for r in rewards if callable(getattr(r.fn, "reward_metrics", None))
             for k, v in r.fn.reward_metrics().items()}
    return RewardScores(per_func, extra, total, len(errors))


def _call(reward: NamedReward, prompts, completions, completion_ids, columns, context: RewardContext,
          skip_errors) -> tuple[list, set[int]]:
    def run(idx: list[int], ctx: RewardContext) -> list:
        return _awaited(reward.fn(prompts=[prompts[i] for i in idx], completions=[completions[i] for i in idx],
                                  completion_ids=[completion_ids[i] for i in idx],
                                  **{k: [v[i] for i in idx] for k, v in columns.items()}, **ctx.kwargs()))

    everything = list(range(len(completions)))
    mark = context.mark()
    exited = None
    try:
        values = _check_values(reward, run(everything, context), len(everything))
        return values, set()
    except ConfigError:
        raise
    except SystemExit as err:
        exited = err
        context.rollback(mark)  # called again sample by sample, to name the one that exits
    except Exception:
        context.rollback(mark)  # it is called again sample by sample
    # Find the samples that make it raise, one by one, to name them.
    values, failed, logs = [], set(), []
    for i in everything:
        own = RewardContext(context.trainer_state)
        try:
            values.extend(_check_values(reward, run([i], own), 1))
            logs.append(own)
        except ConfigError:
            raise
        except SystemExit as err:
            # Never skipped: exiting is not a score of this sample but a bug in the function
            # (a script's sys.exit, argparse on sys.argv), and skipping would hide it.
            raise RewardError(
                f"reward function {reward.name!r} called sys.exit({err.code!r}) on sample {i}: "
                f"prompt={_short(prompts[i])}, completion={_short(completions[i])}. A reward function must return "
                "its scores, not exit; skip_reward_errors does not cover this"
            ) from err
        except Exception as err:
            if not skip_errors:
                raise RewardError(
                    f"reward function {reward.name!r} raised {type(err).__name__}: {err} on sample {i}: "
                    f"prompt={_short(prompts[i])}, completion={_short(completions[i])}. "
                    "Fix the function, or set skip_reward_errors=true to score such samples as 'does not apply'"
                ) from err
            values.append(None)
            failed.add(i)
            logs.append(None)
    if exited is not None:  # no single sample makes it exit: it exits on the batch
        raise RewardError(f"reward function {reward.name!r} called sys.exit({exited.code!r}) on a batch of "
                          f"{len(everything)} samples (not on any one alone), first prompt={_short(prompts[0])}. A "
                          "reward function must return its scores, not exit; skip_reward_errors does not cover "
                          "this") from exited
    # What the per-sample calls logged, as if from one call: a column holds None for a failed sample.
    for own in filter(None, logs):
        for name, logged in own.metrics.items():
            context.metrics[name].extend(logged)
    for column in {c for own in filter(None, logs) for c in own.columns}:
        context.columns[column].extend(own.columns[column][0] if own and len(own.columns.get(column, ())) == 1
                                       else None for own in logs)
    return values, failed


def _awaited(result: Any) -> Any:
    """The result of an `async def` reward function (TRL accepts them), awaited here; in a thread
    when the caller already runs an event loop (a notebook)."""
    if not inspect.isawaitable(result):
        return result

    async def wait() -> Any:
        return await result

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def _check_values(reward: NamedReward, values: Any, n: int) -> list:
    if getattr(values, "ndim", None) == 1 and callable(getattr(values, "tolist", None)):
        values = values.tolist()  # a 1-D numpy array or tensor
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"reward function {reward.name!r} returned {type(values).__name__}; it must return a list of "
                          "float or None, one per completion")
    values = list(values)
    if len(values) != n:
        raise ConfigError(f"reward function {reward.name!r} returned {len(values)} values for {n} completions; "
                          "it must return one per completion")
    out = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        try:
            if isinstance(v, (str, bytes)):  # float("1") would take a string
                raise TypeError
            v = float(v)  # also numpy and 0-d torch scalars, bools, Decimals
        except (TypeError, ValueError):
            raise ConfigError(f"reward function {reward.name!r} returned {v!r}; rewards must be numbers or None") from None
        if math.isnan(v):
            out.append(None)
        elif math.isinf(v) or abs(v) > FLOAT32_MAX:  # rewards become float32 tensors
            raise ConfigError(f"reward function {reward.name!r} returned {v}; rewards must be finite float32 numbers")
        else:
            out.append(v)
    return out


class RewardError(RuntimeError):
    """A reward function raised on a sample and the run is not set to skip such samples."""


def _short(x: Any, n: int = 80) -> str:
    s = repr(completion_text(x) if isinstance(x, list) else x)
    return s if len(s) <= n else s[: n - 3] + "..."


# Built-in rewards that live in their own modules (they register themselves).
from .code import code_tests  # noqa: E402
from .formats import format_reward  # noqa: E402
from .math_answers import math_accuracy  # noqa: E402
