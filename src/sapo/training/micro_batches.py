"""Micro-batches: the samples of a minibatch (or of a whole rollout) split into the forward (and
backward) passes that fit in memory, either `micro_batch_size` sequences each or packed by token
count (`max_tokens_per_micro_batch`, verl's dynamic batch size). Every process makes the same
number of passes: a sharded model gathers its parameters in each of them, and DDP syncs its
buffers in each training forward."""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.logprobs import ForwardSettings
from ..model.sharding import max_over_processes


def sample_tokens(prompt_mask_BP: Tensor, completion_mask_BT: Tensor) -> list[int]:
    """Prompt plus completion tokens of each sample."""
    return (prompt_mask_BP.sum(-1) + completion_mask_BT.sum(-1)).tolist()


def split(indices: list[int], tokens: list[int], forward: ForwardSettings, device: torch.device) -> list[list[int]]:
    """`indices` (into `tokens`) in micro-batches, as many on every process."""
    if forward.max_tokens_per_micro_batch:
        parts = pack_by_tokens(indices, tokens, forward.max_tokens_per_micro_batch)
    else:
        parts = [indices[i:i + forward.micro_batch_size] for i in range(0, len(indices), forward.micro_batch_size)]
    return split_to(parts, tokens, max_over_processes(len(parts), device))


def pack_by_tokens(indices: list[int], tokens: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: the longest samples first, each into the first micro-batch with room
    for it; a sample longer than the budget gets a micro-batch of its own. Samples keep their
    order within a micro-batch."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: -tokens[i]):
        slot = next((b for b, free in enumerate(room) if free >= tokens[i]), None)
        if slot is None:
            bins.append([i])
            room.append(budget - tokens[i])
        else:
            bins[slot].append(i)
            room[slot] -= tokens[i]
    order = {i: n for n, i in enumerate(indices)}
    return sorted((sorted(b, key=order.__getitem__) for b in bins), key=lambda b: order[b[0]])


def split_to(parts: list[list[int]], tokens: list[int], count: int) -> list[list[int]]:
    """`parts` split further until there are `count` of them: the one with the most tokens (of
    those holding two samples or more) is halved each time."""
    parts = [list(p) for p in parts]
    while len(parts) < count:
        splittable = [n for n, p in enumerate(parts) if len(p) > 1]
        if not splittable:
            raise ValueError(f"cannot make {count} micro-batches of {sum(map(len, parts))} samples")
        n = max(splittable, key=lambda n: sum(tokens[i] for i in parts[n]))
        half = len(parts[n]) // 2
        parts[n:n + 1] = [parts[n][:half], parts[n][half:]]
    return parts
