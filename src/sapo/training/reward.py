"""Phases 2 and 3, reward and advantage: decode the completions, score them with the reward
functions, and turn the rewards into group-relative advantages; plus the step's reward and
completion metrics, over all processes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from transformers import TrainerState

from ..algorithms import group_advantages
from ..data import PromptSet
from ..rewards import NamedReward, RewardResult, RewardSettings, score
from .rollout import Rollout


@dataclass(frozen=True)
class AdvantageSettings:
    group_size: int
    """G, the samples of one prompt (num_generations)."""
    scale: str
    """scale_rewards: "group", "batch" or "none"."""


def decode(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
           conversational: bool) -> tuple[list, list[list[int]]]:
    """Completions as reward functions see them (text, or assistant messages for conversational
    prompts) and their token ids up to and including EOS."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    ids = [row[mask.bool()].tolist() for row, mask in zip(completion_ids.cpu(), completion_mask.cpu())]
    return completions, ids


def score_rollout(rollout: Rollout, prompts: PromptSet, tokenizer, rewards: list[NamedReward],
                  settings: RewardSettings, trainer_state: TrainerState) -> tuple[list, RewardResult]:
    """The decoded completions and their rewards; each function gets the rows' other columns."""
    completions, ids = decode(tokenizer, rollout.completion_ids, rollout.completion_mask, prompts.conversational)
    result = score(rewards, settings, [prompts.rows[r]["prompt"] for r in rollout.row_indices], completions, ids,
                   prompts.columns(rollout.row_indices), trainer_state=trainer_state)
    return completions, result


def advantages(total_B: torch.Tensor, settings: AdvantageSettings, accelerator) -> torch.Tensor:
    """Group advantages of this process's samples (a process holds whole groups). "batch" divides
    by the std of the global batch: computed on the gathered rewards, ours kept."""
    if settings.scale != "batch" or accelerator.num_processes == 1:
        return group_advantages(total_B, settings.group_size, scale=settings.scale)
    everything = accelerator.gather(total_B.to(accelerator.device)).cpu()
    global_B = group_advantages(everything, settings.group_size, scale="batch")
    B = total_B.shape[0]
    return global_B[accelerator.process_index * B:(accelerator.process_index + 1) * B]


def reward_metrics(accelerator, rollout: Rollout, result: RewardResult, rewards: list[NamedReward],
                   group_size: int) -> tuple[dict[str, float], int]:
    """The step's reward and completion metrics over all processes, and the number of completion
    tokens sampled by all of them."""
    gather = lambda t: accelerator.gather(t.to(accelerator.device)).cpu()  # noqa: E731
    total = gather(result.total)
    per_func = gather(result.per_func)
    lengths = gather(rollout.completion_mask.sum(-1).double())
    truncated = gather(rollout.truncated.double())
    groups = total.view(-1, group_size)
    zero_std = [(g[~g.isnan()].numel() < 2) or bool((g[~g.isnan()] == g[~g.isnan()][0]).all()) for g in groups]
    valid = total[~total.isnan()]
    errors = accelerator.reduce(torch.tensor(float(result.errors), device=accelerator.device), "sum")
    metrics = {
        "reward": float(valid.mean()) if valid.numel() else math.nan,
        "reward_std": float(valid.std()) if valid.numel() > 1 else 0.0,
        "frac_reward_zero_std": sum(zero_std) / len(zero_std),
        "completions/mean_length": float(lengths.mean()),
        "completions/clipped_ratio": float(truncated.mean()),
        "rewards/errors": float(errors),
        **result.counters,
        **_logged_means(accelerator, result.logged),
    }
    for j, reward in enumerate(rewards):
        column = per_func[:, j]
        column = column[~column.isnan()]
        metrics[f"rewards/{reward.name}/mean"] = float(column.mean()) if column.numel() else math.nan
    return metrics, int(lengths.sum())


def _logged_means(accelerator, logged: dict[str, list[float]]) -> dict[str, float]:
    """The mean of what reward functions logged with log_metric, over all processes' calls;
    under rewards/, so that no reward function can overwrite a metric of the trainer's."""
    parts = gather_object([dict(logged)]) if accelerator.num_processes > 1 else [logged]
    merged: dict[str, list[float]] = {}
    for part in parts:
        for name, values in part.items():
            merged.setdefault(name, []).extend(values)
    return {f"rewards/{name}": sum(values) / len(values) for name, values in merged.items() if values}
