"""MoE routing replay: recorded experts are forced in any layout and micro-batching, with gate
weights from the current router; the changed-routing count; the balancing loss; refusals."""

import pytest
import torch
import torch.nn.functional as F

from sapo.errors import ConfigError
from sapo.model import routing as routing_module
from sapo.model.logprobs import ForwardSettings, completion_logprobs
from sapo.model.routing import (
    MoERouting,
    RoutingCall,
    RoutingStats,
    TokenAddresses,
    check_routing_support,
    find_routers,
)
from sapo.model.tiny import char_tokenizer, tiny_causal_lm

G = 4


def moe_model(seed=0):
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, "qwen3_moe", hidden_size=32, seed=seed).eval()
    with torch.no_grad():
        for router in find_routers(model):  # away from the zero init: tokens route differently
            router.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return tok, model


def batch(vocab):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (2, 5), generator=g).repeat_interleave(G, 0)  # 2 prompts x G samples
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[:G, :2] = 0  # the first prompt is shorter (left padding)
    completion = torch.randint(3, vocab, (2 * G, 7), generator=g)
    completion_mask = torch.ones_like(completion)
    completion_mask[1, 3:] = 0
    completion_mask[5, 1:] = 0
    return prompt, prompt_mask, completion, completion_mask


def scored(model, data, routing, call, forward, idx=None):
    idx = list(range(len(data[0]))) if idx is None else idx
    with torch.no_grad(), routing.active(call):
        return completion_logprobs(model, *(t[idx] for t in data), forward, routing=call)[0]


def hand_forced(model, data, experts):
    """The padded forward with every router's output replaced by the given experts (per router,
    (rows * columns, k)) and gate weights computed here from the router's current logits."""
    routers = find_routers(model)
    originals = [r.forward for r in routers]

    def forced(router, chosen):
        def forward(hidden):
            logits = F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
            weights = torch.softmax(logits.double(), -1).gather(1, chosen)
            if router.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
            return logits, weights.to(logits.dtype), chosen
        return forward

    for router, chosen in zip(routers, experts):
        router.forward = forced(router, chosen)
    try:
        with torch.no_grad():
            return completion_logprobs(model, *data, ForwardSettings())[0]
    finally:
        for router, original in zip(routers, originals):
            router.forward = original


def recorded_then_perturbed():
    tok, model = moe_model()
    data = batch(len(tok))
    routing = MoERouting(model)
    raw = []  # the routers' own choices in the recording pass, (rows * columns, k) each
    handles = [r.register_forward_hook(lambda m, a, out: raw.append(out[2].clone())) for r in routing.routers]
    table = routing.new_table(2 * G, 12, "cpu")
    behaviour = scored(model, data, routing, RoutingCall("record", table, torch.arange(2 * G)), ForwardSettings())
    for h in handles:
        h.remove()
    with torch.no_grad():  # a later policy: some top-k choices flip
        for router in routing.routers:
            router.weight.add_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(5)) * 0.3)
    return model, data, routing, table, raw, behaviour


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("micro", [1, 3, 2 * G])
def test_replay_forces_the_recorded_experts_in_any_layout_and_micro_batch(padding_free, micro):
    model, data, routing, table, raw, _ = recorded_then_perturbed()
    reference = hand_forced(model, data, raw)
    forward = ForwardSettings(padding_free=padding_free)
    mask = data[3].bool()
    replayed = torch.zeros_like(reference)
    for start in range(0, 2 * G, micro):
        idx = list(range(start, min(start + micro, 2 * G)))
        call = RoutingCall("replay", table, torch.tensor(idx))
        replayed[idx] = scored(model, data, routing, call, forward, idx)
    assert ((replayed - reference).abs()[mask] <= 1e-5).all()
    stats = RoutingStats()
    free = scored(model, data, routing, RoutingCall("compare", table, torch.arange(2 * G), stats=stats), forward)
    assert (free - reference).abs()[mask].max() > 1e-3  # without replay the flipped experts show
    assert 0 < stats.metrics()["moe/routing_changed_frac"] < 1


def test_padding_free_rows_are_really_used_by_the_test():
    from sapo.model.logprobs import _packed_layout

    tok, model = moe_model()
    assert _packed_layout(model, *batch(len(tok))) is not None


def test_replay_of_the_routers_own_choice_changes_nothing():
    tok, model = moe_model()
    data = batch(len(tok))
    routing = MoERouting(model)
    table = routing.new_table(2 * G, 12, "cpu")
    plain = scored(model, data, routing, None, ForwardSettings())
    recorded = scored(model, data, routing, RoutingCall("record", table, torch.arange(2 * G)), ForwardSettings())
    stats = RoutingStats()
    replayed = scored(model, data, routing, RoutingCall("replay", table, torch.arange(2 * G), stats=stats),
                      ForwardSettings())
    assert torch.equal(plain, recorded) and torch.equal(plain, replayed)
    assert stats.metrics()["moe/routing_changed_frac"] == 0
    assert 0 < stats.metrics()["moe/load_entropy"] <= 1


def test_replayed_gate_weights_carry_the_routers_gradient():
    model, data, routing, table, _, _ = recorded_then_perturbed()
    model.train()
    call = RoutingCall("replay", table, torch.arange(2 * G), collect_logits=True)
    with routing.active(call):
        logp, _ = completion_logprobs(model, *data, ForwardSettings(), routing=call)
        aux = routing.aux_loss(call)
    (logp.sum() + 0 * aux).backward(retain_graph=True)
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routing.routers)
    model.zero_grad()
    aux.backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routing.routers)


def test_the_balancing_loss_is_transformers_own_on_the_unpadded_tokens():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    tok, model = moe_model()
    data = batch(len(tok))
    routing = MoERouting(model)
    call = RoutingCall("compare", None, torch.arange(2 * G), collect_logits=True)
    scored(model, data, routing, call, ForwardSettings())
    with torch.no_grad():
        out = model(input_ids=torch.cat(data[:3:2], 1), attention_mask=torch.cat([data[1], data[3]], 1),
                    output_router_logits=True)
        want = load_balancing_loss_func(out.router_logits, 4, 2, torch.cat([data[1], data[3]], 1))
    assert torch.allclose(routing.aux_loss(call), want, atol=1e-6)


def test_packed_addresses_give_a_shared_prompt_to_every_sample_of_its_row():
    from sapo.model.packing import pack_rows

    prompt, prompt_mask, completion, completion_mask = batch(50)
    rows = pack_rows(prompt, prompt_mask, completion, completion_mask, by_cost=False)
    addresses = TokenAddresses.packed(rows.segments, rows.position_ids, rows.row_samples)
    pairs = set(zip(addresses.sample_M.tolist(), addresses.position_M.tolist()))
    lengths = (prompt_mask.sum(1) + completion_mask.sum(1)).tolist()
    assert pairs == {(b, s) for b in range(2 * G) for s in range(lengths[b])}  # every token of every sample


def test_unsupported_or_dense_models_are_refused_with_the_model_type(monkeypatch):
    tok, model = moe_model()
    check_routing_support(model, "r2", 0.0)
    dense = tiny_causal_lm(tok, "qwen2", hidden_size=32)
    with pytest.raises(ConfigError, match="routing_replay=r2: qwen2 is not a mixture-of-experts model"):
        check_routing_support(dense, "r2", 0.0)
    monkeypatch.setattr(routing_module, "ROUTERS", {})
    with pytest.raises(ConfigError, match="routers of MoE model type 'qwen3_moe' are not supported"):
        check_routing_support(model, "r3", 0.0)
    check_routing_support(model, "none", 0.0)  # nothing asked: nothing to refuse
