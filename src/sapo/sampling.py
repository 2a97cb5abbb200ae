"""Shared-prompt sampling: each prompt is prefilled once, its KV cache expanded G ways, and all
groups decode together in one batch, each group drawing from its own seeded generator.

The draws match `model.generate(num_return_sequences=G)` run group by group under
`torch.manual_seed(seed)`: the same logits processing (float32 logits, temperature, then top-p
as transformers' TopPLogitsWarper does it), one `torch.multinomial` over the group's (G, V)
probabilities per step, finished rows padded. So a group's samples still depend only on its
seed, not on which other groups share the batch, while the model runs one prefill per prompt
instead of G and one decoding batch instead of one per group.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .models import forward_keeping_logits


def top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """Scores (N, V) with the tokens outside the top-p nucleus set to -inf."""
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), -torch.inf)
    return scores


@torch.no_grad()
def sample_groups(model, prompt_ids: list[list[int]], *, group_size: int, max_new_tokens: int, temperature: float,
                  top_p: float, eos_token_id: int, pad_token_id: int, seeds: list[int], device: torch.device
                  ) -> tuple[Tensor, Tensor | None] | None:
    """(len(prompts) * group_size, T) sampled tokens, T <= max_new_tokens, rows of a group adjacent,
    pad after EOS; temperature 0 is greedy. Also their log-probabilities under the model at the
    sampling temperature (without top-p: the policy pi / T that the update differentiates), (N, T)
    float32, or None when greedy. None if the model's cache cannot be expanded (the caller then
    falls back to `generate`). The model must be in eval mode."""
    B, G = len(prompt_ids), group_size
    P = max(len(ids) for ids in prompt_ids)
    # Left-pad so every prompt ends at the same column and the new tokens line up.
    input_ids = torch.full((B, P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for b, ids in enumerate(prompt_ids):
        input_ids[b, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[b, P - len(ids):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    # Prefill: one pass per prompt, not per sample.
    out = forward_keeping_logits(model, 1, input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                 use_cache=True)
    cache = _returned_cache(out)
    if not _expandable(cache):
        return None
    if G > 1:
        cache.batch_repeat_interleave(G)
    logits = out.logits[:, -1].repeat_interleave(G, dim=0)  # (B*G, V)
    mask = mask.repeat_interleave(G, dim=0)
    next_position = positions[:, -1:].repeat_interleave(G, dim=0) + 1

    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    generators = None
    if temperature > 0:
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    unfinished = torch.ones(B * G, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for t in range(max_new_tokens):
        if generators is None:
            next_tokens = logits.float().argmax(-1)
        else:
            scaled = logits.float() / temperature  # (B*G, V), shared by the draw and its log-prob
            probs = top_p_filter(scaled, top_p).softmax(-1)
            next_tokens = torch.cat([torch.multinomial(probs[g * G:(g + 1) * G], 1, generator=gen).squeeze(1)
                                     for g, gen in enumerate(generators)])
        next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
        tokens.append(next_tokens)
        if generators is not None:  # log pi/T of the drawn token, without top-p
            logprobs.append(scaled.gather(1, next_tokens.unsqueeze(1)).squeeze(1) - scaled.logsumexp(-1))
        unfinished &= next_tokens != eos_token_id
        if t == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        mask = torch.cat([mask, mask.new_ones(B * G, 1)], dim=1)
        out = model(input_ids=next_tokens.unsqueeze(1), attention_mask=mask, position_ids=next_position,
                    use_cache=True, **{cache_name: cache})
        cache, logits = _returned_cache(out), out.logits[:, -1]
        next_position = next_position + 1
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1) if logprobs else None


def _returned_cache(out):
    """The model output's KV cache: transformers 5.24 renamed `past_key_values` to `cache` (the
    old name warns, and goes in 5.40); earlier versions only have the old one."""
    return out["cache"] if "cache" in out.keys() else out.past_key_values


def _expandable(cache) -> bool:
    """Whether repeating the cache along the batch repeats all of its state: attention layers'
    keys and values do; linear-attention / SSM layers (Qwen3-Next, Falcon-H1, ...) hold more."""
    if not hasattr(cache, "batch_repeat_interleave"):
        return False
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers < 4.56: a plain DynamicCache holds keys and values only
        return type(cache).__name__ == "DynamicCache"
    return bool(layers) and all(type(layer).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer")
                                for layer in layers)
