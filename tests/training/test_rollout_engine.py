"""Rollouts from a bfloat16 copy of the policy: the mismatch shows in the metrics and the update
is weighted by the correction; with float32 rollouts the update is today's."""

import copy
import dataclasses

import pytest
import torch

import sapo
from sapo.algorithms.mismatch import importance_weights
from sapo.training.update import policy_update
from tests.training.test_wiring import close, fixed_rollout, reference_logprobs


def test_bfloat16_rollouts_show_the_mismatch_and_are_corrected(base_config):
    config = sapo.TrainConfig(**{**base_config, "rollout_dtype": "bfloat16"})
    trainer = sapo.Trainer(config)
    assert trainer.settings.rollout.use_rollout_logprobs is False  # pi_old from the float32 forward
    history = trainer.train()
    assert trainer.engine.model is not trainer.model and next(trainer.engine.model.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    for step in history:
        assert step["rollout/mismatch_kl"] > 0 and step["rollout/is_weight_mean"] != 1.0
        assert 0 <= step["rollout/is_masked_frac"] <= 1 and torch.isfinite(torch.tensor(step["loss"]))


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_the_update_is_weighted_by_the_correction(base_config, mode):
    config = sapo.TrainConfig(**{**base_config, "num_minibatches": 1, "micro_batch_size": 3, "optim": "sgd",
                                 "learning_rate": 0.5, "rollout_dtype": "bfloat16",
                                 "vllm_importance_sampling_mode": mode, "vllm_importance_sampling_clip_max": 1.5})
    trainer = sapo.Trainer(config)
    model = trainer.acc.unwrap_model(trainer.model)
    rollout = fixed_rollout(model.config.vocab_size)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        now = reference_logprobs(model, rollout, config.temperature)
        rollout.old_logprobs = (now + 0.2 * torch.randn(now.shape, generator=g)) * rollout.completion_mask
        rollout.sampling_logprobs = (now + 0.3 * torch.randn(now.shape, generator=g)) * rollout.completion_mask
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.25, -0.25])

    def expected(weighted: bool):
        ref = copy.deepcopy(model)
        weights, _ = importance_weights(rollout.old_logprobs, rollout.sampling_logprobs, rollout.completion_mask,
                                        trainer.settings.update.correction)
        out = sapo.policy_loss(reference_logprobs(ref, rollout, config.temperature), rollout.old_logprobs, advantages,
                               rollout.completion_mask.float(), loss_type="sapo",
                               importance_weights=weights if weighted else None)
        out.loss.backward()  # max_grad_norm=0: no clipping
        return {k: -config.learning_rate * p.grad for k, p in ref.named_parameters()}

    weighted, unweighted = expected(weighted=True), expected(weighted=False)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    result = policy_update(trainer.state, rollout, advantages, trainer.settings.update)
    got = {k: v.detach() - before[k] for k, v in model.named_parameters()}
    assert close(got, weighted) and not close(got, unweighted, rel=1e-2)
    assert result.metrics["rollout/mismatch_kl"] > 0 and result.metrics["rollout/is_weight_max"] <= 1.5 + 1e-6


def final_parameters(config):
    trainer = sapo.Trainer(config)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def test_float32_rollouts_keep_todays_update_and_an_explicit_correction_warns(base_config, tmp_path):
    # One step: a later rollout would sample from parameters that differ by rounding, and one
    # draw that flips changes the whole update.
    config = sapo.TrainConfig(**{**base_config, "use_rollout_logprobs": False, "max_steps": 1, "optim": "sgd",
                                 "learning_rate": 0.5})
    start = {k: v.detach().clone() for k, v in sapo.Trainer(config).model.named_parameters()}
    today = final_parameters(config)
    off = final_parameters(dataclasses.replace(config, vllm_importance_sampling_correction=False,
                                               output_dir=str(tmp_path / "off")))
    assert all(torch.equal(today[k], off[k]) for k in today)
    with pytest.warns(UserWarning, match="nothing to correct"):
        on = final_parameters(dataclasses.replace(config, vllm_importance_sampling_correction=True,
                                                  output_dir=str(tmp_path / "on")))
    moved = max((today[k] - start[k]).abs().max().item() for k in today)
    # the weights are 1 up to the rounding between the sampling pass and the training forward
    # (|w - 1| < 1e-6 here), and so is the update
    assert moved > 1e-4 and max((on[k] - today[k]).abs().max().item() for k in today) <= 1e-5 * moved
