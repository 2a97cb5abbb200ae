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
    """Advantages of B = Q * G responses (Q prompts, G = group_size), ordered group by group.

    Args:
        rewards: (B,) rewards; NaN (or None in a list) marks a reward that does not apply: it is
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
        raise ValueError(f"rewards must be one-dimensional (B,), got shape {tuple(r.shape)}")
    if r.numel() % group_size:
        raise ValueError(
            f"{r.numel()} rewards do not split into groups of group_size={group_size}: "
            "pass num_prompts * group_size rewards, ordered group by group"
        )
    if torch.isinf(r).any():
        bad = torch.nonzero(torch.isinf(r)).flatten().tolist()[:5]
        raise ValueError(f"rewards must be finite (or NaN for 'does not apply'); infinite at positions {bad}")

    r_QG = r.view(-1, group_size)
    valid_QG = ~torch.isnan(r_QG)
    count_Q = valid_QG.sum(-1, keepdim=True)
    filled_QG = torch.where(valid_QG, r_QG, 0.0)
    mean_Q = filled_QG.sum(-1, keepdim=True) / count_Q.clamp(min=1)
    centered_QG = torch.where(valid_QG, r_QG - mean_Q, 0.0)

    if scale == "group":
        std = (centered_QG.square().sum(-1, keepdim=True) / (count_Q - 1).clamp(min=1)).sqrt()
    elif scale == "batch":
        valid = r[~torch.isnan(r)]
        std = valid.std() if valid.numel() > 1 else r.new_zeros(())
    else:
        std, eps = r.new_ones(()), 0.0
    adv_QG = centered_QG / (std + eps)

    # r - mean is not exactly 0 in floating point for a constant group (e.g. three 0.1s);
    # such a group carries no signal, so say so exactly.
    high = torch.where(valid_QG, r_QG, -math.inf).amax(-1, keepdim=True)
    low = torch.where(valid_QG, r_QG, math.inf).amin(-1, keepdim=True)
    constant_Q = (count_Q == 0) | (high == low)
    adv_QG = torch.where(constant_Q, 0.0, adv_QG)

    out_dtype = torch.float64 if isinstance(rewards, Tensor) and rewards.dtype == torch.float64 else torch.float32
    return adv_QG.reshape(-1).to(out_dtype)
