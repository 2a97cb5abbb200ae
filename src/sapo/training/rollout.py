"""Phase 1, rollout: G completions of each of the step's prompts from the rollout engine, and
what the update needs besides them: masks, truncation, and the log-probabilities of the
behaviour policy (pi_old) and of the reference policy where they are needed."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data import PromptSet, derive_seed
from ..engines import Generation, RolloutEngine, SamplingSettings
from ..model.logprobs import ForwardSettings, completion_logprobs
from ..model.routing import MoERouting, RoutingCall, RoutingTable
from . import micro_batches


@dataclass(frozen=True)
class RolloutSettings:
    """What the rollout phase reads of the config."""

    group_size: int
    """G, completions per prompt (num_generations)."""
    sampling: SamplingSettings
    """What the engine samples."""
    forward: ForwardSettings
    """How pi_old and the reference score the completions when they need a forward pass."""
    needs_old_logprobs: bool
    """Whether the policy can move before a minibatch is used (num_minibatches or num_iterations
    above 1); otherwise the update takes its own log-probabilities as pi_old."""
    use_rollout_logprobs: bool
    """Take pi_old from the engine's log-probabilities, where it has them."""
    seed: int
    """The run's seed: each group samples under a seed derived from it, the step and the group's
    position in the step's global batch."""
    routing_replay: str = "none"
    """MoE routing replay (routing_replay): "r3" replays the engine's routing in the behaviour pass."""


@dataclass
class Rollout:
    """B = Q * G samples of Q prompts, grouped: samples g*G .. g*G+G-1 share prompt g."""

    prompt_ids: Tensor  # (B, P) left-padded
    prompt_mask: Tensor  # (B, P)
    completion_ids: Tensor  # (B, T) right-padded
    completion_mask: Tensor  # (B, T) 1 up to and including EOS
    truncated: Tensor  # (B,) bool: reached max_completion_length without EOS
    row_indices: list[int]  # (B,) dataset row of each sample
    old_logprobs: Tensor | None = None  # (B, T) behaviour policy; None when provably equal to the current one
    ref_logprobs: Tensor | None = None  # (B, T) reference policy, when beta > 0
    sampling_logprobs: Tensor | None = None  # (B, T) pi / T of each token as computed while sampling, if known
    step: int = 0  # the rollout step it was sampled at (0-based)
    first_position: int = 0  # position of its first prompt in the step's global batch (other processes hold the rest)
    routing: RoutingTable | None = None  # MoE: the behaviour routing of every token (the engine's, or pi_old's pass)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @classmethod
    def from_generation(cls, generation: Generation, prompts: PromptSet, rows: list[int], *, step: int = 0,
                        first_position: int = 0) -> "Rollout":
        """The engine's completions of `rows` (G each, grouped) with their prompts, left-padded."""
        device = generation.completion_ids.device
        G = len(generation.completion_ids) // len(rows)
        P = max(len(prompts.prompt_ids[r]) for r in rows)
        prompt_BP = torch.full((len(rows) * G, P), prompts.pad_token_id, dtype=torch.long)
        prompt_mask_BP = torch.zeros((len(rows) * G, P), dtype=torch.long)
        for g, r in enumerate(rows):
            ids = prompts.prompt_ids[r]
            prompt_BP[g * G:(g + 1) * G, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
            prompt_mask_BP[g * G:(g + 1) * G, P - len(ids):] = 1
        return cls(prompt_ids=prompt_BP.to(device), prompt_mask=prompt_mask_BP.to(device),
                   completion_ids=generation.completion_ids, completion_mask=generation.completion_mask,
                   truncated=generation.truncated, row_indices=[r for r in rows for _ in range(G)],
                   sampling_logprobs=generation.logprobs, step=step, first_position=first_position,
                   routing=None if generation.routed_experts is None
                   else RoutingTable.from_engine(generation.routed_experts))

    def trimmed(self) -> "Rollout":
        """The same samples without the prompt columns (left) and completion columns (right)
        that are padding in every one of them."""
        used_P, used_T = self.prompt_mask.any(0).nonzero(), self.completion_mask.any(0).nonzero()
        p0 = int(used_P[0]) if len(used_P) else 0
        t1 = int(used_T[-1]) + 1 if len(used_T) else 1
        cut = lambda t: None if t is None else t[:, :t1]  # noqa: E731
        return Rollout(self.prompt_ids[:, p0:], self.prompt_mask[:, p0:], self.completion_ids[:, :t1],
                       self.completion_mask[:, :t1], self.truncated, self.row_indices, cut(self.old_logprobs),
                       cut(self.ref_logprobs), cut(self.sampling_logprobs), self.step, self.first_position,
                       self.routing)

    def select(self, idx: list[int]) -> "Rollout":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx],
                       self.completion_mask[idx], self.truncated[idx], [self.row_indices[i] for i in idx],
                       pick(self.old_logprobs), pick(self.ref_logprobs), pick(self.sampling_logprobs),
                       self.step, self.first_position, None if self.routing is None else self.routing.select(idx))


