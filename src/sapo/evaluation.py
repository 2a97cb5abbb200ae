"""Phase 6, evaluate: Pass@1, Pass@k and greedy accuracy of a policy on held-out prompts.

A sample counts as correct when its reward is at least 1 (full marks). Pass@1 is the mean
correctness over all samples of all problems; Pass@k uses the unbiased estimator
1 - C(n - c, k) / C(n, k) of Chen et al. (2021) per problem with n samples, c of them correct.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import TrainerState

from . import rewards as reward_lib
from .data import PromptSet, derive_seed
from .rollout import decode, generate


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct)
    is correct: the unbiased Pass@k estimator, 1 - C(n-c, k) / C(n, k) (Chen et al., 2021),
    defined for 1 <= k <= n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class EvalTotals:
    """Sums over problems, so that shards (processes) add up before averaging."""

    problems: int = 0
    samples: int = 0
    correct: float = 0.0
    reward: float = 0.0
    pass_k: float = 0.0
    greedy_correct: float = 0.0
    k: int = 1
    per_problem: list[float] = field(default_factory=list)  # fraction correct per problem, this shard only

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.problems, self.samples, self.correct, self.reward, self.pass_k, self.greedy_correct],
                            dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, k: int) -> "EvalTotals":
        p, s, c, r, pk, g = t.tolist()
        return cls(int(p), int(s), c, r, pk, g, k)

    def metrics(self) -> dict[str, float]:
        n = max(self.problems, 1)
        return {"pass@1": self.correct / max(self.samples, 1), f"pass@{self.k}": self.pass_k / n,
                "greedy_accuracy": self.greedy_correct / n, "mean_reward": self.reward / max(self.samples, 1)}


@torch.no_grad()
def evaluate(model, tokenizer, prompts: PromptSet, rewards: list[reward_lib.NamedReward], weights: list[float], *,
             samples: int, temperature: float, top_p: float, max_new_tokens: int, seed: int, device: torch.device,
             indices: list[int] | None = None, batch_prompts: int = 16, greedy: bool = True, max_sequences: int = 0,
             on_batch=None, trainer_state=None) -> EvalTotals:
    """Sample `samples` completions per prompt (seeded per problem, so every evaluation of a run
    sees the same random draws) and, if `greedy`, one greedy completion. `trainer_state` is what
    reward functions get as such (default: an empty transformers TrainerState)."""
    trainer_state = TrainerState() if trainer_state is None else trainer_state
    indices = list(range(len(prompts))) if indices is None else indices
    totals = EvalTotals(k=samples)
    for start in range(0, len(indices), batch_prompts):
        rows = indices[start:start + batch_prompts]
        sampled = _rewards(model, tokenizer, prompts, rows, rewards, weights, samples, temperature, top_p,
                           max_new_tokens, [derive_seed(seed, "eval", r) for r in rows], device, max_sequences,
                           trainer_state)
        for i in range(len(rows)):
            group = sampled[i * samples:(i + 1) * samples]
            correct = sum(1 for r in group if r >= 1.0)
            totals.problems += 1
            totals.samples += samples
            totals.correct += correct
            totals.reward += sum(0.0 if math.isnan(r) else r for r in group)
            totals.pass_k += pass_at_k(samples, correct, samples)
            totals.per_problem.append(correct / samples)
        if greedy:
            best = _rewards(model, tokenizer, prompts, rows, rewards, weights, 1, 0.0, 1.0, max_new_tokens,
                            [0] * len(rows), device, max_sequences, trainer_state)
            totals.greedy_correct += sum(1 for r in best if r >= 1.0)
        if on_batch is not None:
            on_batch(len(rows))
    return totals


def _rewards(model, tokenizer, prompts, rows, rewards, weights, group_size, temperature, top_p, max_new_tokens,
             seeds, device, max_sequences, trainer_state) -> list[float]:
    rollout = generate(model, [prompts.prompt_ids[r] for r in rows], rows, group_size=group_size,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seeds=seeds,
                       device=device, max_sequences=max_sequences)
    completions, ids = decode(tokenizer, rollout, prompts.conversational)
    scores = reward_lib.score(rewards, weights, [prompts.rows[r]["prompt"] for r in rollout.row_indices], completions,
                              ids, prompts.columns(rollout.row_indices), skip_errors=True,
                              context=reward_lib.RewardContext(trainer_state))
    return scores.total.tolist()
