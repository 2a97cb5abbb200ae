"""sapo.token_logprobs against a float64 full-logits reference: values and gradients."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sapo import token_logprobs

N, H, V = 29, 12, 96


def reference(hidden, weight, ids, bias=None, temperature=1.0):
    """float64 log_softmax over the full logits, and the entropy."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    logp_NV = torch.log_softmax(z / temperature, dim=-1)
    return logp_NV.gather(1, ids.unsqueeze(1)).squeeze(1), -(logp_NV.exp() * logp_NV).sum(-1)


def inputs(dtype=torch.float32, bias=False, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=gen) * scale).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(V, generator=gen).to(dtype).requires_grad_() if bias else None
    ids = torch.randint(0, V, (N,), generator=gen)
    ids[:4] = torch.tensor([0, V - 1, 31, 32])  # first, last and either side of a chunk boundary
    return hidden, weight, b, ids


def values_and_grads(fn, hidden, weight, bias, ids, w_logp, w_ent):
    """fn's log-probs and entropies, and the gradients of a weighted sum of both (float64)."""
    params = [t for t in (hidden, weight, bias) if t is not None]
    logp, entropy = fn(hidden, weight, ids, bias)
    loss = (logp.double() * w_logp).sum() + (entropy.double() * w_ent).sum()
    grads = torch.autograd.grad(loss, params)
    return [logp.detach().double(), entropy.detach().double()] + [g.double() for g in grads]


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 96, 1000])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_float32_matches_float64_full_logits(chunk_size, bias, temperature):
    hidden, weight, b, ids = inputs(bias=bias)
    w = torch.randn(2, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = values_and_grads(lambda h, W, i, bb: token_logprobs(h, W, i, chunk_size=chunk_size, return_entropy=True,
                                                               bias=bb, temperature=temperature),
                            hidden, weight, b, ids, w[0], w[1])
    ref = values_and_grads(lambda h, W, i, bb: reference(h, W, i, bb, temperature),
                           *(t if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, b)),
                           ids, w[0], w[1])
    assert ours[0].dtype == torch.float64  # (converted above; the function returns float32)
    for name, a, r in zip(["logp", "entropy", "d hidden", "d weight", "d bias"], ours, ref):
        assert rel_err(a, r) < 1e-5, name


def test_returns_float32_for_float32_and_half_inputs_and_float64_for_float64():
    for dtype, want in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                        (torch.float64, torch.float64)]:
        hidden, weight, _, ids = inputs(dtype)
        logp, entropy = token_logprobs(hidden, weight, ids, chunk_size=10, return_entropy=True)
        assert logp.dtype == entropy.dtype == want
        logp.sum().backward()
        assert hidden.grad.dtype == hidden.dtype and weight.grad.dtype == weight.dtype


def test_float64_gradcheck_with_entropy_bias_and_temperature():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = torch.tensor([0, 10, 3, 4, 7])
    assert torch.autograd.gradcheck(lambda h, W, b: token_logprobs(h, W, ids, chunk_size=4, return_entropy=True,
                                                                   bias=b, temperature=0.5), (hidden, weight, bias))


def full_logits(h, W, i, _):
    """The usual path: logits in the input dtype (a bf16 model's lm_head), float32 log_softmax."""
    logp_NV = torch.log_softmax((h @ W.T).float(), dim=-1)
    return logp_NV.gather(1, i.unsqueeze(1)).squeeze(1), -(logp_NV.exp() * logp_NV).sum(-1)


