"""The seam between the trainer and whatever samples the completions: a rollout engine takes
token ids of prompts and returns G sampled completions of each, with the engine's own
log-probabilities of the drawn tokens where it has them. The trainer's rollout phase and the
evaluation call nothing else, so another engine (an inference server, a low-precision copy of
the policy) slots in behind the same two methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
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
    return_routed_experts: bool = False
    """Ask a mixture-of-experts engine for the experts it routed each token to (routing replay);
    an engine that cannot leaves `Generation.routed_experts` None."""


@dataclass(frozen=True)
class VLLMSettings:
    """What the vLLM engine reads of the config (TRL's names)."""

    mode: str
    """"server" (HTTP to a `vllm serve` process) or "colocate" (vllm.LLM in each training process)."""
    server_base_url: str
    """Where the server listens (vllm_server_base_url)."""
    server_timeout: float
    """Seconds to wait for the server to answer at start-up (vllm_server_timeout)."""
    gpu_memory_utilization: float
    """Colocate: share of the GPU's memory vLLM takes for weights and KV cache."""
    tensor_parallel_size: int
    """Colocate: processes one vLLM instance is split over."""
    enable_sleep_mode: bool
    """Colocate: free vLLM's weights and KV cache while the trainer updates."""
    model: str
    """The model directory both sides load (the server names it too)."""
    max_model_len: int
    """Longest sequence sampled: max_prompt_length + max_completion_length."""


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
    """(B, T) float32 log pi / temperature of each drawn token as the engine computed it, 0 at
    padding; None where the engine has none (greedy decoding, a fallback path). The hf engine's
    are before top-p; vLLM's (processed_logprobs) after it, renormalised."""
    routed_experts: Tensor | None = None
    """(B, S, layers, k) the experts a mixture-of-experts engine routed each token to, for routing
    replay: position s of sample b is the s-th token of its unpadded sequence (prompt, then
    completion), layers are the MoE layers in order, -1 where unknown (S = longest prompt +
    max_new_tokens). None where not asked for (`return_routed_experts`) or not reported: the hf
    engine reports them (its fallback path does not); the vLLM engines do not yet."""

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

    def sync(self, model, version: int | None = None) -> None:
        """Sample from `model`'s current weights from now on (an engine holding its own copy of
        the weights takes them here). `version` changes whenever the weights may have (the
        trainer passes its optimizer steps so far): an engine may skip a sync of a version it
        has already; None always syncs."""
        ...


def generation_from_lists(token_ids: list[list[int]], logprobs: list[list[float]] | None, finish_reasons: list[str],
                          *, pad_token_id: int, device) -> Generation:
    """A Generation from an inference engine's per-completion lists (token ids up to and
    including the stop token, the log-probability of each, vLLM's finish reason of each)."""
    T = max(1, max(len(ids) for ids in token_ids))
    ids_BT = torch.full((len(token_ids), T), pad_token_id, dtype=torch.long)
    mask_BT = torch.zeros((len(token_ids), T), dtype=torch.long)
    logp_BT = torch.zeros((len(token_ids), T), dtype=torch.float32) if logprobs is not None else None
    for b, ids in enumerate(token_ids):
        ids_BT[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask_BT[b, :len(ids)] = 1
        if logp_BT is not None:
            logp_BT[b, :len(ids)] = torch.tensor(logprobs[b], dtype=torch.float32)
    truncated_B = torch.tensor([reason == "length" for reason in finish_reasons], dtype=torch.bool)
    return Generation(completion_ids=ids_BT.to(device), completion_mask=mask_BT.to(device),
                      truncated=truncated_B.to(device), logprobs=None if logp_BT is None else logp_BT.to(device))
