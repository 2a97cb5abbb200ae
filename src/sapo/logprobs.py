"""Per-token log-probabilities (and entropy) of completions under a causal LM."""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .chunked_logprobs import token_logprobs
from .models import forward_keeping_logits


def completion_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, temperature: float, *, with_entropy: bool = False,
                        chunk_size: int = 0) -> tuple[Tensor, Tensor | None]:
    """log pi(completion token | prefix) at the sampling temperature, (B, C) float32.

    Prompts are left-padded, completions right-padded; positions come from the attention mask
    so padding does not shift them. Only the completion positions go through the output layer.
    With 0 < `chunk_size` < V and a plain linear output layer, that layer runs as
    `token_logprobs` over vocabulary chunks of that size: no (B, C, V) logits. The forward
    still goes through `model` itself (a DDP/FSDP wrapper's hooks fire). The entropy (B, C), if
    asked, carries no gradient. Padding positions hold 0.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    C = completion_ids.shape[1]
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    head = lean_head(model) if chunk_size else None
    if head is not None and head.weight.shape[0] <= chunk_size:  # one chunk: the full logits are no larger
        head = None
    shadow = None
    if head is not None and _VERIFIED.get(head) is None:
        # Not yet checked: this call takes the full-logits path and, from the same hidden states,
        # also computes the chunked values, to compare once the model has returned its logits.
        shadow, head = head, None
    if head is not None and _VERIFIED[head]:
        with _head_returns_logprobs(head, completion_ids, completion_mask, temperature, chunk_size, with_entropy) as out:
            # What the model returns (not out["logp"]): a DDP wrapper's autograd hooks sit on it.
            logp_BC = _forward(model, kwargs, C + 1)
        if out["logp"] is None or logp_BC.shape != completion_ids.shape:
            raise RuntimeError("the model did not call its output layer once on the hidden states; set "
                               "logprob_chunk_size=0 to compute log-probabilities from its logits")
        return logp_BC, out["entropy"]
    if shadow is not None:
        with _head_returns_logprobs(shadow, completion_ids, completion_mask, temperature, chunk_size, False,
                                    shadow=True) as out:
            logits = _forward(model, kwargs, C + 1)
        _record_verdict(model, shadow, out["logp"], logits, completion_ids, completion_mask, temperature)
    else:
        logits = _forward(model, kwargs, C + 1)
    # The logit at position p predicts token p + 1.
    logits_BCV = logits[:, -(C + 1):-1].float() / temperature
    logp_BCV = F.log_softmax(logits_BCV, dim=-1)
    logp_BC = logp_BCV.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy_BC = None
    if with_entropy:
        with torch.no_grad():
            entropy_BC = -(logp_BCV.exp() * logp_BCV).sum(-1)
    mask = completion_mask.bool()
    return torch.where(mask, logp_BC, 0.0), None if entropy_BC is None else torch.where(mask, entropy_BC, 0.0)


# Output layers checked against the model's own logits, at their first use (weak: a freed model is forgotten).
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _record_verdict(model, head: nn.Linear, lean_BC: Tensor | None, logits: Tensor, completion_ids: Tensor,
                    completion_mask: Tensor, temperature: float) -> None:
    """Whether the chunked values, computed inside the head's call, match the log-probabilities
    of the logits the model returned from the same hidden states: this catches a model that
    post-processes its logits in a way `lean_head` does not know, or never calls its output
    layer. The tolerance is a rounding step of the logits' own dtype. No verdict without a
    completion token to compare."""
    mask = completion_mask.bool()
    if not mask.any():
        return
    C = completion_ids.shape[1]
    with torch.no_grad():
        logits_BCV = logits[:, -(C + 1):-1]
        full = torch.log_softmax(logits_BCV.float() / temperature, -1).gather(
            -1, completion_ids.unsqueeze(-1)).squeeze(-1)
        if lean_BC is None or lean_BC.shape != full.shape:
            ok = False
        else:
            eps = torch.finfo(logits_BCV.dtype).eps if logits_BCV.dtype in (torch.float16, torch.bfloat16) else 1e-4
            scale = 1 + logits_BCV.float().abs().amax(-1) / temperature  # (B, C)
            ok = bool(((lean_BC - full).abs() <= 4 * eps * scale)[mask].all())
    if not ok:
        warnings.warn(f"{type(model).__name__}: the chunked log-probabilities do not match the model's logits "
                      "(it post-processes them); using full logits for this model", stacklevel=3)
    _VERIFIED[head] = ok


def _forward(model, kwargs: dict, keep: int) -> Tensor:
    return forward_keeping_logits(model, keep, **kwargs).logits


def lean_head(model) -> nn.Linear | None:
    """The output layer if the chunked path can stand in for it: exactly an nn.Linear (a PEFT
    or quantized layer is not, and keeps the full-logits path) of a model that does not rescale
    or cap its logits afterwards."""
    inner = model.module if hasattr(model, "module") else model  # DDP
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
def _head_returns_logprobs(head: nn.Linear, completion_ids: Tensor, completion_mask: Tensor, temperature: float,
                           chunk_size: int, with_entropy: bool, *, shadow: bool = False):
    """Within the block, calling `head` (as the model's forward does) computes the completion
    tokens' log-probabilities into the yielded dict instead of returning logits. The forward
    runs inside the head's own call, so wrappers that gather sharded weights around it work.
    With `shadow`, it computes them without gradient and returns the real logits as well."""
    out: dict[str, Tensor | None] = {"logp": None, "entropy": None}
    C = completion_ids.shape[1]
    mask = completion_mask.bool()

    def forward(hidden: Tensor) -> Tensor:
        if shadow:
            with torch.no_grad():
                compute(hidden.detach())
            return nn.Linear.forward(head, hidden)
        return compute(hidden)

    def compute(hidden: Tensor) -> Tensor:
        hidden_BCH = hidden[:, -(C + 1):-1]  # position p predicts token p + 1
        flat = token_logprobs(hidden_BCH[mask], head.weight, completion_ids[mask], chunk_size=chunk_size,
                              return_entropy=with_entropy, bias=head.bias, temperature=temperature)
        logp, entropy = flat if with_entropy else (flat, None)
        out["logp"] = logp_BC = hidden.new_zeros(mask.shape, dtype=logp.dtype).masked_scatter(mask, logp)
        if entropy is not None:
            out["entropy"] = torch.zeros_like(logp_BC).masked_scatter(mask, entropy.detach())
        return logp_BC

    head.forward = forward
    try:
        yield out
    finally:
        del head.forward