def micro_batch(rollout: Rollout, idx: list[int], forward: ForwardSettings) -> Rollout:
    """The samples `idx`; with a token budget, without the columns that are padding in all of
    them, so that the budget bounds what the forward pass computes."""
    part = rollout.select(idx)
    return part.trimmed() if forward.max_tokens_per_micro_batch else part


def sample(engine: RolloutEngine, prompts: PromptSet, rows: list[int], settings: RolloutSettings, *,
           step: int, first_position: int) -> Rollout:
    """G completions of each of `rows` (the prompts at `first_position`, ... of step `step`'s
    global batch), each group under its own seed: the samples depend on the seed, the step and
    the positions alone, not on the process count, the batch or a resume."""
    seeds = [derive_seed(settings.seed, "rollout", step, first_position + i) for i in range(len(rows))]
    generation = engine.generate([prompts.prompt_ids[r] for r in rows], settings.group_size, settings.sampling, seeds)
    return Rollout.from_generation(generation, prompts, rows, step=step, first_position=first_position)


def behaviour_logprobs(policy, rollout: Rollout, settings: RolloutSettings,
                       routing: MoERouting | None = None) -> tuple[Tensor | None, RoutingTable | None]:
    """pi_old for the update and the routing of the pass that gave it (a MoE policy), or None.

    pi_old is None when it cannot differ from the update's own log-probabilities (one minibatch,
    one pass: no routing either, the update's forward is the behaviour pass), else the engine's
    (use_rollout_logprobs, and only where the engine is the training forward: the same model and
    weights in eval mode, where only batching and KV-cache numerics differ; its routing is the
    engine's), else a forward pass, which records its routing, or with routing_replay=r3
    replays the engine's."""
    engine_routing = rollout.routing
    if not settings.needs_old_logprobs:
        return None, engine_routing if settings.routing_replay == "r3" else None
    if settings.use_rollout_logprobs and rollout.sampling_logprobs is not None:
        return rollout.sampling_logprobs, engine_routing
    if routing is None or not routing.routers:
        return batched_logprobs(policy, rollout, settings.forward), None
    if settings.routing_replay == "r3":
        return batched_logprobs(policy, rollout, settings.forward, routing=routing, mode="replay"), engine_routing
    table = routing.new_table(len(rollout), rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1],
                              rollout.completion_ids.device)
    return batched_logprobs(policy, rollout, settings.forward, routing=routing, table=table), table


@torch.no_grad()
def batched_logprobs(model, rollout: Rollout, forward: ForwardSettings, *, routing: MoERouting | None = None,
                     mode: str = "record", table: RoutingTable | None = None) -> Tensor:
    """(B, T) log-probabilities of the rollout's completions, in eval mode (no dropout). With
    `routing`, each pass records its routing into `table`, or (mode "replay") forces the rollout's."""
    was_training = model.training
    model.eval()
    logp_BT = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=rollout.completion_ids.device)
    lengths = micro_batches.sample_lengths(rollout.prompt_mask, rollout.completion_mask)
    for idx in micro_batches.split(list(range(len(rollout))), lengths, forward, rollout.completion_ids.device):
        part = micro_batch(rollout, idx, forward)
        call = None if routing is None else RoutingCall(mode, table if mode == "record" else rollout.routing,
                                                        torch.tensor(idx, device=logp_BT.device))
        with routing.active(call) if call is not None else contextlib.nullcontext():
            logp_BT[idx, :part.completion_ids.shape[1]], _ = completion_logprobs(
                model, part.prompt_ids, part.prompt_mask, part.completion_ids, part.completion_mask, forward,
                routing=call)
    model.train(was_training)
    return logp_BT
