"""Per-token log-probabilities (and entropy) of completions under a causal LM."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .chunked_logprobs import token_logprobs
from .loading import forward_keeping_logits
from .packing import pack_rows
from .routing import RoutingCall, TokenAddresses
from .sharding import compute_dtype, is_sharded


@dataclass(frozen=True)
class ForwardSettings:
    """How completions are scored by forward passes of the policy (or the reference model)."""

    temperature: float = 1.0
    """Log-probabilities are of pi / temperature, the distribution the tokens were sampled from."""
    chunk_size: int = 0
    """Vocabulary entries per chunk of the output layer (`sapo.token_logprobs`); 0: full logits."""
    padding_free: bool = False
    """Score on padding-free rows where the model supports them (packing.py)."""
    micro_batch_size: int = 8
    """Sequences per forward (and backward) pass."""
    max_tokens_per_micro_batch: int = 0
    """Pack the passes by prompt + completion tokens instead (0: `micro_batch_size` sequences)."""


def completion_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, forward: ForwardSettings = ForwardSettings(), *,
                        with_entropy: bool = False, routing: RoutingCall | None = None) -> tuple[Tensor, Tensor | None]:
    """log pi(completion token | prefix) at the sampling temperature, (B, T) float32.

    Prompts are left-padded, completions right-padded; positions come from the attention mask
    so padding does not shift them. Only the completion positions go through the output layer.
    With `forward.padding_free`, the model runs on padding-free rows (packing.py: each prompt once,
    its samples' completions after it) where it supports them: an attention implementation that
    takes a block mask, no sliding window, and the same values as the usual layout at its first
    use (checked once per model). With 0 < `forward.chunk_size` < V and a plain linear output layer,
    that layer runs as `token_logprobs` over vocabulary chunks of that size: no (tokens, V)
    logits. The forward still goes through `model` itself (a DDP/FSDP wrapper's hooks fire).
    The entropy (B, T), if asked, carries no gradient. Padding positions hold 0. `routing`: a
    MoE routing call (routing.py), bound to the chosen layout's token addresses for the pass.
    """
    layout = _padded_layout(prompt_ids, prompt_mask, completion_ids, completion_mask)
    packed = None
    if forward.padding_free and is_sharded(_inner(model)):  # at the first call, which every process makes
        settle_padding_free(model, forward, prompt_ids.device)
    if forward.padding_free and _PACKING_VERIFIED.get(_inner(model)) is not False:
        packed = _packed_layout(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    if packed is not None and _packing_verified(model, layout, *packed, completion_ids, completion_mask,
                                                forward.temperature, forward.chunk_size):
        layout = packed[0]
    if routing is not None:
        routing.bind(layout.addresses())
    return _logprobs(model, layout, completion_ids, completion_mask, forward.temperature, with_entropy,
                     forward.chunk_size)


@dataclass
class _Layout:
    kwargs: dict  # the model's inputs
    keep: int  # logits_to_keep: the last positions the output layer needs
    select: Callable[[Tensor], Tensor]  # (R, >= keep, ...) -> (N, ...): the positions predicting the completion tokens
    addresses: Callable[[], TokenAddresses]  # the (sample, position) of each input token, for MoE routing


def _padded_layout(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor) -> _Layout:
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    T = completion_ids.shape[1]
    mask = completion_mask.bool()
    # The logit at position p predicts token p + 1.
    return _Layout(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False),
                   T + 1, lambda x: x[:, -(T + 1):-1][mask],
                   lambda: TokenAddresses.padded(attention_mask, position_ids))


def _packed_layout(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                   completion_mask: Tensor) -> tuple[_Layout, bool] | None:
    """The padding-free layout and whether some row holds several samples (None: not for this
    model or batch)."""
    config = getattr(_inner(model), "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in _MASK_DTYPE or _has_local_attention(config):
        return None
    rows = pack_rows(prompt_ids, prompt_mask, completion_ids, completion_mask)
    if rows is None:
        return None
    L = rows.input_ids.shape[1]
    cols = rows.cols_N - L  # from the end: valid whether or not the model honoured logits_to_keep
    kwargs = dict(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False,
                  attention_mask=rows.attention_mask(_MASK_DTYPE[implementation]))
    return _Layout(kwargs, L - rows.first_needed_column, lambda x: x[rows.rows_N, cols],
                   lambda: TokenAddresses.packed(rows.segments, rows.position_ids, rows.row_samples)), rows.shared


# Attention implementations that take a custom 4D mask as it is: sdpa as booleans, eager added to the scores.
_MASK_DTYPE = {"sdpa": None, "eager": torch.float32}


def _has_local_attention(config) -> bool:
    """A custom mask replaces the model's own: models whose layers do not all attend to the whole
    prefix (sliding windows, chunked attention as in Llama 4, linear-attention or SSM layers)
    keep the usual layout."""
    configs = [config]
    try:
        configs.append(config.get_text_config(decoder=True))
    except Exception:  # noqa: BLE001 - no separate text config
        pass
    return any((getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True))
               or getattr(c, "attention_chunk_size", None)
               or any(kind != "full_attention" for kind in getattr(c, "layer_types", None) or ())
               for c in configs)


def _inner(model):
    return model.module if hasattr(model, "module") else model  # DDP


# Models whose padding-free results matched the usual layout: True once checked on rows holding
# several samples, "unshared" while only checked on rows of one sample each, False after a
# mismatch (weak: a freed model is forgotten).
_PACKING_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packing_verified(model, usual: _Layout, packed: _Layout, shared: bool, completion_ids: Tensor,
                      completion_mask: Tensor, temperature: float, chunk_size: int) -> bool:
    """Whether to use the padding-free layout for this model. The first call, and the first one
    whose rows hold several samples of a prompt, compute both layouts (without gradient or
    autocast) and compare them; a mismatch (a model that does not honour the block mask) turns
    the layout off for the model, with a warning. The check runs the unwrapped model: a DDP
    wrapper's forward would take part in collectives that other processes, checking at other
    calls, do not join. A sharded model's every forward is collective: it is checked once, up
    front, by `settle_padding_free`."""
    inner = _inner(model)
    verdict = _PACKING_VERIFIED.get(inner)
    if isinstance(verdict, bool) or (verdict == "unshared" and not shared):
        return verdict is not False
    mask = completion_mask.bool()
    if not mask.any():
        return True  # nothing to compare; the values are all 0 either way
    with _in_weights_dtype(inner):
        expected, got = (_logprobs(inner, layout, completion_ids, completion_mask, temperature, False, chunk_size)[0]
                         for layout in (usual, packed))
    dtype = compute_dtype(inner)
    ok = bool(((expected - got).abs() <= (1e-3 if dtype == torch.float32 else 5e-2))[mask].all())
    if not ok:
        warnings.warn(f"{type(inner).__name__}: padding-free rows do not give the same log-probabilities as "
                      "padded ones (the model does not honour a block attention mask); using padded rows",
                      stacklevel=3)
    _PACKING_VERIFIED[inner] = ok and ("unshared" if not shared else True)
    return ok


def settle_padding_free(model, forward: ForwardSettings, device: torch.device) -> bool:
    """Decide once, on a fixed batch (on `device`) whose rows hold several samples each, whether
    `model` uses padding-free rows, so that no later call checks (and runs extra forward passes)
    on some processes only: for a sharded model, whose forward passes every process must make
    together. `completion_logprobs` calls it at a sharded model's first use."""
    inner = _inner(model)
    if not forward.padding_free or isinstance(_PACKING_VERIFIED.get(inner), bool):
        return _PACKING_VERIFIED.get(inner, False) is True
    vocab = inner.config.get_text_config(decoder=True).vocab_size
    g = torch.Generator().manual_seed(0)
    prompt_BP = torch.randint(vocab, (4, 6), generator=g).to(device)  # 2 prompts x 2 samples, long prompts:
    completion_BT = torch.randint(vocab, (4, 3), generator=g).to(device)  # the packed rows are shared
    prompt_BP[1], prompt_BP[3] = prompt_BP[0], prompt_BP[2]
    prompt_mask, completion_mask = torch.ones_like(prompt_BP), torch.ones_like(completion_BT)
    usual = _padded_layout(prompt_BP, prompt_mask, completion_BT, completion_mask)
    packed = _packed_layout(inner, prompt_BP, prompt_mask, completion_BT, completion_mask)
    if packed is None or not packed[1]:
        _PACKING_VERIFIED[inner] = False  # not for this model
        return False
    _packing_verified(inner, usual, *packed, completion_BT, completion_mask, forward.temperature, forward.chunk_size)
    return _PACKING_VERIFIED[inner] is True


@contextlib.contextmanager
def _in_weights_dtype(model):
    """No gradient and no autocast, including the autocast that accelerate's mixed precision
    wraps around the model's forward (keeping the original as `_original_forward`): in bfloat16
    the two layouts differ by rounding far above what a float32 comparison allows."""
    wrapped, original = vars(model).get("forward"), getattr(model, "_original_forward", None)
    if wrapped is not None and original is not None:
        model.forward = original
    try:
        with torch.no_grad(), torch.autocast(next(model.parameters()).device.type, enabled=False):
            yield
    finally:
        if wrapped is not None and original is not None:
            model.forward = wrapped


def _logprobs(model, layout: _Layout, completion_ids: Tensor, completion_mask: Tensor, temperature: float,
              with_entropy: bool, chunk_size: int) -> tuple[Tensor, Tensor | None]:
    mask = completion_mask.bool()
    targets_N = completion_ids[mask]
    head = lean_head(model) if chunk_size else None
    if head is not None and head.weight.shape[0] <= chunk_size:  # one chunk: the full logits are no larger
        head = None
    shadow = None
    if head is not None and _VERIFIED.get(head) is None:
        # Not yet checked: this call takes the full-logits path and, from the same hidden states,
        # also computes the chunked values, to compare once the model has returned its logits.
        shadow, head = head, None
    if head is not None and _VERIFIED[head]:
        with _head_returns_logprobs(head, layout.select, targets_N, mask, temperature, chunk_size,
                                    with_entropy) as out:
            # What the model returns (not out["logp"]): a DDP wrapper's autograd hooks sit on it.
            logp_BT = _forward(model, layout)
        if out["logp"] is None or logp_BT.shape != completion_ids.shape:
            raise RuntimeError("the model did not call its output layer once on the hidden states; set "
                               "logprob_chunk_size=0 to compute log-probabilities from its logits")
        return logp_BT, out["entropy"]
    if shadow is not None:
        with _head_returns_logprobs(shadow, layout.select, targets_N, mask, temperature, chunk_size, False,
                                    shadow=True) as out:
            logits = _forward(model, layout)
        _record_verdict(model, shadow, out["logp"], layout.select(logits), targets_N, mask, temperature)
    else:
        logits = _forward(model, layout)
    logp_NV = F.log_softmax(layout.select(logits).float() / temperature, dim=-1)
    logp_BT = _scatter(mask, logp_NV.gather(-1, targets_N.unsqueeze(-1)).squeeze(-1))
    entropy_BT = None
    if with_entropy:
        with torch.no_grad():
            entropy_BT = _scatter(mask, -(logp_NV.exp() * logp_NV).sum(-1))
    return logp_BT, entropy_BT


def _scatter(mask: Tensor, values_N: Tensor) -> Tensor:
    """(B, T) with the completion tokens' values in place and 0 at padding."""
    return values_N.new_zeros(mask.shape).masked_scatter(mask, values_N)


# Output layers checked against the model's own logits, at their first use (weak: a freed model is forgotten).
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _record_verdict(model, head: nn.Linear, lean_BT: Tensor | None, logits_NV: Tensor, targets_N: Tensor,
                    mask: Tensor, temperature: float) -> None:
    """Whether the chunked values, computed inside the head's call, match the log-probabilities
    of the logits the model returned from the same hidden states: this catches a model that
    post-processes its logits in a way `lean_head` does not know, or never calls its output
    layer. The tolerance is a rounding step of the logits' own dtype. No verdict without a
    completion token to compare."""
    if not mask.any():
        return
    with torch.no_grad():
        full = torch.log_softmax(logits_NV.float() / temperature, -1).gather(-1, targets_N.unsqueeze(-1)).squeeze(-1)
        if lean_BT is None or lean_BT.shape != mask.shape:
            ok = False
        else:
            eps = torch.finfo(logits_NV.dtype).eps if logits_NV.dtype in (torch.float16, torch.bfloat16) else 1e-4
            scale = 1 + logits_NV.float().abs().amax(-1) / temperature  # (N,)
            ok = bool(((lean_BT[mask] - full).abs() <= 4 * eps * scale).all())
    if not ok:
        warnings.warn(f"{type(model).__name__}: the chunked log-probabilities do not match the model's logits "
                      "(it post-processes them); using full logits for this model", stacklevel=3)
    _VERIFIED[head] = ok


def _forward(model, layout: _Layout) -> Tensor:
    return forward_keeping_logits(model, layout.keep, **layout.kwargs).logits


def lean_head(model) -> nn.Linear | None:
    """The output layer if the chunked path can stand in for it: exactly an nn.Linear (a PEFT
    or quantized layer is not, and keeps the full-logits path) of a model that does not rescale
    or cap its logits afterwards."""
    inner = _inner(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    configs = [config]
    try:  # multimodal models keep the language model's settings in a text config
        configs.append(config.get_text_config(decoder=True))
    except Exception:  # noqa: BLE001 - no single text config: the top-level one is all there is
        pass
    post = [a for c in configs for a in _LOGIT_POSTPROCESSING if getattr(c, a, None) not in (None, 1, 1.0)]
    # A forward already set on the instance is someone's hook (accelerate's offloading, say).
    return head if type(head) is nn.Linear and "forward" not in vars(head) and not post else None


# Config fields of transformers models that rescale, cap or cut the logits after the output layer.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logits_soft_cap", "logit_scale", "logits_scaling",
                         "lm_head_multiplier", "output_multiplier", "output_multiplier_scale", "unpadded_vocab_size")


@contextlib.contextmanager
def _head_returns_logprobs(head: nn.Linear, select: Callable[[Tensor], Tensor], targets_N: Tensor, mask: Tensor,
                           temperature: float, chunk_size: int, with_entropy: bool, *, shadow: bool = False):
    """Within the block, calling `head` (as the model's forward does) computes the completion
    tokens' log-probabilities into the yielded dict instead of returning logits. The forward
    runs inside the head's own call, so wrappers that gather sharded weights around it work.
    With `shadow`, it computes them without gradient and returns the real logits as well."""
    out: dict[str, Tensor | None] = {"logp": None, "entropy": None}

    def forward(hidden: Tensor) -> Tensor:
        if shadow:
            with torch.no_grad():
                compute(hidden.detach())
            return nn.Linear.forward(head, hidden)
        return compute(hidden)

    def compute(hidden: Tensor) -> Tensor:
        flat = token_logprobs(select(hidden), head.weight, targets_N, chunk_size=chunk_size,
                              return_entropy=with_entropy, bias=head.bias, temperature=temperature)
        logp, entropy = flat if with_entropy else (flat, None)
        out["logp"] = logp_BT = _scatter(mask, logp)
        if entropy is not None:
            out["entropy"] = _scatter(mask, entropy.detach())
        return logp_BT

    head.forward = forward
    try:
        yield out
    finally:
        del head.forward
