"""The trainer hands every knob to the right slot: one update of the trainer on a fixed rollout is
the update computed by hand from the config's values with a direct `sapo.policy_loss` call, and
changing any one knob (swapping tau_pos and tau_neg, epsilon and epsilon_high, dropping beta, ...)
gives an update this test tells apart. The loop passes each phase its view of the config."""

import copy
import dataclasses

import pytest
import torch

import sapo
import sapo.training.trainer as trainer_module
from sapo.engines import SamplingSettings
from sapo.model.logprobs import ForwardSettings
from sapo.model.sharding import ModelSettings
from sapo.rewards import RewardSettings
from sapo.training.rollout import Rollout
from sapo.training.settings import RunSettings
from sapo.training.update import policy_update

# Clipping makes an update's scale invisible: where it binds (sapo) the knobs that only scale the
# loss cannot be told apart, so the other objectives run unclipped and check those.
KNOBS = {
    "sapo": dict(loss_type="sapo", tau_pos=0.5, tau_neg=3.0, aggregation="seq-mean-token-mean", max_grad_norm=0.05),
    "grpo": dict(loss_type="grpo", epsilon=0.05, epsilon_high=0.3, aggregation="token-mean", max_grad_norm=0.0),
    "gspo": dict(loss_type="gspo", epsilon=0.02, epsilon_high=0.15, aggregation="seq-mean-token-sum-norm",
                 max_grad_norm=0.0),
}
CHANGES = {  # besides beta, temperature and mask_truncated_completions
    "sapo": [dict(tau_pos=3.0, tau_neg=0.5), dict(max_grad_norm=0.0), dict(aggregation="token-mean")],
    "grpo": [dict(epsilon=0.3, epsilon_high=0.05), dict(max_grad_norm=0.05), dict(aggregation="seq-mean-token-sum")],
    "gspo": [dict(epsilon=0.15, epsilon_high=0.02), dict(max_completion_length=12),
             dict(aggregation="seq-mean-token-mean")],
}


def fixed_rollout(vocab: int, B: int = 8, P: int = 4, T: int = 6) -> Rollout:
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[::3, :2] = 0  # some prompts left-padded
    lengths = torch.tensor([6, 3, 5, 1, 6, 4, 2, 6])
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    completion_ids = torch.randint(3, vocab, (B, T), generator=g) * completion_mask
    truncated = lengths == T
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, list(range(B)))


