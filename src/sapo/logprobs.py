"""Per-token log-probabilities (and entropy) of completions under a causal LM."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .chunked_logprobs import token_logprobs


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
    if head is not None:
        with _head_returns_logprobs(head, completion_ids, completion_mask, temperature, chunk_size, with_entropy) as out:
            _forward(model, kwargs, C + 1)
        return out["logp"], out["entropy"]
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


def _forward(model, kwargs: dict, keep: int) -> Tensor:
    try:
        return model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # a model class that predates logits_to_keep
        return model(**kwargs).logits


def lean_head(model) -> nn.Linear | None:
    """The output layer if the chunked path can stand in for it: exactly an nn.Linear (a PEFT
    or quantized layer is not, and keeps the full-logits path) of a model that does not rescale
    or cap its logits afterwards."""
    inner = model.module if hasattr(model, "module") else model  # DDP
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    post = [a for a in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
            if getattr(config, a, None) not in (None, 1, 1.0)]
    return head if type(head) is nn.Linear and not post else None


@contextlib.contextmanager
def _head_returns_logprobs(head: nn.Linear, completion_ids: Tensor, completion_mask: Tensor, temperature: float,
                           chunk_size: int, with_entropy: bool):
    """Within the block, calling `head` (as the model's forward does) computes the completion
    tokens' log-probabilities into the yielded dict instead of returning logits. The forward
    runs inside the head's own call, so wrappers that gather sharded weights around it work."""
    out: dict[str, Tensor | None] = {"logp": None, "entropy": None}
    C = completion_ids.shape[1]
    mask = completion_mask.bool()

    def forward(hidden: Tensor) -> Tensor:
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
