"""Phase 4, policy update: split the rollout batch into minibatches, take one optimizer step on
each, `num_iterations` times. Later minibatches are off-policy: that is where the gate matters."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..algorithms import LossSettings, aggregation_denominator, policy_loss
from ..algorithms.mismatch import CorrectionSettings, importance_weights
from ..algorithms.policy_loss import unmasked_nonfinite
from ..data import derive_seed
from ..errors import NonFiniteUpdateError
from ..model.logprobs import ForwardSettings, completion_logprobs
from ..model.routing import MoERouting, RoutingCall, RoutingStats, minibatch_metrics
from ..model.sharding import gradient_sync, local_tensors, total_grad_norm
from .diagnostics import OffPolicyStats
from .micro_batches import sample_lengths
from .micro_batches import split as micro_batch_split
from .rollout import Rollout, micro_batch


@dataclass(frozen=True)
class UpdateSettings:
    """What the update phase reads of the config."""

    group_size: int
    """G, samples per prompt (num_generations)."""
    num_minibatches: int
    """Optimizer steps per pass over the rollout batch."""
    num_iterations: int
    """Passes over the rollout batch."""
    max_grad_norm: float
    """Clip the gradient norm to this (0: no clipping)."""
    max_nonfinite_steps: int
    """Non-finite optimizer steps in a row that are skipped before the run stops."""
    mask_truncated_completions: bool
    """Leave truncated completions out of the loss."""
    seed: int
    """Seeds the minibatch shuffles."""
    learning_rate: float
    """For the advice of a non-finite stop only (the scheduler holds the real one)."""
    loss: LossSettings
    """Everything `policy_loss` takes besides the tensors."""
    forward: ForwardSettings
    """How the policy scores the completions (temperature, micro-batch size, chunks, rows)."""
    correction: CorrectionSettings | None = None
    """Weight each token by pi_old / pi_rollout (algorithms/mismatch.py); None: no weights."""
    track_mismatch: bool = False
    """Log the mismatch between the engine's log-probabilities and pi_old (an engine other than
    the training forward)."""
    routing_replay: str = "none"
    """MoE: "r2"/"r3" force the rollout's recorded routing in every update forward; "none" only
    measures how often it changed (moe/routing_changed_frac)."""
    router_aux_loss_coef: float = 0.0
    """Weight of the routers' load-balancing loss added to the objective (0: not computed)."""


@dataclass
class PolicyState:
    """The policy being trained and what updates it, as accelerate prepared them."""

    model: Any
    optimizer: Any
    scheduler: Any
    accelerator: Any
    routing: MoERouting | None = None
    """Hooks on a MoE policy's routers (None: a dense model, or routers sapo-rl does not know)."""

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps so far (skipped non-finite ones included): what changes the weights."""
        return self.scheduler.last_epoch


@dataclass
class UpdateResult:
    metrics: dict[str, float]
    """Token-weighted means over every process (maxima and minima stay extremes)."""
    off_policy: OffPolicyStats
    """Histograms of the off-policy minibatches' token log-ratios, summed over processes."""


@dataclass
class NonFiniteSteps:
    """The run's streak of skipped non-finite optimizer steps; it spans rollout steps, so the
    trainer keeps one for the whole run (a resume starts it at 0). `stop` is the error message
    once the run must stop."""

    limit: int
    in_a_row: int = 0
    stop: str | None = None


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


