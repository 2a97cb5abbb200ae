"""Fault injection: non-finite updates are skipped, counted, stop the run after
max_nonfinite_steps in a row, and never reach a checkpoint."""

import json
import math
from pathlib import Path

import pytest
import torch

import sapo
import sapo.training.update
from sapo.errors import NonFiniteUpdateError


def metrics(output_dir):
    return [json.loads(x) for x in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_checkpoints_finite(output_dir):
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"))
    for checkpoint in checkpoints:
        model = sapo.model.loading.load_model(checkpoint, torch.float32)
        assert all(torch.isfinite(p).all() for p in model.parameters()), checkpoint
    return [p.name for p in checkpoints]


def nan_loss_on_calls(monkeypatch, calls):
    """policy_loss whose loss (and so every gradient) is NaN on the given calls (0-based)."""
    real, count = sapo.training.update.policy_loss, [0]

    def patched(*args, **kwargs):
        out = real(*args, **kwargs)
        if count[0] in calls:
            out.loss = out.loss * math.nan
        count[0] += 1
        return out

    monkeypatch.setattr(sapo.training.update, "policy_loss", patched)


@pytest.mark.parametrize("learning_rate,message", [
    # The first SGD update is finite, and the forward passes after it overflow: skipped, then stopped.
    (1e10, (r"^3 optimizer step\(s\) in a row had a NaN or infinite loss or gradient norm, at rollout step \d "
            r"\(max_nonfinite_steps=2\)")),
    # The first update itself takes the weights beyond float32's range: stopped before it is saved.
    (1e38, r"^the parameters became NaN or infinite \(or too large for a finite norm\) at rollout step 1"),
])
def test_a_huge_learning_rate_stops_the_run_and_no_checkpoint_holds_its_parameters(base_config, learning_rate, message):
    config = {**base_config, "optim": "sgd", "learning_rate": learning_rate, "max_steps": 4, "save_steps": 1,
              "max_nonfinite_steps": 2}
    with pytest.raises(NonFiniteUpdateError, match=message):
        sapo.Trainer(sapo.TrainConfig(**config)).train()
    logged = metrics(config["output_dir"])
    assert sum(m["nonfinite_steps"] for m in logged) >= (3 if learning_rate == 1e10 else 1)
    assert logged[-1]["nonfinite_steps"] >= 1  # the step that stopped the run is in metrics.jsonl
    saved = [int(c.split("-")[1]) for c in assert_checkpoints_finite(config["output_dir"])]
    assert logged[-1]["step"] not in saved and saved == list(range(1, logged[-1]["step"]))


def test_a_single_nan_step_is_skipped_and_training_goes_on(base_config, monkeypatch):
    # The second minibatch of the first step (micro_batch_size 4 = one micro-batch per minibatch).
    nan_loss_on_calls(monkeypatch, {1})
    config = {**base_config, "lr_scheduler": "linear", "save_steps": 1}
    trainer = sapo.Trainer(sapo.TrainConfig(**config))
    history = trainer.train()
    assert [h["nonfinite_steps"] for h in history] == [1.0, 0.0]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in history)
    assert [m["nonfinite_steps"] for m in metrics(config["output_dir"])] == [1, 0]
    assert assert_checkpoints_finite(config["output_dir"]) == ["checkpoint-1", "checkpoint-2"]
    # The schedule steps on a skipped step: it ends where it was planned.
    assert trainer.scheduler.last_epoch == config["max_steps"] * config["num_minibatches"]
    # AdamW counts the steps it took: 3 of the 4, the skipped one was not taken.
    assert {float(s["step"]) for s in trainer.optimizer.optimizer.state.values()} == {3.0}


def test_max_nonfinite_steps_0_stops_at_the_first(base_config, monkeypatch):
    nan_loss_on_calls(monkeypatch, {2})  # the first minibatch of the second step
    config = {**base_config, "max_nonfinite_steps": 0, "save_steps": 1}
    with pytest.raises(NonFiniteUpdateError, match=r"^1 optimizer step\(s\) in a row .* at rollout step 2 "
                                                   r"\(max_nonfinite_steps=0\)"):
        sapo.Trainer(sapo.TrainConfig(**config)).train()
    assert [m["nonfinite_steps"] for m in metrics(config["output_dir"])] == [0, 1]
    assert assert_checkpoints_finite(config["output_dir"]) == ["checkpoint-1"]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_parameters_that_become_nan_stop_the_run_before_any_checkpoint_holds_them(base_config):
    config = {**base_config, "optim": "sgd", "max_steps": 3, "save_steps": 1}
    trainer = sapo.Trainer(sapo.TrainConfig(**config))
    inner = trainer.optimizer.optimizer
    real_step, steps = inner.step, [0]

    def step(*args, **kwargs):  # an update that is NaN although the gradient was finite
        out = real_step(*args, **kwargs)
        steps[0] += 1
        if steps[0] == 4:  # the last optimizer step of rollout step 2
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = math.nan
        return out

    inner.step = step
    with pytest.raises(NonFiniteUpdateError, match=r"^the parameters became NaN or infinite \(or too large for a "
                                                   r"finite norm\) "
                                                   r"at rollout step 2"):
        trainer.train()
    assert assert_checkpoints_finite(config["output_dir"]) == ["checkpoint-1"]
    assert [m["step"] for m in metrics(config["output_dir"])] == [1, 2]


def test_save_refuses_nan_parameters_and_leaves_the_last_checkpoint(base_config):
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 1}))
    trainer.train()
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = math.inf
    with pytest.raises(NonFiniteUpdateError, match=r"^checkpoint-1 was not written: the parameters are NaN"):
        trainer.save(1)
    assert assert_checkpoints_finite(base_config["output_dir"]) == ["checkpoint-1"]


def test_max_nonfinite_steps_must_not_be_negative(base_config):
    with pytest.raises(sapo.ConfigError, match=r"max_nonfinite_steps=-1 must be >= 0"):
        sapo.TrainConfig(**{**base_config, "max_nonfinite_steps": -1}).validate()


def test_an_infinite_log_prob_at_a_loss_token_skips_the_step(base_config, monkeypatch):
    # The objective clamps the log-ratio, so the loss and gradients stay finite: only the check of
    # the loss inputs sees it. (With that check disabled the step would be applied.)
    real, count = sapo.training.update.completion_logprobs, [0]

    def patched(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *args, **kwargs):
        logp, entropy = real(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *args, **kwargs)
        if count[0] == 1:
            row, col = completion_mask.nonzero()[0].tolist()
            logp = logp.clone()
            logp[row, col] = -math.inf
        count[0] += 1
        return logp, entropy

    monkeypatch.setattr(sapo.training.update, "completion_logprobs", patched)
    config = {**base_config, "save_steps": 1}
    history = sapo.Trainer(sapo.TrainConfig(**config)).train()
    assert [h["nonfinite_steps"] for h in history] == [1.0, 0.0]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in history)
    assert assert_checkpoints_finite(config["output_dir"]) == ["checkpoint-1", "checkpoint-2"]
