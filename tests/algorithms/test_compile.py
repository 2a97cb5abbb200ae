"""docs/algorithms.md, "Numerics": the objectives trace under torch.compile. Each registered
objective with its aggregation compiles as one graph (fullgraph=True: no boolean-mask
assignment, no data-dependent branch), and `policy_loss` as a whole compiles with padding that
holds inf and gives eager's loss and gradient; its only graph break is the one host copy of
the metrics. The aot_eager backend traces forward and backward like inductor without
generating code, so the test takes seconds."""

import pytest
import torch

import sapo
from sapo.algorithms import PolicyLossInputs, PolicyLossSettings, aggregate, get_policy_loss


def batch():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    logp = torch.where(mask > 0, torch.randn(B, T, generator=g) - 1, -torch.inf).requires_grad_()
    old = torch.where(mask > 0, torch.randn(B, T, generator=g) - 1, torch.inf)
    return logp, old, torch.randn(B, generator=g), mask


@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "gspo"])
def test_each_objective_and_its_aggregation_compile_as_one_graph(loss_type):
    objective = get_policy_loss(loss_type)

    def loss(logp, old, adv, mask):
        log_ratio = torch.where(mask > 0, logp - old, 0.0).clamp(-20, 20)
        inputs = PolicyLossInputs(torch.where(mask > 0, logp, 0.0), torch.where(mask > 0, old, 0.0), log_ratio,
                                  log_ratio.exp(), adv.unsqueeze(-1).expand_as(logp), mask)
        return aggregate(objective(inputs, PolicyLossSettings()).loss, mask, "seq-mean-token-mean")

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    logp, old, adv, mask = batch()
    eager_value = loss(logp, old, adv, mask)
    (eager_grad,) = torch.autograd.grad(eager_value, logp)
    value = compiled(logp, old, adv, mask)
    (grad,) = torch.autograd.grad(value, logp)
    torch.testing.assert_close(value, eager_value)
    torch.testing.assert_close(grad, eager_grad)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "gspo"])
def test_policy_loss_compiles_and_matches_eager(loss_type):
    torch._dynamo.reset()
    compiled = torch.compile(sapo.policy_loss, backend="aot_eager")
    logp, old, adv, mask = batch()
    ref = torch.where(mask > 0, old + 0.1, torch.nan)
    eager = sapo.policy_loss(logp, old, adv, mask, loss_type=loss_type, ref_logprobs=ref, beta=0.1)
    (eager_grad,) = torch.autograd.grad(eager.loss, logp)
    out = compiled(logp, old, adv, mask, loss_type=loss_type, ref_logprobs=ref, beta=0.1)
    (grad,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(out.loss, eager.loss)
    torch.testing.assert_close(grad, eager_grad)
    assert out.metrics == pytest.approx(eager.metrics)


def test_policy_loss_breaks_the_graph_once_for_the_metrics():
    logp, old, adv, mask = batch()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(sapo.policy_loss)(logp, old, adv, mask, ref_logprobs=old + 0.1, beta=0.1)
    assert explained.graph_break_count == 1
    assert all("tolist" in str(reason.reason) for reason in explained.break_reasons)
