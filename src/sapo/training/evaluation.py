"""Phase 5, evaluate: Pass@1, Pass@k and greedy accuracy of a policy on held-out prompts.

A sample counts as correct when its reward is at least 1 (full marks). Pass@1 is the mean
correctness over all samples of all problems; Pass@k uses the unbiased estimator
1 - C(n - c, k) / C(n, k) of Chen et al. (2021) per problem with n samples, c of them correct.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from transformers import TrainerState

from ..data import PromptSet, derive_seed
from ..engines import RolloutEngine, SamplingSettings
from ..rewards import NamedReward, RewardSettings, score
from .reward import decode


@dataclass(frozen=True)
class EvalSettings:
    """What the evaluation reads of the config."""

    samples: int
    """Samples per problem (eval_num_generations): the n of Pass@n."""
    greedy: bool
    """Also decode each problem greedily (eval_greedy)."""
    sampling: SamplingSettings
    """The training's sampling settings: Pass@k is measured on the policy that is trained."""
    rewards: RewardSettings
    """Weights of the reward functions; a function that raises scores 'does not apply'."""
    seed: int
    """Seeds the samples of each problem, the same at every evaluation of a run."""
    batch_prompts: int = 16
    """Problems per engine call."""


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
def evaluate(engine: RolloutEngine, tokenizer, prompts: PromptSet, rewards: list[NamedReward], settings: EvalSettings,
             *, indices: list[int] | None = None, on_batch=None, trainer_state=None, pad_to: int = 0) -> EvalTotals:
    """Sample `settings.samples` completions per prompt (seeded per problem, so every evaluation
    of a run sees the same random draws) and, if `settings.greedy`, one greedy completion.
    `indices`: the problems to evaluate (default all); `trainer_state` is what reward functions
    get as such (default: an empty transformers TrainerState). `pad_to`: run the engine on this
    many problems at least, repeating one and counting it once, so that processes sharing a
    sharded model make the same engine calls whatever their share of the problems."""
    trainer_state = TrainerState() if trainer_state is None else trainer_state
    indices = list(range(len(prompts))) if indices is None else indices
    n = settings.samples
    totals = EvalTotals(k=n)
    run = indices + [indices[0] if indices else 0] * max(pad_to - len(indices), 0)
    for start in range(0, len(run), settings.batch_prompts):
        rows = run[start:start + settings.batch_prompts]
        counted = max(0, min(len(indices) - start, len(rows)))  # the rest only keep the processes in step

        def rewards_of(group_size: int, sampling: SamplingSettings, seeds: list[int]) -> list[float]:
            generation = engine.generate([prompts.prompt_ids[r] for r in rows], group_size, sampling, seeds)
            completions, ids = decode(tokenizer, generation.completion_ids, generation.completion_mask,
                                      prompts.conversational)
            row_indices = [r for r in rows for _ in range(group_size)]
            return score(rewards, settings.rewards, [prompts.rows[r]["prompt"] for r in row_indices], completions,
                         ids, prompts.columns(row_indices), trainer_state=trainer_state).total.tolist()

        sampled = rewards_of(n, settings.sampling, [derive_seed(settings.seed, "eval", r) for r in rows])
        for i in range(counted):
            group = sampled[i * n:(i + 1) * n]
            correct = sum(1 for r in group if r >= 1.0)
            totals.problems += 1
            totals.samples += n
            totals.correct += correct
            totals.reward += sum(0.0 if math.isnan(r) else r for r in group)
            totals.pass_k += pass_at_k(n, correct, n)
            totals.per_problem.append(correct / n)
        if settings.greedy:
            greedy = dataclasses.replace(settings.sampling, temperature=0.0, top_p=1.0)
            totals.greedy_correct += sum(1 for r in rewards_of(1, greedy, [0] * len(rows))[:counted] if r >= 1.0)
        if on_batch is not None and counted:
            on_batch(counted)
    return totals