def reference_logprobs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """log pi / temperature of the completion tokens from one plain padded forward pass."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    T = rollout.completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, -T - 1:-1] / temperature, -1)
    return logp.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)


def reference_update(model, rollout: Rollout, advantages: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """One SGD step on the whole batch, every knob read from the config by name."""
    model = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    logp = reference_logprobs(model, rollout, cfg.temperature)
    mask = rollout.completion_mask.float()
    if cfg.mask_truncated_completions:
        mask = mask * (~rollout.truncated).float().unsqueeze(-1)
    out = sapo.policy_loss(logp, rollout.old_logprobs, advantages, mask, loss_type=cfg.loss_type,
                           tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                           aggregation=cfg.aggregation, max_tokens=cfg.max_completion_length,
                           ref_logprobs=rollout.ref_logprobs, beta=cfg.beta)
    out.loss.backward()
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    with torch.no_grad():
        return {k: -cfg.learning_rate * p.grad for k, p in model.named_parameters() if k in before}


def close(a: dict, b: dict, rel: float = 1e-4) -> bool:
    scale = max(v.abs().max().item() for v in b.values())
    return scale > 0 and max((a[k] - b[k]).abs().max().item() for k in b) <= rel * scale


@pytest.mark.parametrize("loss_type", ["sapo", "grpo", "gspo"])
def test_one_update_is_policy_loss_with_the_configs_values_in_every_slot(base_config, loss_type):
    config = sapo.TrainConfig(**{**base_config, **KNOBS[loss_type], "num_minibatches": 1, "micro_batch_size": 3,
                                 "optim": "sgd", "learning_rate": 0.5, "temperature": 0.7,
                                 "beta": 0.5, "mask_truncated_completions": True})
    trainer = sapo.Trainer(config)
    model = trainer.acc.unwrap_model(trainer.model)
    rollout = fixed_rollout(model.config.vocab_size)
    with torch.no_grad():  # off policy, and a reference policy elsewhere: every gate and the KL term act
        now = reference_logprobs(model, rollout, config.temperature)
        g = torch.Generator().manual_seed(1)
        rollout.old_logprobs = (now + 0.3 * torch.randn(now.shape, generator=g)) * rollout.completion_mask
        rollout.ref_logprobs = (now + 0.3 * torch.randn(now.shape, generator=g)) * rollout.completion_mask
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.25, -0.25])
    expected = reference_update(model, rollout, advantages, config)

    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    policy_update(trainer.state, rollout, advantages, trainer.settings.update)
    got = {k: v.detach() - before[k] for k, v in model.named_parameters()}
    assert close(got, expected)

    # Each knob moves the update by far more than the tolerance: a knob in the wrong slot fails above.
    for change in [*CHANGES[loss_type], dict(beta=0.0), dict(temperature=1.0), dict(mask_truncated_completions=False)]:
        other = reference_update(_restored(model, before), rollout, advantages, dataclasses.replace(config, **change))
        assert not close(got, other, rel=1e-2), change


def _restored(model, params):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(params[k])
    return model


def test_the_loop_hands_each_phase_its_view(base_config, monkeypatch, workdir):
    config = sapo.TrainConfig(**{**base_config, "max_steps": 1, "eval_dataset": str(workdir / "data.jsonl")})
    trainer = sapo.Trainer(config)
    seen = {}
    for name in ("sample", "behaviour_logprobs", "score_rollout", "advantages", "policy_update"):
        real = getattr(trainer_module, name)

        def spy(*args, _name=name, _real=real, **kwargs):
            seen.setdefault(_name, (args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(trainer_module, name, spy)
    real_evaluate = trainer_module.evaluation.evaluate
    monkeypatch.setattr(trainer_module.evaluation, "evaluate",
                        lambda *a, **k: seen.setdefault("evaluate", (a, k)) and real_evaluate(*a, **k))
    trainer.train()
    views = trainer.settings
    assert seen["sample"][0][3] is views.rollout and seen["behaviour_logprobs"][0][2] is views.rollout
    assert seen["score_rollout"][0][4] is views.rewards
    assert seen["advantages"][0][1] is views.advantage
    assert seen["policy_update"][0][0] is trainer.state and seen["policy_update"][0][3] is views.update
    assert seen["evaluate"][0][4] is views.evaluation


# Seven booleans get the codes 1-7 and each config takes one bit of them: every two of them differ
# in some config, so a swap of any two shows.
FLAGS = ("padding_free", "mask_truncated_completions", "use_rollout_logprobs", "skip_reward_errors", "eval_greedy",
         "gradient_checkpointing", "cpu_offload")


@pytest.mark.parametrize("bit", [0, 1, 2])
def test_each_view_holds_its_config_fields(base_config, bit):
    flags = {name: bool((code >> bit) & 1) for code, name in enumerate(FLAGS, start=1)}
    # Distinct values, so that two fields of one type swapped in settings.py show.
    cfg = sapo.TrainConfig(**{**base_config, **flags, "num_generations": 3, "prompts_per_step": 4,
                              "num_minibatches": 2, "num_iterations": 5, "micro_batch_size": 7,
                              "max_completion_length": 11, "temperature": 0.9, "top_p": 0.8, "max_num_seqs": 13,
                              "logprob_chunk_size": 17, "seed": 19, "learning_rate": 0.23, "max_grad_norm": 0.29,
                              "max_nonfinite_steps": 31, "reward_weights": [0.37], "scale_rewards": "batch",
                              "eval_num_generations": 41, "loss_type": "grpo", "tau_pos": 0.43, "tau_neg": 0.47,
                              "epsilon": 0.053, "epsilon_high": 0.059, "beta": 0.61, "aggregation": "token-mean",
                              "max_tokens_per_micro_batch": 67, "fsdp": True, "param_dtype": "bfloat16",
                              "routing_replay": "r2", "router_aux_loss_coef": 0.71})
    views = RunSettings.from_config(cfg)
    sampling = SamplingSettings(max_new_tokens=11, temperature=0.9, top_p=0.8, max_num_seqs=13)
    forward = ForwardSettings(temperature=0.9, chunk_size=17, padding_free=flags["padding_free"], micro_batch_size=7,
                              max_tokens_per_micro_batch=67)
    assert views.model == ModelSettings(fsdp=True, param_dtype="bfloat16", cpu_offload=flags["cpu_offload"],
                                        gradient_checkpointing=flags["gradient_checkpointing"])
    rollout = views.rollout
    # The engine's routing is the behaviour routing where its log-probabilities are pi_old.
    routed = dataclasses.replace(sampling, return_routed_experts=flags["use_rollout_logprobs"])
    assert (rollout.group_size, rollout.sampling, rollout.forward, rollout.seed) == (3, routed, forward, 19)
    assert rollout.use_rollout_logprobs == flags["use_rollout_logprobs"] and rollout.routing_replay == "r2"
    assert (views.update.routing_replay, views.update.router_aux_loss_coef) == ("r2", 0.71)
    assert views.rewards == RewardSettings(weights=(0.37,), skip_errors=flags["skip_reward_errors"])
    assert (views.advantage.group_size, views.advantage.scale) == (3, "batch")
    update = views.update
    assert (update.group_size, update.num_minibatches, update.num_iterations, update.max_grad_norm,
            update.max_nonfinite_steps, update.seed, update.learning_rate, update.forward) == (
        3, 2, 5, 0.29, 31, 19, 0.23, forward)
    assert update.mask_truncated_completions == flags["mask_truncated_completions"]
    assert update.loss == sapo.algorithms.LossSettings(loss_type="grpo", tau_pos=0.43, tau_neg=0.47, epsilon=0.053,
                                                       epsilon_high=0.059, beta=0.61, aggregation="token-mean",
                                                       max_tokens=11)
    evaluation = views.evaluation
    assert (evaluation.samples, evaluation.sampling, evaluation.seed) == (41, sampling, 19)
    assert evaluation.greedy == flags["eval_greedy"]
    assert evaluation.rewards == RewardSettings(weights=(0.37,), skip_errors=True)  # evaluation never stops on one


@pytest.mark.parametrize("minibatches,iterations", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_pi_old_is_needed_once_the_policy_can_move_before_a_minibatch(base_config, minibatches, iterations):
    cfg = sapo.TrainConfig(**{**base_config, "num_minibatches": minibatches, "num_iterations": iterations})
    assert RunSettings.from_config(cfg).rollout.needs_old_logprobs == (minibatches * iterations > 1)


def test_the_correction_is_on_exactly_where_the_engine_is_not_the_training_forward(base_config):
    from sapo.algorithms.mismatch import CorrectionSettings

    knobs = dict(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=0.71,
                 vllm_importance_sampling_clip_max=2.9)
    views = RunSettings.from_config(sapo.TrainConfig(**base_config, rollout_dtype="bfloat16", **knobs))
    assert views.update.correction == CorrectionSettings("token_mask", 0.71, 2.9) and views.update.track_mismatch
    assert views.engine.dtype == "bfloat16" and not views.rollout.use_rollout_logprobs  # pi_old: a forward pass
    off = RunSettings.from_config(sapo.TrainConfig(**base_config, rollout_dtype="bfloat16", **knobs,
                                                   vllm_importance_sampling_correction=False))
    assert off.update.correction is None and off.update.track_mismatch  # measured, not applied
    exact = RunSettings.from_config(sapo.TrainConfig(**base_config, **knobs))
    assert exact.update.correction is None and not exact.update.track_mismatch and exact.rollout.use_rollout_logprobs
    forced = RunSettings.from_config(sapo.TrainConfig(**base_config, **knobs, vllm_importance_sampling_correction=True))
    assert forced.update.correction == CorrectionSettings("token_mask", 0.71, 2.9)


def test_the_engine_view_carries_every_vllm_knob(base_config):
    from sapo.engines import VLLMSettings

    knobs = dict(rollout_engine="vllm", vllm_mode="colocate", vllm_server_base_url="http://10.0.0.2:8001",
                 vllm_server_timeout=17.0, vllm_gpu_memory_utilization=0.55, vllm_tensor_parallel_size=1,
                 vllm_enable_sleep_mode=True)
    cfg = sapo.TrainConfig(**base_config, **knobs)
    views = RunSettings.from_config(cfg)
    assert views.engine.name == "vllm" and views.engine.vllm == VLLMSettings(
        mode="colocate", server_base_url="http://10.0.0.2:8001", server_timeout=17.0, gpu_memory_utilization=0.55,
        tensor_parallel_size=1, enable_sleep_mode=True, model=cfg.model,
        max_model_len=cfg.max_prompt_length + cfg.max_completion_length)
    # an engine that is not the training forward: pi_old from a forward pass, the correction on
    assert not views.rollout.use_rollout_logprobs and views.update.correction is not None
