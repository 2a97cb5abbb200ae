"""The `hf` rollout engine: samples with the training model itself (any Hugging Face causal LM).

Shared-prompt sampling: each prompt is prefilled once, its KV cache expanded G ways, and all
groups decode together in one batch, each group drawing from its own seeded generator.

The draws match `model.generate(num_return_sequences=G)` run group by group under
`torch.manual_seed(seed)`: the same logits processing (float32 logits, temperature, then top-p
as transformers' TopPLogitsWarper does it), what `torch.multinomial` draws from the group's
(G, V) probabilities each step (computed for all groups at once, see `_GroupDraws`), finished
rows padded. So a group's samples still depend only on its seed, not on which other groups
share the batch, while the model runs one prefill per prompt instead of G and one decoding
batch instead of one per group. A model whose cache cannot be expanded (linear-attention or SSM
layers) falls back to `model.generate` once per group, with the same draws.

Per token, the decoding writes keys and values into buffers allocated once (`_preallocate`)
instead of concatenating the cache, and a bfloat16 copy on a CPU gets 4D masks, which keep
transformers off a slow attention kernel (`_pack_queries_with_a_mask`). In float32 neither
changes a number. `python benchmarks/rollout.py --split` times the parts of a step.

With `lockstep` (a sharded model, whose every forward pass all processes make together), every
process decodes until the last sequence of any process is finished, and `model.generate` runs
with `synced_gpus`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationConfig

from ..model.loading import forward_keeping_logits
from ..model.routing import MoERouting, RoutingCall, RoutingTable, TokenAddresses
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
        self._routing: MoERouting | None = None

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
        routing, table = self._routing_table(model, prompt_ids, group_size, sampling)
        was_training = model.training
        model.eval()
        try:
            parts = []
            for start in range(0, len(prompt_ids), per_batch):
                batch = dict(prompt_ids=prompt_ids[start:start + per_batch], seeds=seeds[start:start + per_batch],
                             group_size=group_size, max_new_tokens=sampling.max_new_tokens,
                             temperature=sampling.temperature, top_p=sampling.top_p, eos_token_id=self.eos_token_id,
                             pad_token_id=pad, device=self.device, lockstep=self.lockstep)
                rows = torch.arange(start * group_size, (start + len(batch["prompt_ids"])) * group_size)
                call = None if table is None else RoutingCall("record", table, rows.to(self.device))
                with routing.active(call) if call is not None else contextlib.nullcontext():
                    part = sample_groups(model, **batch, routing=call) if self.shared_prefill else None
                if part is None:
                    table = None  # the fallback records nothing
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
        return Generation(ids_BT, mask_BT, truncated.to(self.device), logprobs_BT,
                          routed_experts=None if table is None else table.to_engine())

    def _routing_table(self, model, prompt_ids: list[list[int]], group_size: int,
                       sampling: SamplingSettings) -> tuple[MoERouting | None, RoutingTable | None]:
        """Hooks on the sampling model's MoE routers and an empty table for this call's tokens,
        where routed experts are asked for and the model has routers sapo-rl knows."""
        if not sampling.return_routed_experts:
            return None, None
        if self._routing is None or self._routing.model is not model:
            if self._routing is not None:
                self._routing.close()
            self._routing = MoERouting(model)
        if not self._routing.routers:
            return None, None
        positions = max(len(ids) for ids in prompt_ids) + sampling.max_new_tokens
        return self._routing, self._routing.new_table(len(prompt_ids) * group_size, positions, self.device)


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
                  lockstep: bool = False, routing: RoutingCall | None = None) -> tuple[Tensor, Tensor | None] | None:
    """(Q * G, T) sampled tokens for Q prompts and G = group_size, T <= max_new_tokens, rows of a group adjacent,
    pad after EOS; temperature 0 is greedy. Also their log-probabilities under the model at the
    sampling temperature (without top-p: the policy pi / T that the update differentiates), (Q*G, T)
    float32, or None when greedy. None if the model's cache cannot be expanded (the caller then
    falls back to `model.generate`). The model must be in eval mode. `routing`: a recording MoE
    routing call (routing.py) whose samples are these Q * G rows, bound to each pass's tokens."""
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
    if routing is not None:
        routing.bind(TokenAddresses.prefill(mask, positions, G))
    out = forward_keeping_logits(model, 1, input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                 use_cache=True)
    cache = _returned_cache(out)
    if not _expandable(cache):
        return None
    if G > 1:
        cache.batch_repeat_interleave(G)
    _preallocate(cache, max_new_tokens - 1)
    logits = out.logits[:, -1].repeat_interleave(G, dim=0)  # (Q*G, V)
    # The attention mask of every step is a view of one buffer: the prompt's mask, then ones.
    full_mask = torch.cat([mask.repeat_interleave(G, dim=0), mask.new_ones(Q * G, max_new_tokens)], dim=1)
    next_position = positions[:, -1:].repeat_interleave(G, dim=0) + 1

    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    four_d = _pack_queries_with_a_mask(model, cache, device)
    draws = _GroupDraws(seeds, G, device) if temperature > 0 else None
    unfinished = torch.ones(Q * G, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for t in range(max_new_tokens):
        next_tokens, logprob = _draw(logits, draws, temperature, top_p, unfinished, pad_token_id)
        tokens.append(next_tokens)
        if logprob is not None:
            logprobs.append(logprob)
        unfinished &= next_tokens != eos_token_id
        if t == max_new_tokens - 1 or not _any_unfinished(unfinished, lockstep):
            break
        if routing is not None:
            routing.bind(TokenAddresses.step(next_position[:, 0]))
        step_mask = full_mask[:, :P + t + 1]
        if four_d:
            step_mask = step_mask[:, None, None, :].bool()
        out = model(input_ids=next_tokens.unsqueeze(1), attention_mask=step_mask, position_ids=next_position,
                    use_cache=True, **{cache_name: cache})
        cache, logits = _returned_cache(out), out.logits[:, -1]
        next_position = next_position + 1
    logprobs_BT = torch.stack(logprobs, dim=1) if logprobs else None
    if logprobs_BT is not None and bool(logprobs_BT.isnan().any()):
        # torch.multinomial's own check, made once: NaN or infinite logits give NaN probabilities
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    return torch.stack(tokens, dim=1), logprobs_BT


def _draw(logits: Tensor, draws: _GroupDraws | None, temperature: float, top_p: float, unfinished: Tensor,
          pad_token_id: int) -> tuple[Tensor, Tensor | None]:
    """One decoding step's sampling: each row's next token (pad where the row had finished) and,
    unless greedy, its log-probability under pi / T without top-p."""
    if draws is None:
        return torch.where(unfinished, logits.float().argmax(-1), pad_token_id), None
    scaled = logits.float()  # (Q*G, V), shared by the draw and its log-prob
    if temperature != 1.0:  # x / 1.0 is x: skip the pass
        scaled = scaled / temperature
    next_tokens = torch.where(unfinished, draws.multinomial(top_p_filter(scaled, top_p).softmax(-1)), pad_token_id)
    logprob = scaled.gather(1, next_tokens.unsqueeze(1)).squeeze(1) - scaled.logsumexp(-1)
    return next_tokens, logprob


class _GroupDraws:
    """`torch.multinomial(probs[g*G:(g+1)*G], 1, generator=generators[g])` for every group g, computed
    for all groups at once. For one sample torch.multinomial takes q ~ Exp(1) of the probabilities'
    shape from the generator (`exponential_`) and returns argmax(probs / q); so does this, with each
    group's q drawn from its own generator, so a group's draws still depend on its seed alone, and
    it skips multinomial's per-call validity checks (a min, a max and a sum over the group's
    probabilities; `sample_groups` checks the log-probabilities for NaN once instead).

    On a CPU, `exponential_` computes one element at a time (a 64-bit RNG call and a scalar
    log1p each: with G * V elements per group and step, about half of the decoding time of
    `benchmarks/rollout.py`'s model). The same numbers come from `uniform_` in float64 (the same
    53-bit uniforms from the same generator calls) and a vectorised -log1p(-u) rounded to
    float32, about 3 times faster; `_uniform_noise_is_exponential` checks that this holds for the
    torch in use (values and generator state), otherwise `exponential_` itself is used. The
    vectorised log1p may differ from the scalar one in the last bit of a double, which moves q by
    at most one float32 rounding: a row whose winner is not ahead of the runner-up by far more
    than that (`CLOSE`; about one row in 10^5) is drawn again, from the generator's saved state,
    with `exponential_` itself. On other devices `exponential_` runs as multinomial runs it."""

    CLOSE = 2.0 ** -16  # relative margin of a safe winner; roundings move a ratio by ~2^-22

    def __init__(self, seeds: list[int], group_size: int, device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.G = group_size
        self.fast = device.type == "cpu" and _uniform_noise_is_exponential()

    def multinomial(self, probs: Tensor) -> Tensor:
        G = self.G
        states = [gen.get_state() for gen in self.generators] if self.fast else None
        ratio = probs / self.noise(probs)
        tokens = ratio.argmax(-1)
        if not self.fast:
            return tokens
        best = ratio.gather(1, tokens.unsqueeze(1)).squeeze(1)
        second = ratio.scatter_(1, tokens.unsqueeze(1), 0).amax(-1)  # the runner-up (amax is cheaper than a count)
        close = second >= best * (1 - self.CLOSE)
        if bool(close.any()):
            for g in sorted({int(row) // G for row in close.nonzero().flatten()}):
                gen, rows = self.generators[g], slice(g * G, (g + 1) * G)
                after = gen.get_state()
                gen.set_state(states[g])
                exact = torch.empty_like(probs[rows]).exponential_(1, generator=gen)
                gen.set_state(after)  # where `uniform_` left it, as exponential_ does
                tokens[rows] = (probs[rows] / exact).argmax(-1)
        return tokens

    def noise(self, probs: Tensor) -> Tensor:
        """Exp(1) noise of probs' shape and dtype, rows g*G:(g+1)*G from generators[g]."""
        G = self.G
        if self.fast:
            return _exponential_from_uniform(probs.shape, self.generators, G).to(probs.dtype)
        noise = torch.empty_like(probs)
        for g, gen in enumerate(self.generators):
            noise[g * G:(g + 1) * G].exponential_(1, generator=gen)
        return noise


def _exponential_from_uniform(shape: torch.Size, generators: list[torch.Generator], G: int) -> Tensor:
    """(Q*G, V) float32 Exp(1) noise, rows g*G:(g+1)*G from generators[g] (CPU generators)."""
    u = torch.empty(shape, dtype=torch.float64)
    for g, gen in enumerate(generators):
        u[g * G:(g + 1) * G].uniform_(generator=gen)
    return u.neg_().log1p_().to(torch.float32).neg_()


@functools.cache
def _uniform_noise_is_exponential() -> bool:
    """Whether `_exponential_from_uniform` reproduces this torch's CPU `exponential_`: the same
    values and the same generator state after."""
    want_gen, got_gen = torch.Generator().manual_seed(12345), torch.Generator().manual_seed(12345)
    want = torch.empty(4, 4099).exponential_(1, generator=want_gen)
    got = _exponential_from_uniform(want.shape, [got_gen], 4)
    return torch.equal(want, got) and torch.equal(want_gen.get_state(), got_gen.get_state())


def _preallocate(cache, extra_tokens: int) -> None:
    """Let the cache's attention layers write each new token's keys and values into buffers
    allocated once for `extra_tokens` more positions, instead of `DynamicLayer.update`'s
    concatenation (a copy of the whole cache at every token). The layer's `keys` and `values`
    are views of the buffers, with the values and shapes concatenation would give. Layers of
    other kinds, and caches without `layers` (transformers < 4.56), are left as they are."""
    for layer in getattr(cache, "layers", None) or ():
        keys = getattr(layer, "keys", None)
        if type(layer).__name__ == "DynamicLayer" and isinstance(keys, Tensor) and keys.dim() == 4 and extra_tokens > 0:
            _PreallocatedLayer(layer, extra_tokens)


class _PreallocatedLayer:
    def __init__(self, layer, extra_tokens: int) -> None:
        B, H, L, D = layer.keys.shape
        self.layer = layer
        self.keys = layer.keys.new_empty(B, H, L + extra_tokens, D)
        self.values = layer.values.new_empty(B, H, L + extra_tokens, layer.values.shape[-1])
        self.keys[:, :, :L], self.values[:, :, :L] = layer.keys, layer.values
        layer.keys, layer.values = self.keys[:, :, :L], self.values[:, :, :L]
        self.concatenate = layer.update
        layer.update = self.update  # the instance's attribute, used by Cache.update

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        layer = self.layer
        start = layer.keys.shape[-2]
        end = start + key_states.shape[-2]
        if (end > self.keys.shape[-2] or layer.keys.data_ptr() != self.keys.data_ptr()
                or layer.keys.shape[0] != self.keys.shape[0]):  # full, or replaced (cropped, reordered...)
            return self.concatenate(key_states, value_states, *args, **kwargs)
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        layer.keys, layer.values = self.keys[:, :, :end], self.values[:, :, :end]
        return layer.keys, layer.values


def _pack_queries_with_a_mask(model, cache, device: torch.device) -> bool:
    """Whether to hand a low-precision model on a CPU each decoding step's mask as a 4D boolean
    mask (the one transformers would build, for attention layers that all see the whole prefix)
    rather than the 2D one. With 2D padding masks of all ones transformers drops the mask and
    calls SDPA with `enable_gqa`, whose CPU kernel in bfloat16 is 5-8 times slower than the
    form it uses when there is a mask (the query heads of a key/value head packed as one
    block of queries). Float32 keeps the 2D mask: the two kernels round differently, and float32
    draws stay exactly those of `generate`."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(cache, "layers", None)
    try:  # the packed form; without it (older transformers) a 4D mask buys nothing
        from transformers.integrations.sdpa_attention import pack_gqa  # noqa: F401
    except ImportError:
        return False
    return (_PACK_LOW_PRECISION and device.type == "cpu"
            and getattr(model, "dtype", torch.float32) in (torch.bfloat16, torch.float16)
            and getattr(config, "_attn_implementation", None) == "sdpa"
            and getattr(config, "num_key_value_heads", None) not in (None, getattr(config, "num_attention_heads", None))
            and bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers))


_PACK_LOW_PRECISION = True


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
