import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sapo


def batch():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    return loss, mask


@pytest.mark.parametrize("aggregation,expected", [
    ("seq-mean-token-mean", ((1 + 2) / 2 + (4 + 5 + 6) / 3 + 0) / 3),  # the empty row counts in B
    ("token-mean", (1 + 2 + 4 + 5 + 6) / 5),
    ("seq-mean-token-sum", (3 + 15) / 3),
    ("seq-mean-token-sum-norm", (3 + 15) / (3 * 10)),
])
def test_each_mode_by_hand(aggregation, expected):
    loss, mask = batch()
    assert sapo.aggregate(loss, mask, aggregation, max_tokens=10).item() == pytest.approx(expected)


def test_unknown_mode_is_an_error():
    loss, mask = batch()
    with pytest.raises(ValueError, match="choose one of"):
        sapo.aggregate(loss, mask, "sequence-mean")


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 7), seed=st.integers(0, 2**16), G=st.integers(1, 3))
def test_modes_split_over_sequence_blocks_like_a_batch(B, T, seed, G):
    # The sequence-normalised modes of a batch equal the mean of the same mode over equal blocks of
    # sequences: what gradient accumulation relies on.
    gen = torch.Generator().manual_seed(seed)
    loss = torch.randn(B * G, T, generator=gen, dtype=torch.float64)
    mask = (torch.rand(B * G, T, generator=gen) > 0.4).double()
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        whole = sapo.aggregate(loss, mask, mode, max_tokens=T)
        parts = [sapo.aggregate(loss[i * B:(i + 1) * B], mask[i * B:(i + 1) * B], mode, max_tokens=T) for i in range(G)]
        assert whole.item() == pytest.approx(torch.stack(parts).mean().item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("aggregation", sapo.available_aggregations())
@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "gspo"])
def test_micro_batches_with_the_minibatch_denominator_give_the_whole_batch_gradient(aggregation, loss_type):
    gen = torch.Generator().manual_seed(0)
    B, T = 6, 5
    logp = torch.randn(B, T, generator=gen, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=gen) > 0.3).double()
    kw = dict(loss_type=loss_type, aggregation=aggregation, max_tokens=T)

    whole = logp.clone().requires_grad_()
    sapo.policy_loss(whole, old, adv, mask, **kw).loss.backward()

    parts = logp.clone().requires_grad_()
    denominator = sapo.aggregation_denominator(aggregation, mask)
    for idx in ([0], [1, 2, 3], [4, 5]):
        sapo.policy_loss(parts[idx], old[idx], adv[idx], mask[idx], denominator=denominator, **kw).loss.backward()
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-12, atol=1e-14)
