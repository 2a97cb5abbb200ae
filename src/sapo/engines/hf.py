"""The `hf` rollout engine: samples with the training model itself (any Hugging Face causal LM).

Shared-prompt sampling: each prompt is prefilled once, its KV cache expanded G ways, and all
groups decode together in one batch, each group drawing from its own seeded generator.

The draws match `model.generate(num_return_sequences=G)` run group by group under
`torch.manual_seed(seed)`: the same logits processing (float32 logits, temperature, then top-p
as transformers' TopPLogitsWarper does it), one `torch.multinomial` over the group's (G, V)
probabilities per step, finished rows padded. So a group's samples still depend only on its
seed, not on which other groups share the batch, while the model runs one prefill per prompt
instead of G and one decoding batch instead of one per group. A model whose cache cannot be
expanded (linear-attention or SSM layers) falls back to `model.generate` once per group, with
the same draws.

With `lockstep` (a sharded model, whose every forward pass all processes make together), every
process decodes until the last sequence of any process is finished, and `model.generate` runs
with `synced_gpus`.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig

from ..model.loading import forward_keeping_logits
from .base import Generation, SamplingSettings


class HFEngine:
    """Generates with `model` in eval mode, under whatever autocast the caller set. `sync` points
    it at the policy (the same module the trainer updates, so there is nothing to copy), or, with
    `dtype`, refreshes a copy of the policy in that dtype (rollout_dtype=bfloat16): sampling then
    runs on low-precision weights while the update keeps its float32 ones, a train/inference
    mismatch of the kind an inference engine has."""

    def __init__(self, model, *, eos_token_id: int, pad_token_id: int, device: torch.device,
                 shared_prefill: bool = True, lockstep: bool = False, dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.device = device
        self.shared_prefill = shared_prefill
        self.lockstep = lockstep
        self.dtype = dtype
        self._copy = None

    def sync(self, model, version: int | None = None) -> None:
        if self.dtype is None:
            self.model = model
            return
        with torch.no_grad():
            if self._copy is None:
                # Parameters straight into the copy's dtype (no second float32 model, even for a
                # moment; tied ones stay tied); buffers keep theirs, as a model loaded in bfloat16
                # keeps its rotary frequencies in float32.
                memo = {id(p): torch.nn.Parameter(p.detach().to(self.dtype), requires_grad=False)
                        for p in model.parameters()}
                self._copy = copy.deepcopy(model, memo)
            else:
                own = self._copy.state_dict()
                for name, value in model.state_dict().items():
                    own[name].copy_(value)  # cast into the copy's dtype
        self.model = self._copy

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], group_size: int, sampling: SamplingSettings,
                 seeds: list[int]) -> Generation:
        """With `shared_prefill` the groups decode together, at most `sampling.max_num_seqs`
        sequences at a time (0: all); otherwise, or if the model's cache cannot be expanded,
        `model.generate` runs once per group. Log-probabilities come only from the shared path
        (None when greedy or when any group fell back to `generate`)."""
        if not prompt_ids:
            raise ValueError("generate: no prompts")
        model, pad = self.model, self.pad_token_id
        per_batch = max(1, sampling.max_num_seqs // group_size) if sampling.max_num_seqs else len(prompt_ids)
        was_training = model.training
        model.eval()
        try:
            parts = []
            for start in range(0, len(prompt_ids), per_batch):
                batch = dict(prompt_ids=prompt_ids[start:start + per_batch], seeds=seeds[start:start + per_batch],
                             group_size=group_size, max_new_tokens=sampling.max_new_tokens,
                             temperature=sampling.temperature, top_p=sampling.top_p, eos_token_id=self.eos_token_id,
                             pad_token_id=pad, device=self.device, lockstep=self.lockstep)
                part = sample_groups(model, **batch) if self.shared_prefill else None
                parts.append(part if part is not None else _generate_per_group(model, **batch))
        finally:
            model.train(was_training)
        width = max(p[0].shape[1] for p in parts)
        tokens_BT = torch.cat([F.pad(p[0], (0, width - p[0].shape[1]), value=pad) for p in parts])
        logprobs_BT = None if any(p[1] is None for p in parts) else \
            torch.cat([F.pad(p[1], (0, width - p[1].shape[1])) for p in parts])
        B, T = tokens_BT.shape
        # Keep everything up to and including the first EOS; a row without one was truncated.
        is_eos = tokens_BT.cpu() == self.eos_token_id
        truncated = ~is_eos.any(-1)
        first_eos = torch.where(truncated, T - 1, is_eos.float().argmax(-1))
        mask_BT = (torch.arange(T) <= first_eos.unsqueeze(1)).long()
        width = max(int(mask_BT.sum(-1).max()) if B else 1, 1)
        mask_BT = mask_BT[:, :width].to(self.device)
        ids_BT = torch.where(mask_BT.bool(), tokens_BT[:, :width].to(self.device), pad)
        if logprobs_BT is not None:
            logprobs_BT = torch.where(mask_BT.bool(), logprobs_BT[:, :width].to(self.device), 0.0)
        return Generation(ids_BT, mask_BT, truncated.to(self.device), logprobs_BT)


def top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """Scores (B, V) with the tokens outside the top-p nucleus set to -inf."""
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), -torch.inf)
    return scores


@torch.no_grad()
def sample_groups(model, prompt_ids: list[list[int]], *, group_size: int, max_new_tokens: int, temperature: float,
                  top_p: float, eos_token_id: int, pad_token_id: int, seeds: list[int], device: torch.device,
                  lockstep: bool = False) -> tuple[Tensor, Tensor | None] | None:
    """(Q * G, T) sampled tokens for Q prompts and G = group_size, T <= max_new_tokens, rows of a group adjacent,
    pad after EOS; temperature 0 is greedy. Also their log-probabilities under the model at the
    sampling temperature (without top-p: the policy pi / T that the update differentiates), (Q*G, T)
    float32, or None when greedy. None if the model's cache cannot be expanded (the caller then
    falls back to `model.generate`). The model must be in eval mode."""
    Q, G = len(prompt_ids), group_size
    P = max(len(ids) for ids in prompt_ids)
    # Left-pad so every prompt ends at the same column and the new tokens line up.
    input_ids = torch.full((Q, P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((Q, P), dtype=torch.long)
    for q, ids in enumerate(prompt_ids):
        input_ids[q, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[q, P - len(ids):] = 1
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
    logits = out.logits[:, -1].repeat_interleave(G, dim=0)  # (Q*G, V)
    mask = mask.repeat_interleave(G, dim=0)
    next_position = positions[:, -1:].repeat_interleave(G, dim=0) + 1

    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    generators = None
    if temperature > 0:
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    unfinished = torch.ones(Q * G, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for t in range(max_new_tokens):
        if generators is None:
            next_tokens = logits.float().argmax(-1)
        else:
            scaled = logits.float() / temperature  # (Q*G, V), shared by the draw and its log-prob
            probs = top_p_filter(scaled, top_p).softmax(-1)
            next_tokens = torch.cat([torch.multinomial(probs[g * G:(g + 1) * G], 1, generator=gen).squeeze(1)
                                     for g, gen in enumerate(generators)])
        next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
        tokens.append(next_tokens)
        if generators is not None:  # log pi/T of the drawn token, without top-p
            logprobs.append(scaled.gather(1, next_tokens.unsqueeze(1)).squeeze(1) - scaled.logsumexp(-1))
        unfinished &= next_tokens != eos_token_id
        if t == max_new_tokens - 1 or not _any_unfinished(unfinished, lockstep):
            break
        mask = torch.cat([mask, mask.new_ones(Q * G, 1)], dim=1)
        out = model(input_ids=next_tokens.unsqueeze(1), attention_mask=mask, position_ids=next_position,
                    use_cache=True, **{cache_name: cache})
        cache, logits = _returned_cache(out), out.logits[:, -1]
        next_position = next_position + 1
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1) if logprobs else None


def _any_unfinished(unfinished: Tensor, lockstep: bool) -> bool:
    """Whether a sequence is unfinished here or, with `lockstep`, on any process."""
    flag = unfinished.any()
    if lockstep:
        flag = flag.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


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


def _generate_per_group(model, prompt_ids: list[list[int]], *, group_size: int, max_new_tokens: int,
                        temperature: float, top_p: float, eos_token_id: int, pad_token_id: int, seeds: list[int],
                        device: torch.device, lockstep: bool = False) -> tuple[Tensor, None]:
    """model.generate once per group; (B, max_new_tokens) tokens padded after EOS. No log-probs:
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
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                                     synced_gpus=lockstep)
            new = out[:, prompt.shape[1]:]
            tokens[g * group_size:(g + 1) * group_size, :new.shape[1]] = new
    finally:
        model.generation_config = model_config
    return tokens, None
