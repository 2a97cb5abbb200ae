"""How per-token losses become one scalar. Applied once, after any objective.

Each mode is a numerator (a sum over the batch) divided by a denominator counted in sequences
or in tokens. Splitting them lets gradient accumulation divide every micro-batch by the
denominator of the whole minibatch, so the update does not depend on the micro-batch size.

Every mode weighs the tokens of one sequence equally, so GSPO-token keeps the gradient of the
sequence form under each of them. An empty sequence (no unmasked token) contributes 0 and
still counts in the number of sequences B, as the paper's 1/G does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .._registry import unknown_name_message

Numerator = Callable[[Tensor, Tensor, "int | None"], Tensor]


@dataclass(frozen=True)
class Aggregation:
    numerator: Numerator
    unit: str  # "sequences" or "tokens": what the denominator counts
    needs_max_tokens: bool = False


def _seq_mean_token_mean(loss_BT: Tensor, mask_BT: Tensor, max_tokens: int | None) -> Tensor:
    return ((loss_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)).sum()


def _token_sum(loss_BT: Tensor, mask_BT: Tensor, max_tokens: int | None) -> Tensor:
    return (loss_BT * mask_BT).sum()


def _token_sum_norm(loss_BT: Tensor, mask_BT: Tensor, max_tokens: int | None) -> Tensor:
    assert max_tokens is not None  # checked by check_aggregation()
    return (loss_BT * mask_BT).sum() / max_tokens


_AGGREGATIONS: dict[str, Aggregation] = {
    # 1/B sum_i 1/|y_i| sum_t loss: the paper's J (docs/algorithms.md, "Aggregations").
    "seq-mean-token-mean": Aggregation(_seq_mean_token_mean, "sequences"),
    # sum loss / number of unmasked tokens (DAPO): long answers weigh more.
    "token-mean": Aggregation(_token_sum, "tokens"),
    # 1/B sum_i sum_t loss.
    "seq-mean-token-sum": Aggregation(_token_sum, "sequences"),
    # 1/B sum_i sum_t loss / max_tokens (Dr. GRPO, TRL's "dr_grpo"): a constant divisor, so no
    # length bias. verl's mode of that name omits the 1/B.
    "seq-mean-token-sum-norm": Aggregation(_token_sum_norm, "sequences", needs_max_tokens=True),
}


def available_aggregations() -> list[str]:
    """Names accepted as ``aggregation``."""
    return sorted(_AGGREGATIONS)


def check_aggregation(aggregation: str, max_tokens: int | None) -> Aggregation:
    """The named mode, or a ValueError naming the field and the fix."""
    try:
        mode = _AGGREGATIONS[aggregation]
    except KeyError:
        raise ValueError(unknown_name_message("aggregation", aggregation, _AGGREGATIONS)) from None
    if mode.needs_max_tokens and (max_tokens is None or max_tokens <= 0):
        raise ValueError(
            f"aggregation={aggregation!r} divides by a fixed length: pass max_tokens "
            f"(e.g. max_completion_length) as a positive integer, got max_tokens={max_tokens!r}"
        )
    return mode


def aggregation_denominator(aggregation: str, mask_BT: Tensor) -> Tensor:
    """What the named mode divides by for this batch: its number of sequences or of unmasked
    tokens (at least 1). Sum it over micro-batches (and processes) to get a minibatch's."""
    mode = check_aggregation(aggregation, max_tokens=1)
    if mode.unit == "tokens":
        return (mask_BT != 0).sum().clamp(min=1).to(torch.float32)
    return torch.tensor(float(max(mask_BT.shape[0], 1)), device=mask_BT.device)


def aggregate(
    loss_BT: Tensor,
    mask_BT: Tensor,
    aggregation: str,
    *,
    max_tokens: int | None = None,
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar with the named mode. `denominator` replaces
    this batch's own (see `aggregation_denominator`) when the batch is part of a larger one."""
    mode = check_aggregation(aggregation, max_tokens)
    if denominator is None:
        denominator = aggregation_denominator(aggregation, mask_BT)
    return mode.numerator(loss_BT, mask_BT, max_tokens) / denominator
