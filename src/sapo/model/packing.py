"""Padding-free rows for the forward passes that score completions (TRL's `padding_free`,
verl's `use_remove_padding`).

The usual layout gives every sample a row of P + T columns: its left-padded prompt, then its
right-padded completion. Here a row holds one prompt once, then the completions of the samples
that share it, back to back, and no padding between them; a block attention mask lets each
completion token see its prompt and the earlier tokens of its own completion only, and position
ids restart each completion where its prompt ends. Every token then has the same context and
position as in the usual layout, so the log-probabilities are the same up to rounding, but the
prompt is computed once per row and padding is not computed at all.

A row holds at most one or two usual rows' worth of columns (P + T or 2 (P + T)); a prompt
whose samples do not fit gets another row. Fewer cells are not always less time: attention grows
with the square of a row's length, and a block mask takes a slower attention path than a plain
causal one, so rows twice as long can cost more than the prompt tokens they save (long
completions after short prompts). `layout_cost` weighs the two, and the layout is used only
where it costs less than the usual one (and has fewer cells).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

PROMPT, PADDING = -1, -2  # segment ids; a completion's segment is its sample's index


@dataclass
class PackedRows:
    input_ids: Tensor  # (R, L)
    position_ids: Tensor  # (R, L)
    segments: Tensor  # (R, L) PROMPT, PADDING, or the index of the sample whose completion holds the token
    rows_N: Tensor  # (N,) for each completion token (in completion_mask order): row of the position predicting it
    cols_N: Tensor  # (N,) and its column
    shared: bool  # some row holds more than one sample
    row_samples: list[list[int]] | None = None  # the samples of each row, whose prompt it holds

    @property
    def first_needed_column(self) -> int:
        """Columns before this one predict no completion token (the model may drop their logits)."""
        return int(self.cols_N.min()) if self.cols_N.numel() else self.input_ids.shape[1] - 1

    def attention_mask(self, additive_dtype: torch.dtype | None = None) -> Tensor:
        """(R, 1, L, L): True where a query (dim 2) may attend to a key (dim 3); as 0 / -inf-like
        floats of `additive_dtype` for attention implementations that add the mask to the scores.
        No query's row is empty (a NaN in backward): every row starts with a prompt token."""
        seg = self.segments
        L = seg.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
        q, k = seg.unsqueeze(2), seg.unsqueeze(1)  # (R, L, 1), (R, 1, L)
        allowed = causal & (k != PADDING) & ((k == PROMPT) | (k == q))
        allowed = allowed.unsqueeze(1)
        if additive_dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=additive_dtype, device=seg.device).masked_fill(
            ~allowed, torch.finfo(additive_dtype).min)


