"""Per-token log-probabilities (and entropy) of completions under a causal LM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def completion_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                        completion_mask: Tensor, temperature: float, *, with_entropy: bool = False
                        ) -> tuple[Tensor, Tensor | None]:
    """log pi(completion token | prefix) at the sampling temperature, (B, C) float32.

    Prompts are left-padded, completions right-padded; positions come from the attention mask
    so padding does not shift them. Only the completion positions go through the output layer
    (`logits_to_keep`). The entropy (B, C), if asked, is computed without gradient.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    C = completion_ids.shape[1]
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=C + 1).logits
    except TypeError:  # a model class that predates logits_to_keep
        logits = model(**kwargs).logits
    # The logit at position p predicts token p + 1.
    logits_BCV = logits[:, -(C + 1):-1].float() / temperature
    logp_BCV = F.log_softmax(logits_BCV, dim=-1)
    logp_BC = logp_BCV.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy_BC = None
    if with_entropy:
        with torch.no_grad():
            entropy_BC = -(logp_BCV.exp() * logp_BCV).sum(-1)
    return logp_BC, entropy_BC
