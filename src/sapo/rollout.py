"""Phase 1, rollout: sample G completions per prompt from the current policy and record what
the update needs (token ids, masks, truncation, behaviour log-probabilities)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig

from .data import derive_seed
from .logprobs import completion_logprobs
from .sampling import sample_groups


@dataclass
class Rollout:
    """N = prompts * G samples, grouped: samples g*G .. g*G+G-1 share prompt g."""

    prompt_ids: Tensor  # (N, P) left-padded
    prompt_mask: Tensor  # (N, P)
    completion_ids: Tensor  # (N, C) right-padded
    completion_mask: Tensor  # (N, C) 1 up to and including EOS
    truncated: Tensor  # (N,) bool: reached max_completion_length without EOS
    row_indices: list[int]  # (N,) dataset row of each sample
    old_logprobs: Tensor | None = None  # (N, C) behaviour policy; None when provably equal to the current one
    ref_logprobs: Tensor | None = None  # (N, C) reference policy, when beta > 0
    sampling_logprobs: Tensor | None = None  # (N, C) pi / T of each token as computed while sampling, if known

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, idx: list[int]) -> "Rollout":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx],
                       self.completion_mask[idx], self.truncated[idx], [self.row_indices[i] for i in idx],
                       pick(self.old_logprobs), pick(self.ref_logprobs), pick(self.sampling_logprobs))


@torch.no_grad()
def generate(model, prompt_ids: list[list[int]], row_indices: list[int], *, group_size: int, max_new_tokens: int,
             temperature: float, top_p: float, eos_token_id: int, pad_token_id: int, seeds: list[int],
             device: torch.device, shared_prefill: bool = True, max_sequences: int = 0) -> Rollout:
    """Sample `group_size` completions for each prompt.

    Each group is sampled under its own seed, so a group's completions depend only on that
    seed: not on batch composition, the number of processes, or a resume. temperature=0 is
    greedy decoding. With `shared_prefill` (sampling.py) each prompt is prefilled once and the
    groups decode together, at most `max_sequences` sequences at a time (0: all); otherwise, or
    if the model's cache cannot be expanded, `model.generate` runs once per group, with the same
    draws. The shared path also returns the log-probabilities of the sampled tokens in
    `sampling_logprobs` (None when greedy or when any group fell back to `generate`).
    """
    if not prompt_ids:
        raise ValueError("generate: no prompts")
    per_batch = max(1, max_sequences // group_size) if max_sequences else len(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        parts = []
        for start in range(0, len(prompt_ids), per_batch):
            batch = dict(prompt_ids=prompt_ids[start:start + per_batch], seeds=seeds[start:start + per_batch],
                         group_size=group_size, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, device=device)
            part = sample_groups(model, **batch) if shared_prefill else None
            parts.append(part if part is not None else _generate_per_group(model, **batch))
    finally:
        model.train(was_training)
    width = max(p[0].shape[1] for p in parts)
    tokens_NT = torch.cat([F.pad(p[0], (0, width - p[0].shape[1]), value=pad_token_id) for p in parts])
    logprobs_NT = None if any(p[1] is None for p in parts) else \
        torch.cat([F.pad(p[1], (0, width - p[1].shape[1])) for p in parts])
    N, T = tokens_NT.shape
    # Keep everything up to and including the first EOS; a row without one was truncated.
    is_eos = tokens_NT.cpu() == eos_token_id
    truncated = ~is_eos.any(-1)
    first_eos = torch.where(truncated, T - 1, is_eos.float().argmax(-1))
    completion_mask = (torch.arange(T) <= first_eos.unsqueeze(1)).long()
    lengths = completion_mask.sum(-1)
    C = max(int(lengths.max()) if N else 1, 1)
    completion_mask = completion_mask[:, :C].to(device)
    completion_ids = torch.where(completion_mask.bool(), tokens_NT[:, :C].to(device), pad_token_id)
    sampling_logprobs = None
    if logprobs_NT is not None:
        sampling_logprobs = torch.where(completion_mask.bool(), logprobs_NT[:, :C].to(device), 0.0)
    P = max(len(x) for x in prompt_ids)
    prompt_t = torch.full((N, P), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((N, P), dtype=torch.long)
    for g, ids in enumerate(prompt_ids):
        rows = slice(g * group_size, (g + 1) * group_size)
        prompt_t[rows, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
        prompt_mask[rows, P - len(ids):] = 1
    return Rollout(
        prompt_ids=prompt_t.to(device), prompt_mask=prompt_mask.to(device), completion_ids=completion_ids,
        completion_mask=completion_mask, truncated=truncated.to(device),
        row_indices=[r for r in row_indices for _ in range(group_size)], sampling_logprobs=sampling_logprobs,
    )


def _generate_per_group(model, prompt_ids: list[list[int]], *, group_size: int, max_new_tokens: int,
                        temperature: float, top_p: float, eos_token_id: int, pad_token_id: int, seeds: list[int],
                        device: torch.device) -> tuple[Tensor, None]:
    """model.generate once per group; (N, max_new_tokens) tokens padded after EOS. No log-probs:
    keeping generate's per-step logits would cost T x G x V floats per group."""
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    config = GenerationConfig(**sampling, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id, num_return_sequences=group_size)
    # generate() fills every unset option from model.generation_config (a repetition penalty, say),
    # which would sample from something other than pi / T: let it see only our config.
    model_config, model.generation_config = model.generation_config, config
    tokens = torch.full((len(prompt_ids) * group_size, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    try:
        for g, (ids, seed) in enumerate(zip(prompt_ids, seeds)):
            prompt = torch.tensor([ids], device=device)
            with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
            new = out[:, prompt.shape[1]:]
            tokens[g * group_size:(g + 1) * group_size, :new.shape[1]] = new
    finally:
        model.generation_config = model_config
    return tokens, None


def decode(tokenizer, rollout: Rollout, conversational: bool) -> tuple[list, list[list[int]]]:
    """Completions as reward functions see them (text, or assistant messages for conversational
    prompts) and their token ids up to and including EOS."""
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    ids = [row[mask.bool()].tolist() for row, mask in zip(rollout.completion_ids.cpu(), rollout.completion_mask.cpu())]
    return completions, ids


@torch.no_grad()
def batched_logprobs(model, rollout: Rollout, temperature: float, micro_batch_size: int, chunk_size: int = 0,
                     padding_free: bool = False) -> Tensor:
    """(N, C) log-probabilities of the rollout's completions, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(rollout), micro_batch_size):
        part = rollout.select(list(range(start, min(start + micro_batch_size, len(rollout)))))
        logp, _ = completion_logprobs(model, part.prompt_ids, part.prompt_mask, part.completion_ids,
                                      part.completion_mask, temperature, chunk_size=chunk_size,
                                      padding_free=padding_free)
        parts.append(logp)
    model.train(was_training)
    return torch.cat(parts)


def group_seeds(seed: int, step: int, positions: list[int]) -> list[int]:
    """One sampling seed per prompt, from its position in the step's global batch."""
    return [derive_seed(seed, "rollout", step, p) for p in positions]
