"""Micro-batches: the samples of a minibatch (or of a whole rollout) split into the forward (and
backward) passes that fit in memory, either `micro_batch_size` sequences each or packed by the
positions a pass computes (`max_tokens_per_micro_batch`, verl's dynamic batch size). Every process makes the same
number of passes: a sharded model gathers its parameters in each of them, and DDP syncs its
buffers in each training forward."""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.logprobs import ForwardSettings
from ..model.sharding import max_over_processes


def sample_lengths(prompt_mask_BP: Tensor, completion_mask_BT: Tensor) -> list[tuple[int, int]]:
    """(prompt tokens, completion tokens) of each sample."""
    return list(zip(prompt_mask_BP.sum(-1).tolist(), completion_mask_BT.sum(-1).tolist()))


def cost(part: list[int], lengths: list[tuple[int, int]]) -> int:
    """Positions a forward pass over `part`'s samples computes in the padded layout, trimmed to
    them (`Rollout.trimmed`): rows x (longest prompt + longest completion). Padding-free rows
    compute no more."""
    if not part:
        return 0
    return len(part) * (max(lengths[i][0] for i in part) + max(lengths[i][1] for i in part))


def split(indices: list[int], lengths: list[tuple[int, int]], forward: ForwardSettings,
          device: torch.device) -> list[list[int]]:
    """`indices` (into `lengths`) in micro-batches, as many on every process."""
    if forward.max_tokens_per_micro_batch:
        parts = pack_by_tokens(indices, lengths, forward.max_tokens_per_micro_batch)
    else:
        parts = [indices[i:i + forward.micro_batch_size] for i in range(0, len(indices), forward.micro_batch_size)]
    return split_to(parts, lengths, max_over_processes(len(parts), device))


def pack_by_tokens(indices: list[int], lengths: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """First-fit decreasing: the longest samples first, each into the first micro-batch whose
    `cost` stays within the budget with it; a sample longer than the budget gets a micro-batch
    of its own. Samples keep their order within a micro-batch."""
    bins: list[list[int]] = []
    for i in sorted(indices, key=lambda i: -sum(lengths[i])):
        slot = next((b for b in bins if cost(b + [i], lengths) <= budget), None)
        if slot is None:
            bins.append([i])
        else:
            slot.append(i)
    order = {i: n for n, i in enumerate(indices)}
    return sorted((sorted(b, key=order.__getitem__) for b in bins), key=lambda b: order[b[0]])


def split_to(parts: list[list[int]], lengths: list[tuple[int, int]], count: int) -> list[list[int]]:
    """`parts` split further until there are `count` of them: the costliest (of those holding two
    samples or more) is halved each time."""
    parts = [list(p) for p in parts]
    while len(parts) < count:
        splittable = [n for n, p in enumerate(parts) if len(p) > 1]
        if not splittable:
            raise ValueError(f"cannot make {count} micro-batches of {sum(map(len, parts))} samples")
        n = max(splittable, key=lambda n: cost(parts[n], lengths))
        half = len(parts[n]) // 2
        parts[n:n + 1] = [parts[n][:half], parts[n][half:]]
    return parts