def pack_rows(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
              completion_mask: Tensor, *, by_cost: bool = True) -> PackedRows | None:
    """The padding-free rows of a batch of left-padded prompts (B, P) and right-padded
    completions (B, T). Samples share a row when their prompts are the same tokens. None where
    the usual layout costs no more (`layout_cost`: no padding to drop, no prompt to share, or
    rows so long that their attention costs more than the tokens they save), and for an empty
    batch, an empty prompt, or a completion mask that is not a prefix (ones, then zeros).
    `by_cost=False`: the same rows wherever they have fewer cells, even if they cost more
    (benchmarks/padding_free.py times them so)."""
    B, P = prompt_ids.shape
    T = completion_ids.shape[1]
    cmask, pmask = completion_mask.bool(), prompt_mask.bool()
    if B == 0 or not pmask.any(1).all() or (T > 1 and (cmask[:, 1:] & ~cmask[:, :-1]).any()):
        return None
    p_len, c_len = pmask.sum(1).tolist(), cmask.sum(1).tolist()
    keys = [tuple(i for i, k in zip(ids, keep) if k) for ids, keep in zip(prompt_ids.tolist(), pmask.tolist())]
    # Of two row budgets (a padded row, or two), those with fewer cells (rows x columns) than
    # padded rows; of those the cheaper, if cheaper than padded rows (whose attention takes sdpa's
    # causal path unless some row holds padding).
    plans = [plan for plan in (_fill_rows(keys, p_len, c_len, budget * (P + T)) for budget in (1, 2))
             if len(plan[0]) * max(plan[1]) < B * (P + T)]
    if not plans:
        return None  # no smaller than the padded layout
    rows, used, start = min(plans, key=lambda plan: layout_cost(len(plan[0]), max(plan[1]), masked=True))
    padded = layout_cost(B, P + T, masked=not (pmask.all() and cmask.all()))
    if by_cost and layout_cost(len(rows), max(used), masked=True) >= padded:
        return None  # no faster than the padded layout
    # Built as lists, then one tensor each: a few hundred Python steps cost less than dozens of
    # small indexing kernels.
    L = max(used)
    completions = completion_ids.tolist()
    input_ids, position_ids, segments = [], [], []
    row_of = [0] * B
    for r, samples in enumerate(rows):
        prompt = keys[samples[0]]
        ids, pos, seg = list(prompt), list(range(len(prompt))), [PROMPT] * len(prompt)
        for b in samples:
            row_of[b] = r
            ids += completions[b][:c_len[b]]
            pos += range(p_len[b], p_len[b] + c_len[b])
            seg += [b] * c_len[b]
        pad = L - len(ids)
        input_ids.append(ids + [0] * pad)  # any id in the vocabulary: padding is never attended
        position_ids.append(pos + [0] * pad)
        segments.append(seg + [PADDING] * pad)
    # Token t of a completion is predicted by the position before it: the prompt's last for t = 0.
    rows_N = [row_of[b] for b in range(B) for _ in range(c_len[b])]
    cols_N = [p_len[b] - 1 if t == 0 else start[b] + t - 1 for b in range(B) for t in range(c_len[b])]
    # (numpy turns nested lists into an array several times faster than torch.tensor does)
    as_tensor = lambda x: torch.from_numpy(np.array(x, dtype=np.int64)).to(prompt_ids.device)  # noqa: E731
    return PackedRows(as_tensor(input_ids).to(prompt_ids.dtype), as_tensor(position_ids), as_tensor(segments),
                      as_tensor(rows_N), as_tensor(cols_N), shared=any(len(samples) > 1 for samples in rows),
                      row_samples=rows)


# The cost model behind the choice, in units of one token through the layers whose cost per
# token does not depend on the layout (embeddings, projections, MLPs): a row of L columns costs L
# for those, plus L^2 / ATTENTION_TOKENS for attention (linear layers cost ~ H^2 a token,
# attention ~ H L: its share grows with the row), times MASKED_ATTENTION where sdpa must apply a
# mask (the block mask, or padded rows holding padding) instead of its plain causal path. The
# output layer runs on the completion tokens only, the same in both layouts. Calibrated by
# benchmarks/padding_free.py on CPU, 25M-parameter Qwen2 (H = 384): the mean of three runs
# (3761 / 1.77, 3719 / 1.57, 2913 / 1.26), rounded. With them a 64-token prompt and its two
# completions share a row at 64 and 128 completion tokens (measured 0.86-0.95x the padded time)
# but not at 256 (0.98-1.14x: even, or a loss) or 512 (1.04-1.14x); completions of spread
# lengths always do (0.65-0.86x: the padding dropped outweighs the longer rows). Wider models
# spend less on attention next to their linear layers (ATTENTION_TOKENS grows about as H): there
# padded rows are picked somewhat more often than need be. Values are the same either way.
ATTENTION_TOKENS = 3500.0
MASKED_ATTENTION = 1.5


def layout_cost(rows: int, length: int, *, masked: bool, attention_tokens: float = ATTENTION_TOKENS,
                masked_attention: float = MASKED_ATTENTION) -> float:
    """The modelled cost of a forward (and backward) pass over `rows` rows of `length` columns."""
    return rows * length * (1 + length / attention_tokens * (masked_attention if masked else 1.0))


def _fill_rows(keys: list[tuple[int, ...]], p_len: list[int], c_len: list[int],
               width: int) -> tuple[list[list[int]], list[int], list[int]]:
    """Samples in order into rows of at most `width` columns (or one sample, if longer): a sample
    joins the open row of its prompt if its completion fits, else opens a new one. Returns each
    row's samples, each row's length, and each sample's first completion column."""
    rows: list[list[int]] = []
    used: list[int] = []
    open_row: dict[tuple[int, ...], int] = {}
    start = [0] * len(keys)
    for b, key in enumerate(keys):
        r = open_row.get(key)
        if r is None or used[r] + c_len[b] > width:
            r = open_row[key] = len(rows)
            rows.append([])
            used.append(p_len[b])
        rows[r].append(b)
        start[b] = used[r]
        used[r] += c_len[b]
    return rows, used, start