def ours_full_and_reference(hidden, weight, ids, chunk_size):
    """(name, ours, full logits, float64 reference) for logp, entropy and both gradients."""
    w = torch.randn(2, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = values_and_grads(lambda h, W, i, b: token_logprobs(h, W, i, chunk_size=chunk_size, return_entropy=True),
                            hidden, weight, None, ids, w[0], w[1])
    full = values_and_grads(full_logits, hidden, weight, None, ids, w[0], w[1])
    ref = values_and_grads(lambda h, W, i, b: reference(h, W, i), hidden.detach().double().requires_grad_(),
                           weight.detach().double().requires_grad_(), None, ids, w[0], w[1])
    return zip(["logp", "entropy", "d hidden", "d weight"], ours, full, ref)


def test_bfloat16_is_as_accurate_as_the_full_bfloat16_logits():
    hidden, weight, _, ids = inputs(torch.bfloat16)
    for name, a, f, r in ours_full_and_reference(hidden, weight, ids, chunk_size=40):
        assert rel_err(a, r) <= 2 * rel_err(f, r) + 1e-3, name
        assert rel_err(a, f) < 5e-2, name


def test_under_autocast_forward_and_backward_agree_with_the_full_autocast_logits():
    # The trainer's GPU setting: float32 weights, bfloat16 autocast. The backward must recompute
    # the logits in the forward's dtype, or its softmax no longer sums to 1.
    hidden, weight, bias, ids = inputs(bias=True, scale=3.0)
    w = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        params = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = fn(*params)
        torch.autograd.backward((logp.double() * w).sum())
        return [logp.detach().double()] + [p.grad.double() for p in params]

    full = grads(lambda h, W, b: torch.log_softmax((h @ W.T).float() + b, -1).gather(1, ids.unsqueeze(1)).squeeze(1))
    ours = grads(lambda h, W, b: token_logprobs(h, W, ids, bias=b, chunk_size=40))
    for name, a, f in zip(["logp", "d hidden", "d weight", "d bias"], ours, full):
        assert rel_err(a, f) < 1e-2, name
    assert abs(float(ours[3].sum())) < 1e-4 * float(w.abs().sum())  # softmax gradients sum to 0 over V
    mixed = hidden.detach().bfloat16().requires_grad_()  # bf16 activations, float32 weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        token_logprobs(mixed, weight, ids, chunk_size=40).sum().backward()
    assert mixed.grad.dtype == torch.bfloat16 and torch.isfinite(mixed.grad).all()


def test_double_backward_is_refused_not_wrong():
    hidden, weight, _, ids = inputs(torch.float64)
    logp = token_logprobs(hidden, weight, ids, chunk_size=10)
    (g,) = torch.autograd.grad(logp.sum(), hidden, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_extreme_logits_stay_finite_and_as_accurate_as_full_float32():
    hidden, weight, _, ids = inputs(scale=300.0)  # logits in the thousands
    for name, a, f, r in ours_full_and_reference(hidden, weight, ids, chunk_size=13):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) <= 2 * rel_err(f, r) + 1e-6, name


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tokens_by_vocabulary_tensor_in_forward_or_backward():
    n, v, chunk = 64, 1000, 100
    hidden = torch.randn(n, H, requires_grad=True)
    weight = torch.randn(v, H, requires_grad=True)
    ids = torch.randint(0, v, (n,))
    with LargestTensor() as probe:
        logp, entropy = token_logprobs(hidden, weight, ids, chunk_size=chunk, return_entropy=True)
        (logp.sum() + entropy.sum()).backward()
    assert probe.largest <= max(n * chunk, v * H)  # a (rows, chunk) tile or the weight's gradient
    with LargestTensor() as full:  # the probe does see a full-logits computation
        torch.log_softmax(hidden @ weight.T, -1).gather(1, ids.unsqueeze(1)).sum().backward()
    assert full.largest == n * v


def test_gradient_flows_only_where_asked():
    hidden, weight, _, ids = inputs()
    weight.requires_grad_(False)
    token_logprobs(hidden, weight, ids, chunk_size=10).sum().backward()
    assert hidden.grad is not None and weight.grad is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_states=torch.zeros(3, 4), weight=torch.zeros(5, 6), token_ids=torch.zeros(3, dtype=torch.long)),
     "weight \\(V, H\\)"),
    (dict(hidden_states=torch.zeros(3, 4), weight=torch.zeros(5, 4), token_ids=torch.zeros(2, dtype=torch.long)),
     "token_ids must be"),
    (dict(hidden_states=torch.zeros(3, 4), weight=torch.zeros(5, 4), token_ids=torch.zeros(3, dtype=torch.long),
          chunk_size=0), "chunk_size must be >= 1"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_logprobs(**kwargs)
