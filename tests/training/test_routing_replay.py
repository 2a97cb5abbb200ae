"""Routing replay through the trainer's phases: the update with r2 equals one whose routers are
forced by hand; the hf engine records its routing (r3); the load-balancing loss; the trainer
wires it all and refuses what it cannot do."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

import sapo
from sapo.algorithms import LossSettings
from sapo.engines import HFEngine, SamplingSettings
from sapo.errors import ConfigError
from sapo.model.logprobs import ForwardSettings
from sapo.model.routing import MoERouting, RoutingCall, find_routers
from sapo.model.tiny import char_tokenizer, tiny_causal_lm
from sapo.training.rollout import Rollout, RolloutSettings, behaviour_logprobs
from sapo.training.update import PolicyState, UpdateSettings, minibatch_plan, policy_update

G = 4


def moe(seed=0, **sizes):
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, "qwen3_moe", hidden_size=32, seed=seed, **sizes)
    with torch.no_grad():
        for router in find_routers(model):
            router.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    return tok, model


def rollout_of(vocab):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, vocab, (2, 5), generator=g).repeat_interleave(G, 0)
    completion = torch.randint(3, vocab, (2 * G, 6), generator=g)
    mask = torch.ones_like(completion)
    mask[2, 2:] = 0
    return Rollout(prompt, torch.ones_like(prompt), completion, mask, torch.zeros(2 * G, dtype=torch.bool),
                   list(range(2 * G)))


def update_settings(**changes):
    forward = ForwardSettings(micro_batch_size=2 * G)
    base = UpdateSettings(group_size=G, num_minibatches=1, num_iterations=1, max_grad_norm=0.0, max_nonfinite_steps=0,
                          mask_truncated_completions=False, seed=0, learning_rate=0.5,
                          loss=LossSettings(loss_type="grpo"), forward=forward)
    return dataclasses.replace(base, **changes)


def one_update(model, rollout, settings, routing):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    advantages = torch.linspace(-1, 1, len(rollout))
    result = policy_update(PolicyState(model, optimizer, scheduler, Accelerator(cpu=True), routing), rollout,
                           advantages, settings)
    return {k: v.detach().clone() for k, v in model.named_parameters()}, result.metrics


def recorded_rollout():
    """A rollout whose behaviour pass recorded its routing, then a policy whose routers moved
    enough to flip some of those choices."""
    tok, model = moe()
    rollout = rollout_of(len(tok))
    routing = MoERouting(model)
    raw = []
    hooks = [r.register_forward_hook(lambda m, a, out: raw.append(out[2].clone())) for r in routing.routers]
    settings = RolloutSettings(group_size=G, sampling=SamplingSettings(max_new_tokens=6),
                               forward=ForwardSettings(micro_batch_size=2 * G), needs_old_logprobs=True,
                               use_rollout_logprobs=False, seed=0)
    rollout.old_logprobs, rollout.routing = behaviour_logprobs(model, rollout, settings, routing)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for router in routing.routers:
            router.weight.add_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(9)) * 0.3)
    return model, rollout, routing, raw


def test_an_r2_update_equals_one_with_the_routing_forced_by_hand():
    model, rollout, routing, raw = recorded_rollout()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    replayed, metrics = one_update(model, rollout, update_settings(routing_replay="r2"), routing)
    assert metrics["moe/routing_changed_frac"] > 0  # the perturbation flipped some choices
    model.load_state_dict(start)
    free, free_metrics = one_update(model, rollout, update_settings(), routing)
    assert free_metrics["moe/routing_changed_frac"] == metrics["moe/routing_changed_frac"]
    model.load_state_dict(start)
    routing.close()
    originals = [r.forward for r in find_routers(model)]
    # The update's one minibatch holds the samples in its shuffled order, in one padded forward.
    order = minibatch_plan(2, G, 1, seed=0, step=0, iteration=0, first_position=0)[0]
    B, L = rollout.prompt_ids.shape[0], rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1]
    raw = [chosen.view(B, L, -1)[order].reshape(B * L, -1) for chosen in raw]
    for router, chosen in zip(find_routers(model), raw):
        def forward(hidden, router=router, chosen=chosen):
            logits = F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
            weights = torch.softmax(logits.float(), -1).gather(1, chosen)
            if router.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
            return logits, weights, chosen
        router.forward = forward
    by_hand, _ = one_update(model, rollout, update_settings(), None)
    for router, original in zip(find_routers(model), originals):
        router.forward = original
    assert all(torch.allclose(replayed[k], by_hand[k], atol=1e-6) for k in replayed)
    moved = max((replayed[k] - start[k]).abs().max() for k in replayed)
    assert moved > 1e-3 and max((free[k] - replayed[k]).abs().max() for k in free) > 1e-5


def test_hooks_without_replay_or_aux_loss_change_no_update():
    model, rollout, routing, _ = recorded_rollout()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooked, metrics = one_update(model, rollout, update_settings(), routing)
    assert "moe/load_entropy" in metrics and "moe/aux_loss" not in metrics
    model.load_state_dict(start)
    plain, _ = one_update(model, rollout, update_settings(), None)
    assert all(torch.equal(hooked[k], plain[k]) for k in plain)


def test_the_aux_loss_moves_the_routers_and_is_logged():
    model, rollout, routing, _ = recorded_rollout()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    without, _ = one_update(model, rollout, update_settings(routing_replay="r2", max_grad_norm=0.0), routing)
    model.load_state_dict(start)
    with_aux, metrics = one_update(model, rollout, update_settings(routing_replay="r2", router_aux_loss_coef=1.0),
                                   routing)
    assert metrics["moe/aux_loss"] > 0
    gates = [k for k in start if k.endswith("gate.weight")]
    assert gates and all((with_aux[k] - without[k]).abs().max() > 1e-6 for k in gates)


def test_the_hf_engine_reports_the_routing_of_every_token_it_fed_the_model():
    tok, model = moe()
    model.eval()
    engine = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, device=torch.device("cpu"))
    prompts = [tok("12+3=", add_special_tokens=False)["input_ids"], tok("7+8=", add_special_tokens=False)["input_ids"]]
    sampling = SamplingSettings(max_new_tokens=5, return_routed_experts=True, max_num_seqs=G)  # one group a batch
    gen = engine.generate(prompts, G, sampling, seeds=[1, 2])
    assert engine.generate(prompts, G, dataclasses.replace(sampling, return_routed_experts=False),
                           seeds=[1, 2]).routed_experts is None
    rollout = Rollout.from_generation(gen, sapo.data.PromptSet(rows=[{}, {}], prompt_ids=prompts, conversational=False,
                                                               pad_token_id=tok.pad_token_id), [0, 1])
    routed = gen.routed_experts  # (B, S, layers, k)
    assert routed.shape[:3] == (2 * G, 4 + 1 + 5, 2)
    # The training forward over the same tokens chooses the same experts (float32: up to near ties).
    routing = MoERouting(model)
    settings = RolloutSettings(group_size=G, sampling=sampling, forward=ForwardSettings(), needs_old_logprobs=True,
                               use_rollout_logprobs=False, seed=0)
    _, table = behaviour_logprobs(model, dataclasses.replace(rollout, routing=None), settings, routing)
    forward_BSXk = table.to_engine()
    lengths = (rollout.prompt_mask.sum(1) + rollout.completion_mask.sum(1)).tolist()
    for b, n in enumerate(lengths):
        # every token but the last one was fed to the model while sampling (the last one too if
        # longer rows were still decoding)
        assert (routed[b, :n - 1] >= 0).all()
        same = (routed[b, :n - 1].sort(-1).values == forward_BSXk[b, :n - 1].sort(-1).values).all(-1)
        assert same.float().mean() >= 0.9


def moe_config(tmp_path, **overrides):
    # Routers away from their zero init, so that tokens route differently; 16 experts, top-4, so
    # that a bfloat16 copy routes some tokens elsewhere.
    tok, model = moe(num_experts=16, num_experts_per_tok=4)
    model_dir = tmp_path / "moe"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return dict(model=str(model_dir), dataset="arithmetic", reward_funcs=["arithmetic"], num_generations=4,
                max_completion_length=4, max_prompt_length=16, num_minibatches=2,
                micro_batch_size=4, learning_rate=1e-2, max_steps=1, output_dir=str(tmp_path / "out"), seed=0,
                save_steps=0, **{"prompts_per_step": 2, **overrides})


@pytest.mark.parametrize("replay", ["none", "r2", "r3"])
def test_the_trainer_runs_replay_and_logs_the_routing_metrics(tmp_path, replay):
    trainer = sapo.Trainer(sapo.TrainConfig(**moe_config(tmp_path, routing_replay=replay, router_aux_loss_coef=0.01)))
    history = trainer.train()
    step = history[-1]
    assert 0 <= step["moe/routing_changed_frac"] <= 1 and 0 < step["moe/load_entropy"] <= 1
    assert step["moe/aux_loss"] > 0


def test_replay_on_a_dense_model_is_refused_before_training(workdir, tmp_path):
    config = dict(model=str(workdir / "model"), dataset="arithmetic", reward_funcs=["arithmetic"],
                  output_dir=str(tmp_path / "out"), routing_replay="r2")
    with pytest.raises(ConfigError, match="routing_replay=r2: qwen2 is not a mixture-of-experts model"):
        sapo.Trainer(sapo.TrainConfig(**config))


def test_r3_with_vllm_and_bad_coefficients_are_refused(workdir):
    base = dict(model=str(workdir / "model"), dataset="arithmetic", reward_funcs=["arithmetic"])
    with pytest.raises(ConfigError, match="routing_replay=r3 with rollout_engine=vllm"):
        sapo.TrainConfig(**base, routing_replay="r3", rollout_engine="vllm").validate()
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        sapo.TrainConfig(**base, router_aux_loss_coef=-1.0).validate()
    with pytest.raises(ConfigError, match="routing_replay='r4' is not one of"):
        sapo.TrainConfig(**base, routing_replay="r4").validate()


def test_recorded_routing_is_replayed_in_the_behaviour_pass_with_r3():
    model, rollout, routing, raw = recorded_rollout()
    settings = RolloutSettings(group_size=G, sampling=SamplingSettings(max_new_tokens=6),
                               forward=ForwardSettings(micro_batch_size=3), needs_old_logprobs=True,
                               use_rollout_logprobs=False, routing_replay="r3", seed=0)
    old, table = behaviour_logprobs(model, rollout, settings, routing)  # the perturbed policy, the old routing
    assert table is rollout.routing
    call = RoutingCall("replay", rollout.routing, torch.arange(2 * G))
    with torch.no_grad(), routing.active(call):
        from sapo.model.logprobs import completion_logprobs
        want, _ = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                      rollout.completion_mask, ForwardSettings(), routing=call)
    assert torch.allclose(old, want, atol=1e-6)


def test_with_r3_the_first_minibatch_ratio_is_one_under_the_bfloat16_engines_routing(tmp_path, monkeypatch):
    """The bfloat16 sampler routes some tokens elsewhere than the float32 policy would; r3 forces
    its routing in the behaviour pass and the update alike, so the first minibatch (policy not
    moved yet) still has ratio 1 on every token, while the behaviour log-probabilities are those
    of the engine's routing, not the policy's own."""
    import sapo.training.update as update

    seen, real = {}, update.policy_loss
    for replay in ("none", "r3"):
        calls = []
        monkeypatch.setattr(update, "policy_loss", lambda logp, old, adv, mask, **kw: calls.append(
            (logp.detach().clone(), old.clone(), mask.clone())) or real(logp, old, adv, mask, **kw))
        config = moe_config(tmp_path / replay, routing_replay=replay, rollout_dtype="bfloat16",
                            vllm_importance_sampling_correction=False, prompts_per_step=8)
        history = sapo.Trainer(sapo.TrainConfig(**config)).train()
        first = [c for c in calls if c[0] is not None][: len(calls) // 2]  # the first minibatch's micro-batches
        for logp, old, mask in first:
            assert ((logp - old).abs() * mask).max() <= 1e-5  # on-policy, whatever the routing
        seen[replay] = (first, history[-1]["moe/routing_changed_frac"])
    (none, _), (r3, changed) = seen["none"], seen["r3"]
    assert changed > 0  # the policy's own routing differs from the engine's on some tokens
    # ... and r3 scored pi_old under the engine's (the same float32 forward otherwise: equal bits)
    assert max(float(((a[1] - b[1]).abs() * a[2]).max()) for a, b in zip(none, r3)) > 1e-6


def test_gradient_checkpointing_recomputes_with_the_replayed_routing():
    model, rollout, routing, _ = recorded_rollout()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain, metrics = one_update(model, rollout, update_settings(routing_replay="r2"), routing)
    model.load_state_dict(start)
    from sapo.model.sharding import enable_gradient_checkpointing

    enable_gradient_checkpointing(model)
    recomputed, again = one_update(model, rollout, update_settings(routing_replay="r2"), routing)
    assert all(torch.allclose(plain[k], recomputed[k], atol=1e-6) for k in plain)
    assert again["moe/routing_changed_frac"] == metrics["moe/routing_changed_frac"]  # counted once, not twice


def test_a_dense_model_with_replay_is_refused_by_the_config_itself(workdir):
    """So that `sapo compare` refuses such an arm before any arm trains."""
    base = dict(model=str(workdir / "model"), dataset="arithmetic", reward_funcs=["arithmetic"])
    with pytest.raises(ConfigError, match="routing_replay=r2: qwen2 is not a mixture-of-experts model"):
        sapo.TrainConfig(**base, routing_replay="r2").validate()
    with pytest.raises(ConfigError, match="router_aux_loss_coef > 0: qwen2 is not"):
        sapo.TrainConfig(**base, router_aux_loss_coef=0.1).validate()
    sapo.TrainConfig(**{**base, "model": "moe-tiny"}, routing_replay="r2").validate()