def policy_update(state: PolicyState, rollout: Rollout, advantages_B: Tensor, settings: UpdateSettings,
                  nonfinite: NonFiniteSteps | None = None) -> UpdateResult:
    """num_iterations passes of num_minibatches optimizer steps over the rollout batch.

    An optimizer step whose loss, gradient norm or unmasked loss inputs (log-probs of the policy,
    pi_old and the reference; advantages) are NaN or infinite on any process is skipped on every
    process: gradients dropped, no optimizer step, the schedule steps on. Its metrics are left out
    of the averages and counted in `nonfinite_steps`. `nonfinite` (the run's streak) gets `stop`
    set, and the remaining steps are not taken, after more than its limit in a row or when the
    parameters are not finite (checked after a skipped step and once at the end); without it,
    that raises NonFiniteUpdateError."""
    model, optimizer, scheduler, accelerator = state.model, state.optimizer, state.scheduler, state.accelerator
    forward, G = settings.forward, settings.group_size
    mask_BT = rollout.completion_mask.clone()
    if settings.mask_truncated_completions:
        mask_BT = mask_BT * (~rollout.truncated).unsqueeze(-1)
    lengths = sample_lengths(rollout.prompt_mask, rollout.completion_mask)
    world = accelerator.num_processes
    own_streak = nonfinite is None
    nonfinite = NonFiniteSteps(settings.max_nonfinite_steps) if own_streak else nonfinite
    stats, off_policy = MetricMean(), OffPolicyStats(accelerator.device)
    routing_stats = [RoutingStats() for _ in range(settings.num_minibatches)]  # summed over iterations
    grad_norms, losses, skipped = [], [], 0
    model.train()
    for iteration in range(settings.num_iterations):
        plan = minibatch_plan(len(rollout) // G, G, settings.num_minibatches, seed=settings.seed, step=rollout.step,
                              iteration=iteration, first_position=rollout.first_position)
        for k, minibatch in enumerate(plan):
            # Divide every micro-batch by the whole minibatch's denominator, summed over processes and
            # divided by their number because DDP and FSDP average gradients: the update is then that
            # of the global minibatch, whatever the micro-batches or the process count.
            denominator = accelerator.reduce(aggregation_denominator(settings.loss.aggregation, mask_BT[minibatch])
                                             .to(accelerator.device), "sum") / world
            micro_batches = micro_batch_split(minibatch, lengths, forward, accelerator.device)
            # Held until the step is known to be finite, so that a skipped step's NaNs stay out of the logs.
            loss, added, log_ratios = 0.0, [], []
            bad_inputs = torch.zeros((), dtype=torch.long, device=accelerator.device)
            local_tokens = float(mask_BT[minibatch].sum()) if settings.router_aux_loss_coef else 0.0
            for j, idx in enumerate(micro_batches):
                sync = j == len(micro_batches) - 1
                call = _routing_call(state.routing, rollout, idx, settings, routing_stats[k])
                with gradient_sync(accelerator, model, sync), _active(state.routing, call):
                    part = micro_batch(rollout, idx, forward)
                    logp_BT, entropy_BT = completion_logprobs(model, part.prompt_ids, part.prompt_mask,
                                                              part.completion_ids, part.completion_mask, forward,
                                                              with_entropy=True, routing=call)
                    # With one minibatch and one pass the policy has not moved since the rollout:
                    # pi_old is pi_theta and its separate forward pass was skipped.
                    old_BT = logp_BT.detach() if part.old_logprobs is None else part.old_logprobs
                    mask = mask_BT[idx][:, :part.completion_ids.shape[1]]
                    # policy_loss's own check would raise on this process alone and leave the others
                    # waiting in the gradient all-reduce; the step is skipped everywhere instead.
                    # An inf log-prob is clamped to a finite loss, so the loss alone would not show it.
                    weights_BT, mismatch = _mismatch(settings, old_BT, part.sampling_logprobs, mask)
                    bad_inputs += sum(unmasked_nonfinite(mask != 0, logprobs=logp_BT.detach(), old_logprobs=old_BT,
                                                         advantages=advantages_B[idx].unsqueeze(-1).expand_as(logp_BT),
                                                         ref_logprobs=part.ref_logprobs,
                                                         rollout_logprobs=None if weights_BT is None
                                                         else part.sampling_logprobs).values())
                    out = policy_loss(logp_BT, old_BT, advantages_B[idx], mask, **settings.loss.kwargs(),
                                      ref_logprobs=part.ref_logprobs, importance_weights=weights_BT,
                                      denominator=denominator, check_finite=False)
                    out.metrics.update(mismatch)
                    if settings.router_aux_loss_coef:
                        # transformers' load-balancing loss of this micro-batch's tokens, weighted by its
                        # share of the process's minibatch (DDP then averages the processes).
                        aux = state.routing.aux_loss(call)
                        out.loss = out.loss + settings.router_aux_loss_coef * aux * float(mask.sum()) / max(
                            local_tokens, 1.0)
                        out.metrics["moe/aux_loss"] = float(aux.detach())
                    accelerator.backward(out.loss)
                tokens = float(mask.sum())
                if k > 0 or iteration > 0:
                    log_ratios.append((logp_BT.detach() - old_BT, mask))
                if k == 0 and iteration == 0 and part.old_logprobs is not None:
                    # Before any update the two differ only by numerics (sampling pass vs training forward).
                    out.metrics["rollout/logprob_abs_diff"] = float(((logp_BT.detach() - old_BT).abs() * mask).sum()
                                                                    / max(tokens, 1.0))
                out.metrics["entropy"] = float((entropy_BT * mask).sum() / max(tokens, 1.0))
                loss += float(out.loss.detach())
                added.append((out.metrics, tokens))
            grad_norm, inputs_finite = _clip_and_check(accelerator, model, settings.max_grad_norm, bad_inputs, loss)
            if inputs_finite and math.isfinite(grad_norm):
                optimizer.step()
                nonfinite.in_a_row = 0
                grad_norms.append(grad_norm)
                losses.append(loss)
                for metrics, tokens in added:
                    stats.add(metrics, tokens)
                for log_ratio, mask in log_ratios:
                    off_policy.add(log_ratio, mask)
            else:
                skipped += 1
                scaler_overflow = _skip_step(accelerator, optimizer, inputs_finite=inputs_finite)
                if not scaler_overflow:  # the scaler lowers its scale and retries: its calibration, not a fault
                    nonfinite.in_a_row += 1
                    nonfinite.stop = _stop_message(accelerator, model, settings, nonfinite, rollout.step)
            if skipped:
                with warnings.catch_warnings():
                    # A skipped first step makes torch warn that the schedule stepped before the
                    # optimizer. Only then: catch_warnings resets the registry of warnings shown once.
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                    scheduler.step()
            else:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if nonfinite.stop:
                break
        if nonfinite.stop:
            break
    if nonfinite.stop is None and not parameters_finite(accelerator, model):
        nonfinite.stop = _parameters_message(settings, rollout.step)
    if own_streak and nonfinite.stop:
        raise NonFiniteUpdateError(nonfinite.stop)
    # A process's loss has the global denominator divided by the number of processes (as DDP
    # averages gradients), so the global minibatch's loss is the plain mean over processes.
    if losses:
        stats.add({"loss": sum(losses) / len(losses)}, 1.0)
    if state.routing is not None:
        stats.add(minibatch_metrics(routing_stats), 1.0)
    metrics = _across_processes(accelerator, stats).result()
    if "kl/mean" in metrics:
        metrics["kl"] = metrics.pop("kl/mean")
    metrics["loss"] = metrics.get("loss", math.nan)
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
    metrics["learning_rate"] = scheduler.get_last_lr()[0]
    metrics["nonfinite_steps"] = float(skipped)
    off_policy.reduce(accelerator)
    metrics.update(off_policy.metrics())
    return UpdateResult(metrics, off_policy)


