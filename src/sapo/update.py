"""Phase 3, policy update: split the rollout batch into minibatches, take one optimizer step on
each, `num_iterations` times. Later minibatches are off-policy: that is where the gate matters."""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import Tensor

from .config import TrainConfig
from .diagnostics import OffPolicyStats
from .data import derive_seed
from .logprobs import completion_logprobs
from .losses import aggregation_denominator, policy_loss
from .rollout import Rollout


def minibatch_plan(num_prompts: int, group_size: int, num_minibatches: int, *, seed: int, step: int,
                   iteration: int, first_position: int) -> list[list[int]]:
    """Local sample indices of each minibatch.

    Each prompt's G samples are shuffled under a seed of their own; minibatch k then takes the
    k-th slice of the samples ordered by (shuffled slot, prompt). When num_minibatches divides G,
    every minibatch holds G / num_minibatches samples of every prompt, and the plan does not
    depend on how prompts are spread over processes.
    """
    perms = [torch.randperm(group_size, generator=torch.Generator().manual_seed(
        derive_seed(seed, "minibatch", step, iteration, first_position + p))).tolist() for p in range(num_prompts)]
    order = [p * group_size + perms[p][slot] for slot in range(group_size) for p in range(num_prompts)]
    size = len(order) // num_minibatches
    return [order[k * size:(k + 1) * size] for k in range(num_minibatches)]


class MetricMean:
    """Averages metrics over micro-batches and processes (weighted by tokens); maxima and minima
    stay extremes."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.extremes: dict[str, float] = {}

    def add(self, metrics: dict[str, float], weight: float) -> None:
        if weight == 0:
            return  # an all-padding micro-batch has nothing to report
        for k, v in metrics.items():
            if k.endswith(("max", "min")):
                self._extreme(k, v)
            else:
                self.sums[k] += v * weight
                self.weights[k] += weight

    def merge(self, other: MetricMean) -> None:
        """Adds another process's totals. Its keys may differ: a process whose every token was
        masked out reports nothing."""
        for k, v in other.sums.items():
            self.sums[k] += v
            self.weights[k] += other.weights[k]
        for k, v in other.extremes.items():
            self._extreme(k, v)

    def _extreme(self, key: str, value: float) -> None:
        pick = max if key.endswith("max") else min
        self.extremes[key] = pick(value, self.extremes.get(key, value))

    def result(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}
        out.update(self.extremes)
        return out


def policy_update(model, optimizer, scheduler, accelerator, rollout: Rollout, advantages: Tensor,
                  config: TrainConfig, *, step: int, first_position: int,
                  off_policy: OffPolicyStats | None = None) -> dict[str, float]:
    """num_iterations passes of num_minibatches optimizer steps over the rollout batch. The token
    log-ratios of every minibatch after the first are added to `off_policy`."""
    G = config.num_generations
    num_prompts = len(rollout) // G
    loss_mask = rollout.completion_mask.clone()
    if config.mask_truncated_completions:
        loss_mask = loss_mask * (~rollout.truncated).unsqueeze(-1)
    world = accelerator.num_processes
    stats = MetricMean()
    grad_norms, losses = [], []
    model.train()
    for iteration in range(config.num_iterations):
        plan = minibatch_plan(num_prompts, G, config.num_minibatches, seed=config.seed, step=step,
                              iteration=iteration, first_position=first_position)
        for k, minibatch in enumerate(plan):
            # Divide every micro-batch by the whole minibatch's denominator, summed over processes and
            # divided by their number because DDP averages gradients: the update is then that of the
            # global minibatch, whatever the micro-batch size or process count.
            denominator = accelerator.reduce(aggregation_denominator(config.aggregation, loss_mask[minibatch])
                                             .to(accelerator.device), "sum") / world
            micro_batches = [minibatch[i:i + config.micro_batch_size]
                             for i in range(0, len(minibatch), config.micro_batch_size)]
            losses.append(0.0)
            for j, idx in enumerate(micro_batches):
                sync = j == len(micro_batches) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    part = rollout.select(idx)
                    logp, entropy = completion_logprobs(model, part.prompt_ids, part.prompt_mask, part.completion_ids,
                                                        part.completion_mask, config.temperature, with_entropy=True,
                                                        chunk_size=config.logprob_chunk_size,
                                                        padding_free=config.padding_free)
                    # With one minibatch and one pass the policy has not moved since the rollout:
                    # pi_old is pi_theta and its separate forward pass was skipped.
                    old = logp.detach() if part.old_logprobs is None else part.old_logprobs
                    mask = loss_mask[idx]
                    out = policy_loss(
                        logp, old, advantages[idx], mask, loss_type=config.loss_type, tau_pos=config.tau_pos,
                        tau_neg=config.tau_neg, epsilon=config.epsilon, epsilon_high=config.epsilon_high,
                        aggregation=config.aggregation, max_tokens=config.max_completion_length,
                        ref_logprobs=part.ref_logprobs, beta=config.beta, denominator=denominator,
                    )
                    accelerator.backward(out.loss)
                tokens = float(mask.sum())
                if off_policy is not None and (k > 0 or iteration > 0):
                    off_policy.add(logp.detach() - old, mask)
                if k == 0 and iteration == 0 and part.old_logprobs is not None:
                    # Before any update the two differ only by numerics (sampling pass vs training forward).
                    out.metrics["rollout/logprob_abs_diff"] = float(((logp.detach() - old).abs() * mask).sum()
                                                                    / max(tokens, 1.0))
                out.metrics["entropy"] = float((entropy * mask).sum() / max(tokens, 1.0))
                losses[-1] += float(out.loss.detach())
                stats.add(out.metrics, tokens)
            grad_norms.append(_clip(accelerator, model, config.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    # A process's loss has the global denominator divided by the number of processes (as DDP
    # averages gradients), so the global minibatch's loss is the plain mean over processes.
    stats.add({"loss": sum(losses) / len(losses)}, 1.0)
    metrics = _across_processes(accelerator, stats).result()
    if "kl/mean" in metrics:
        metrics["kl"] = metrics.pop("kl/mean")
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    metrics["learning_rate"] = scheduler.get_last_lr()[0]
    return metrics


def _across_processes(accelerator, stats: MetricMean) -> MetricMean:
    """The totals of every process in one MetricMean (token-weighted means over all of them)."""
    if accelerator.num_processes == 1:
        return stats
    from accelerate.utils import gather_object

    total = MetricMean()
    for part in gather_object([stats]):
        total.merge(part)
    return total


def _clip(accelerator, model, max_grad_norm: float) -> float:
    if max_grad_norm > 0:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
