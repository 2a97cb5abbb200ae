"""How per-token losses become one scalar. Applied once, after any objective.

Every mode weighs the tokens of one sequence equally, so GSPO-token keeps the gradient of the
sequence form under each of them. An empty sequence (no unmasked token) contributes 0 and
still counts in the number of sequences B, as the paper's 1/G does.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .registry import unknown_name_message

Aggregation = Callable[[Tensor, Tensor, "int | None"], Tensor]

_AGGREGATIONS: dict[str, Aggregation] = {}
_NEEDS_MAX_TOKENS: set[str] = set()


def _register(name: str, *, needs_max_tokens: bool = False) -> Callable[[Aggregation], Aggregation]:
    def decorator(fn: Aggregation) -> Aggregation:
        _AGGREGATIONS[name] = fn
        if needs_max_tokens:
            _NEEDS_MAX_TOKENS.add(name)
        return fn

    return decorator


def _num_sequences(loss_BT: Tensor) -> int:
    return max(loss_BT.shape[0], 1)


@_register("seq-mean-token-mean")
def seq_mean_token_mean(loss_BT: Tensor, mask_BT: Tensor, max_tokens: int | None) -> Tensor:
    """1/B sum_i 1/|y_i| sum_t loss: the paper's J (spec "The unified objective")."""
    per_seq_B = (loss_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1)
    return per_seq_B.sum() / _num_sequences(loss_BT)


@_register("token-mean")
def token_mean(loss_BT: Tensor, mask_BT: Tensor, max_tokens: int | None) -> Tensor:
    """sum loss / number of unmasked tokens in the batch (DAPO): long answers weigh more."""
    return (loss_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1)


@_register("seq-mean-token-sum")
def seq_mean_token_sum(loss_BT: Tensor, mask_BT: Tensor, max_tokens: int | None) -> Tensor:
    """1/B sum_i sum_t loss."""
    return (loss_BT * mask_BT).sum() / _num_sequences(loss_BT)


@_register("seq-mean-token-sum-norm", needs_max_tokens=True)
def seq_mean_token_sum_norm(loss_BT: Tensor, mask_BT: Tensor, max_tokens: int | None) -> Tensor:
    """1/B sum_i sum_t loss / max_tokens (Dr. GRPO, as TRL's "dr_grpo": a constant divisor,
    so no length bias). verl's mode of that name omits the 1/B."""
    assert max_tokens is not None  # checked by aggregate()
    return (loss_BT * mask_BT).sum() / (_num_sequences(loss_BT) * max_tokens)


def available_aggregations() -> list[str]:
    """Names accepted as ``aggregation``."""
    return sorted(_AGGREGATIONS)


def get_aggregation(name: str) -> Aggregation:
    try:
        return _AGGREGATIONS[name]
    except KeyError:
        raise ValueError(unknown_name_message("aggregation", name, _AGGREGATIONS)) from None


def check_aggregation(aggregation: str, max_tokens: int | None) -> Aggregation:
    """The named mode, or a ValueError naming the field and the fix."""
    fn = get_aggregation(aggregation)
    if aggregation in _NEEDS_MAX_TOKENS and (max_tokens is None or max_tokens <= 0):
        raise ValueError(
            f"aggregation={aggregation!r} divides by a fixed length: pass max_tokens "
            f"(e.g. max_completion_length) as a positive integer, got max_tokens={max_tokens!r}"
        )
    return fn


def aggregate(loss_BT: Tensor, mask_BT: Tensor, aggregation: str, *, max_tokens: int | None = None) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar with the named mode."""
    return check_aggregation(aggregation, max_tokens)(loss_BT, mask_BT, max_tokens)
