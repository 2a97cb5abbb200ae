"""The seam between the trainer and whatever samples the completions: a rollout engine takes
token ids of prompts and returns G sampled completions of each, with the engine's own
log-probabilities of the drawn tokens where it has them. The trainer's rollout phase and the
evaluation call nothing else, so another engine (an inference server, a low-precision copy of
the policy) slots in behind the same two methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True)
class SamplingSettings:
    """What to sample (vLLM's SamplingParams, in the config's names)."""

    max_new_tokens: int
    """Most tokens per completion (max_completion_length); one that reaches it is truncated."""
    temperature: float = 1.0
    """Sampling temperature; 0 decodes greedily."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    max_num_seqs: int = 0
    """Most sequences decoded in one batch, rounded down to whole groups (0: all at once)."""


@dataclass
class Generation:
    """B = Q * G completions of Q prompts, grouped: rows g*G .. g*G+G-1 answer prompt g."""

    completion_ids: Tensor
    """(B, T) token ids, right-padded after the first EOS (or the last token)."""
    completion_mask: Tensor
    """(B, T) 1 up to and including EOS, 0 after."""
    truncated: Tensor
    """(B,) bool: finished by reaching max_new_tokens, not by EOS (vLLM's finish reason "length")."""
    logprobs: Tensor | None = None
    """(B, T) float32 log pi / temperature of each drawn token as the engine computed it (without
    top-p), 0 at padding; None where the engine has none (greedy decoding, a fallback path)."""
    routed_experts: Tensor | None = None
    """(B, T, layers, k) the experts a mixture-of-experts engine routed each drawn token to, for
    routing replay; None where the engine does not report them (the hf engine today)."""

    @property
    def finish_reasons(self) -> list[str]:
        """vLLM's finish reason of each completion: "length" (truncated) or "stop" (EOS)."""
        return ["length" if t else "stop" for t in self.truncated.tolist()]


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], group_size: int, sampling: SamplingSettings,
                 seeds: list[int]) -> Generation:
        """`group_size` completions of each prompt. Each group draws under its own seed, so its
        samples depend on that seed alone: not on the batch, the process count or a resume."""
        ...

    def sync(self, model) -> None:
        """Sample from `model`'s current weights from now on (an engine holding its own copy of
        the weights takes them here)."""
        ...
