"""Log-probabilities of given tokens from final hidden states, without the (tokens x vocab) logits.

A 150k-token vocabulary makes the logits of 8k completion tokens 4.9 GB in float32, and
`log_softmax` plus its backward hold two or three such tensors. Here the output layer runs over
vocabulary chunks: the forward keeps a running log-sum-exp per token (and the running terms of
the entropy), the backward recomputes each chunk's logits and turns them straight into the
gradients of the hidden states and of the weight. Nothing of shape (N, V) is ever allocated;
the largest temporary is a (rows, chunk) tile.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 8192
# Rows per tile: a tile holds at most this many logits (64 MiB in float32).
TILE_ELEMENTS = 1 << 24


def token_logprobs(hidden_states: Tensor, weight: Tensor, token_ids: Tensor, *, chunk_size: int | None = None,
                   return_entropy: bool = False, bias: Tensor | None = None, temperature: float = 1.0
                   ) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax((h W^T + b) / temperature)[token] for each row of `hidden_states`.

    hidden_states (N, H), weight (V, H) (the output layer's, tied or not), optional bias (V,),
    token_ids (N,) int. Returns float32 log-probabilities (N,) (float64 for float64 inputs), and
    with `return_entropy` also the entropy (N,) of each row's distribution; both differentiable
    with respect to hidden_states, weight and bias. `chunk_size` is the number of vocabulary
    entries per chunk (default 8192; any size, it need not divide V). The matmuls run in the
    input dtype, as the model's own output layer would (their accumulation is float32 on every
    backend); the softmax, the sums over chunks and the gradients' accumulation are float32.
    """
    if hidden_states.dim() != 2 or weight.dim() != 2 or hidden_states.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden_states must be (N, H) and weight (V, H); got "
                         f"{tuple(hidden_states.shape)} and {tuple(weight.shape)}")
    if token_ids.shape != hidden_states.shape[:1]:
        raise ValueError(f"token_logprobs: token_ids must be (N,) = {tuple(hidden_states.shape[:1])}; "
                         f"got {tuple(token_ids.shape)}")
    chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"token_logprobs: chunk_size must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    # The matmuls run in the dtype the output layer would use here: autocast's, if it is on
    # (it leaves float64 alone); both passes then agree, the backward running outside autocast.
    device = hidden_states.device.type
    mm_dtype = torch.promote_types(hidden_states.dtype, weight.dtype)
    if mm_dtype != torch.float64 and torch.is_autocast_enabled(device):
        mm_dtype = torch.get_autocast_dtype(device)
    logp, entropy = _ChunkedLogprobs.apply(hidden_states, weight, bias, token_ids.long(), float(temperature),
                                          min(chunk, weight.shape[0]), bool(return_entropy), mm_dtype)
    return (logp, entropy) if return_entropy else logp


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tiles(N: int, V: int, chunk: int):
    """(vocabulary slice, row slice) pairs: vocabulary outer, so each weight chunk is read once."""
    rows = max(1, TILE_ELEMENTS // chunk)
    for v0 in range(0, V, chunk):
        yield slice(v0, min(v0 + chunk, V)), [slice(r0, min(r0 + rows, N)) for r0 in range(0, N, rows)]


def _logits(h: Tensor, w: Tensor, b: Tensor | None, inv_t: float, dtype: torch.dtype) -> Tensor:
    """(rows, chunk) logits / T in `dtype`; h and w already in the matmul dtype."""
    z = (h @ w.T).to(dtype)
    if b is not None:
        z += b.to(dtype)
    return z.mul_(inv_t)


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, chunk, with_entropy, mm_dtype):
        # Autocast is off inside both passes; mm_dtype carries what it would have done.
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedLogprobs._forward(ctx, hidden, weight, bias, ids, temperature, chunk, with_entropy, mm_dtype)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, ids, temperature, chunk, with_entropy, mm_dtype):
        N, V = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(hidden, weight)
        inv_t = 1.0 / temperature
        h_mm = hidden.to(mm_dtype)
        # Running per-row state of an online log-sum-exp: max m, s = sum exp(z - m), and for the
        # entropy u = sum exp(z - m) (z - m), kept relative to m for accuracy.
        m = torch.full((N,), -torch.inf, dtype=dtype, device=hidden.device)
        s = torch.zeros(N, dtype=dtype, device=hidden.device)
        u = torch.zeros(N, dtype=dtype, device=hidden.device) if with_entropy else None
        target = torch.zeros(N, dtype=dtype, device=hidden.device)
        for vs, row_slices in _tiles(N, V, chunk):
            w = weight[vs].to(mm_dtype)
            b = None if bias is None else bias[vs]
            local = ids - vs.start
            inside = (local >= 0) & (local < vs.stop - vs.start)
            for rs in row_slices:
                z = _logits(h_mm[rs], w, b, inv_t, dtype)  # (rows, chunk)
                picked = z.gather(1, local[rs].clamp(0, z.shape[1] - 1).unsqueeze(1)).squeeze(1)
                target[rs] = torch.where(inside[rs], picked, target[rs])
                m_new = torch.maximum(m[rs], z.amax(1))
                rescale = torch.exp(m[rs] - m_new)
                z.sub_(m_new.unsqueeze(1))  # z - m_new <= 0
                e = z.exp()
                if with_entropy:
                    shift = torch.where(s[rs] > 0, (m[rs] - m_new) * s[rs], 0.0)  # not -inf * 0 at the start
                    u[rs] = rescale * (u[rs] + shift) + (e * z).sum(1)
                s[rs] = s[rs] * rescale + e.sum(1)
                m[rs] = m_new
        # Keep the max and log s apart: m + log s rounded at the logits' magnitude would cost
        # every probability that rounding error (2e-4 relative for logits in the thousands).
        log_s = s.log()
        logp = (target - m) - log_s
        entropy = log_s - u / s if with_entropy else torch.zeros(0, dtype=dtype, device=hidden.device)
        ctx.save_for_backward(hidden, weight, bias, ids, m, log_s, entropy)
        ctx.inv_t, ctx.chunk, ctx.with_entropy, ctx.mm_dtype = inv_t, chunk, with_entropy, mm_dtype
        ctx.set_materialize_grads(False)  # an unused (detached) entropy costs no backward work
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return _ChunkedLogprobs._backward(ctx, g_logp, g_entropy)

    @staticmethod
    def _backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, ids, m, log_s, entropy = ctx.saved_tensors
        N, V = hidden.shape[0], weight.shape[0]
        dtype, inv_t, mm_dtype = m.dtype, ctx.inv_t, ctx.mm_dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_h = g_entropy.to(dtype) if ctx.with_entropy and g_entropy is not None else None
        if g_logp is None and g_h is None:
            return None, None, None, None, None, None, None, None
        g_lp = torch.zeros(N, dtype=dtype, device=hidden.device) if g_logp is None else g_logp.to(dtype)
        h_mm = hidden.to(mm_dtype)
        grad_h = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty_like(bias) if need_b else None
        for vs, row_slices in _tiles(N, V, ctx.chunk):
            w = weight[vs].to(mm_dtype)
            b = None if bias is None else bias[vs]
            local = ids - vs.start
            inside = (local >= 0) & (local < vs.stop - vs.start)
            grad_w_chunk = torch.zeros(w.shape, dtype=dtype, device=w.device) if need_w else None
            grad_b_chunk = torch.zeros(w.shape[0], dtype=dtype, device=w.device) if need_b else None
            for rs in row_slices:
                logp = _logits(h_mm[rs], w, b, inv_t, dtype).sub_(m[rs].unsqueeze(1)).sub_(log_s[rs].unsqueeze(1))
                p = logp.exp()
                # d logp_y / dz_j = 1[j = y] - p_j;  d H / dz_j = -p_j (log p_j + H).
                g = logp  # reuse the tile for dL/dz
                if g_h is not None:
                    g.add_(entropy[rs].unsqueeze(1)).mul_(g_h[rs].unsqueeze(1)).add_(g_lp[rs].unsqueeze(1))
                else:
                    g.copy_(g_lp[rs].unsqueeze(1).expand_as(g))
                g.mul_(p).neg_()
                del p
                g.scatter_add_(1, local[rs].clamp(0, g.shape[1] - 1).unsqueeze(1),
                               torch.where(inside[rs], g_lp[rs], 0.0).unsqueeze(1))
                g.mul_(inv_t)  # z = (hW^T + b) / T
                g_in = g.to(mm_dtype)
                if need_h:
                    grad_h[rs] += (g_in @ w).to(dtype)
                if need_w:
                    grad_w_chunk += (g_in.T @ h_mm[rs]).to(dtype)
                if need_b:
                    grad_b_chunk += g.sum(0)
            if need_w:
                grad_w[vs] = grad_w_chunk
            if need_b:
                grad_b[vs] = grad_b_chunk
        return (None if grad_h is None else grad_h.to(hidden.dtype)), grad_w, grad_b, None, None, None, None, None