def _routing_call(routing: MoERouting | None, rollout: Rollout, idx: list[int], settings: UpdateSettings,
                  stats: RoutingStats) -> RoutingCall | None:
    """A MoE policy's routing for one micro-batch: the rollout's recorded routing forced (r2, r3)
    or compared with (none), the routers' logits kept for the load-balancing loss."""
    if routing is None:
        return None
    mode = "replay" if settings.routing_replay != "none" else "compare"
    return RoutingCall(mode, rollout.routing, torch.tensor(idx, device=rollout.completion_ids.device), stats=stats,
                       collect_logits=settings.router_aux_loss_coef > 0)


def _active(routing: MoERouting | None, call: RoutingCall | None):
    return routing.active(call) if routing is not None else contextlib.nullcontext()


def _mismatch(settings: UpdateSettings, old_BT: Tensor, rollout_BT: Tensor | None,
              mask: Tensor) -> tuple[Tensor | None, dict[str, float]]:
    """The importance weights (None: no correction) and the mismatch metrics of a micro-batch.
    Without the engine's log-probabilities (greedy or fallback sampling) there is nothing to
    weight by."""
    if rollout_BT is None or not (settings.track_mismatch or settings.correction):
        return None, {}
    weights_BT, metrics = importance_weights(old_BT, rollout_BT, mask, settings.correction or CorrectionSettings())
    if settings.correction is None:  # tracked, not applied
        return None, {"rollout/mismatch_kl": metrics["rollout/mismatch_kl"]}
    return weights_BT, metrics


