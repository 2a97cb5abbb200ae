"""Group-relative advantages (docs/algorithms.md, "Group advantages"): A_i = (R_i - mean_group R) / (std R + eps)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

SCALES = ("group", "batch", "none")


def _rewards_tensor(rewards: Tensor | Sequence[float | None]) -> Tensor:
    if isinstance(rewards, Tensor):
        return rewards.detach().to(torch.float64)
    # None is "this reward does not apply" (TRL's convention), carried as NaN.
    return torch.tensor([math.nan if r is None else float(r) for r in rewards], dtype=torch.float64)


def group_advantages(
    rewards: Tensor | Sequence[float | None],
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Advantages of N = num_groups * group_size responses, ordered group by group.

    Args:
        rewards: (N,) rewards; NaN (or None in a list) marks a reward that does not apply: it is
            left out of the statistics and its response gets advantage 0.
        group_size: G, the number of responses sampled per prompt.
        scale: "group" divides by the group's std (GRPO), "batch" by the std over the whole
            batch (more robust to low-variance groups), "none" does not divide (Dr. GRPO).
        eps: added to the std so a nearly constant group cannot blow up.

    A group whose (valid) rewards are all equal gets exactly 0, never NaN. The std is the
    unbiased one, as in TRL and verl. Statistics are in float64; the result is float32, or
    float64 for float64 input.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not known; choose one of {list(SCALES)} (scale_rewards)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer (num_generations), got {group_size!r}")
    if not (isinstance(eps, (int, float)) and 0 <= eps < math.inf):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    r = _rewards_tensor(rewards)
    if r.dim() != 1:
        raise ValueError(f"rewards must be one-dimensional (N,), got shape {tuple(r.shape)}")
    if r.numel() % group_size:
        raise ValueError(
            f"{r.numel()} rewards do not split into groups of group_size={group_size}: "
            "pass num_prompts * group_size rewards, ordered group by group"
        )
    if torch.isinf(r).any():
        bad = torch.nonzero(torch.isinf(r)).flatten().tolist()[:5]
        raise ValueError(f"rewards must be finite (or NaN for 'does not apply'); infinite at positions {bad}")

    r_NG = r.view(-1, group_size)
    valid_NG = ~torch.isnan(r_NG)
    count_N = valid_NG.sum(-1, keepdim=True)
    filled_NG = torch.where(valid_NG, r_NG, 0.0)
    mean_N = filled_NG.sum(-1, keepdim=True) / count_N.clamp(min=1)
    centered_NG = torch.where(valid_NG, r_NG - mean_N, 0.0)

    if scale == "group":
        std = (centered_NG.square().sum(-1, keepdim=True) / (count_N - 1).clamp(min=1)).sqrt()
    elif scale == "batch":
        valid = r[~torch.isnan(r)]
        std = valid.std() if valid.numel() > 1 else r.new_zeros(())
    else:
        std, eps = r.new_ones(()), 0.0
    adv_NG = centered_NG / (std + eps)

    # r - mean is not exactly 0 in floating point for a constant group (e.g. three 0.1s);
    # such a group carries no signal, so say so exactly.
    high = torch.where(valid_NG, r_NG, -math.inf).amax(-1, keepdim=True)
    low = torch.where(valid_NG, r_NG, math.inf).amin(-1, keepdim=True)
    constant_N = (count_N == 0) | (high == low)
    adv_NG = torch.where(constant_N, 0.0, adv_NG)

    out_dtype = torch.float64 if isinstance(rewards, Tensor) and rewards.dtype == torch.float64 else torch.float32
    return adv_NG.reshape(-1).to(out_dtype)
