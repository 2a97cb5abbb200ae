"""Scoring a batch with several reward functions of TRL's signature,
`f(prompts, completions, completion_ids, **columns, trainer_state, log_metric, log_extra)
-> list[float | None]`: checking that they can be called so, calling them (a raise is traced to
its sample), checking what they return, and weighing them into one reward per sample."""

from __future__ import annotations

import asyncio
import inspect
import math
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, RewardError
from .registry import NamedReward, completion_text

FLOAT32_MAX = torch.finfo(torch.float32).max


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


@dataclass(frozen=True)
class RewardSettings:
    """How several reward functions' values become one reward (the config's `reward_weights`,
    `skip_reward_errors`)."""

    weights: tuple[float, ...] | None = None
    """One weight per reward function; None weighs them all 1.0."""
    skip_errors: bool = False
    """Score a sample on which a function raises as 'does not apply' instead of stopping."""


@dataclass
class RewardResult:
    """Everything scoring a batch gives, for the advantages, the metrics and the logged samples."""

    total: torch.Tensor
    """(B,) weighted sum over the functions that apply; NaN where none applies."""
    per_func: torch.Tensor
    """(B, F) float64, NaN where a function returned None or raised (when skipping errors)."""
    errors: int
    """Samples scored as 'does not apply' because a function raised (skip_errors)."""
    counters: dict[str, float]
    """Counters a reward function reports through its optional `reward_metrics()` attribute,
    as "rewards/<name>/<key>" (e.g. math_accuracy's timeouts)."""
    logged: dict[str, list[float]]
    """What the functions passed to `log_metric`, every value (the trainer averages them over
    processes)."""
    columns: dict[str, list]
    """What they passed to `log_extra`: columns of the logged completions."""


def score(rewards: list[NamedReward], settings: RewardSettings, prompts: list, completions: list,
          completion_ids: list[list[int]], columns: dict[str, list], *, trainer_state: Any = None) -> RewardResult:
    """Call every reward function on the batch as TRL does (`columns`: the dataset's other columns
    as keyword arguments; `trainer_state`, `log_metric` and `log_extra` as well) and combine
    their values with the weights."""
    B = len(completions)
    per_func = torch.full((B, len(rewards)), math.nan, dtype=torch.float64)
    errors = set()
    context = RewardContext(trainer_state)
    for j, reward in enumerate(rewards):
        values, failed = _call(reward, prompts, completions, completion_ids, columns, context, settings.skip_errors)
        errors |= failed
        for i, v in enumerate(values):
            if v is not None:
                per_func[i, j] = v
    w = torch.tensor(settings.weights or [1.0] * len(rewards), dtype=torch.float64)
    applies = ~torch.isnan(per_func)
    total = torch.where(applies, per_func * w, 0.0).sum(-1)
    total = torch.where(applies.any(-1), total, math.nan)
    counters = {f"rewards/{r.name}/{k}": v for r in rewards if callable(getattr(r.fn, "reward_metrics", None))
                for k, v in r.fn.reward_metrics().items()}
    return RewardResult(total, per_func, len(errors), counters, dict(context.metrics), dict(context.columns))


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
            raise ConfigError(f"reward function {reward.name!r} returned {v!r}; "
                              "rewards must be numbers or None") from None
        if math.isnan(v):
            out.append(None)
        elif math.isinf(v) or abs(v) > FLOAT32_MAX:  # rewards become float32 tensors
            raise ConfigError(f"reward function {reward.name!r} returned {v}; rewards must be finite float32 numbers")
        else:
            out.append(v)
    return out


def _short(x: Any, n: int = 80) -> str:
    s = repr(completion_text(x) if isinstance(x, list) else x)
    return s if len(s) <= n else s[: n - 3] + "..."