def _clip_and_check(accelerator, model, max_grad_norm: float, bad_inputs: Tensor, loss: float) -> tuple[float, bool]:
    """The gradient norm (before clipping) and whether the loss and its inputs are finite on every
    process, in one device-to-host copy. The norm is global already (DDP averaged the gradients
    before it); the loss and inputs are this process's, so their verdict is summed over
    processes: every process then decides alike."""
    norm = _clip(accelerator, model, max_grad_norm)
    bad = bad_inputs.to(torch.float32) + (0.0 if math.isfinite(loss) else 1.0)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    norm_value, bad_value = torch.stack([norm.to(torch.float32).reshape(()), bad.to(norm.device)]).tolist()
    return norm_value, bad_value == 0


def _skip_step(accelerator, optimizer, *, inputs_finite: bool) -> bool:
    """Drop the gradients without an optimizer step. With a loss scaler (dtype=float16) its
    state is reset as its own skipped step would: the scale is lowered when the gradients are
    the fault. Returns True when that is all it was: finite loss and inputs, overflowing gradients."""
    optimizer.zero_grad(set_to_none=True)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return False
    # update() with a new scale also clears unscale_'s record; without it the next unscale_ raises.
    scale = scaler.get_scale()
    scaler.update(new_scale=scale * scaler.get_backoff_factor() if inputs_finite else scale)
    return inputs_finite


def _stop_message(accelerator, model, settings: UpdateSettings, nonfinite: NonFiniteSteps, step: int) -> str | None:
    # Only after a skipped step: a finite step needs no look at the parameters until the end of the update.
    if not parameters_finite(accelerator, model):
        return _parameters_message(settings, step)
    if nonfinite.in_a_row <= nonfinite.limit:
        return None
    return (f"{nonfinite.in_a_row} optimizer step(s) in a row had a NaN or infinite loss or gradient norm, at rollout "
            f"step {step + 1} (max_nonfinite_steps={nonfinite.limit}); none was applied, and the checkpoints hold "
            f"finite parameters. Lower learning_rate (now {settings.learning_rate:g}), clip with max_grad_norm > 0, "
            f"use dtype=bfloat16 or float32 instead of float16, or raise max_nonfinite_steps")


def _parameters_message(settings: UpdateSettings, step: int) -> str:
    return (f"the parameters became NaN or infinite (or too large for a finite norm) at rollout step {step + 1}: an "
            f"update too large for their dtype (learning_rate={settings.learning_rate:g}, "
            f"max_grad_norm={settings.max_grad_norm:g}); no checkpoint was written with them. Resume from the last "
            "checkpoint with a lower learning_rate, or clip with max_grad_norm > 0")


def parameters_finite(accelerator, model) -> bool:
    """Whether every parameter tensor has a finite 2-norm on every process: one fused pass (the
    kernel of gradient clipping; max-abs is ~10x slower on CPU) and one sync. It also fails
    for finite entries beyond ~1e19, whose squares overflow: such weights overflow the forward
    pass too, and the next rollout would sample from NaN probabilities."""
    params = local_tensors(p.detach() for p in model.parameters())  # each process checks its shards
    if not params:
        return True
    bad = (~torch.isfinite(torch.stack(torch._foreach_norm(params)))).sum().to(torch.float32)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.to(accelerator.device), "sum")
    return not bad.item()


def _across_processes(accelerator, stats: MetricMean) -> MetricMean:
    """The totals of every process in one MetricMean (token-weighted means over all of them)."""
    if accelerator.num_processes == 1:
        return stats
    from accelerate.utils import gather_object

    total = MetricMean()
    for part in gather_object([stats]):
        total.merge(part)
    return total


def _clip(accelerator, model, max_grad_norm: float) -> Tensor:
    """The global gradient norm, clipped to max_grad_norm if > 0 (torch's clip_grad_norm_ in two
    steps, so that a sharded model's norm is reduced over processes first)."""
    accelerator.unscale_gradients()  # a loss scaler's gradients: the norm is of the unscaled ones
    params = [p for p in model.parameters() if p.grad is not None]
    norm = total_grad_norm(params, accelerator.device)
    if max_grad_norm > 0 and params:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
    return norm
