"""Micro-batches packed by token count hold every sample once within the budget, and neither
they nor gradient checkpointing change the update."""

import copy

import pytest
import torch

import sapo
from sapo.errors import ConfigError
from sapo.model.logprobs import ForwardSettings
from sapo.training.micro_batches import pack_by_tokens, split, split_to
from sapo.training.update import policy_update
from tests.training.test_wiring import fixed_rollout


def test_packing_by_tokens_keeps_every_sample_once_within_the_budget():
    tokens = [5, 9, 3, 7, 2, 8, 4, 12]
    parts = pack_by_tokens(list(range(8)), tokens, budget=12)
    assert sorted(i for p in parts for i in p) == list(range(8))
    assert all(sum(tokens[i] for i in p) <= 12 for p in parts)
    assert len(parts) == 5  # 50 tokens need 5 micro-batches of 12, and first-fit decreasing finds them
    assert all(p == sorted(p) for p in parts)  # samples keep their order
    assert pack_by_tokens([0, 1], [20, 3], budget=12) == [[0], [1]]  # a longer sample alone


def test_splitting_to_a_count_halves_the_largest():
    tokens = [1] * 6
    assert split_to([[0, 1, 2, 3, 4, 5]], tokens, 3) == [[0], [1, 2], [3, 4, 5]]
    assert split_to([[0, 1], [2, 3, 4, 5]], [1, 1, 9, 1, 1, 1], 3) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="cannot make 3 micro-batches of 2 samples"):
        split_to([[0], [1]], tokens, 3)


def test_sequence_count_micro_batches_are_unchanged_on_one_process():
    forward = ForwardSettings(micro_batch_size=3)
    assert split(list(range(8)), [1] * 8, forward, torch.device("cpu")) == [[0, 1, 2], [3, 4, 5], [6, 7]]


def update_of(base_config, **changes):
    config = sapo.TrainConfig(**{**base_config, "num_minibatches": 2, "optim": "sgd", "learning_rate": 0.5,
                                 "micro_batch_size": 3, "num_generations": 4, **changes})
    trainer = sapo.Trainer(config)
    model = trainer.acc.unwrap_model(trainer.model)
    assert (model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing")
            else model.is_gradient_checkpointing) == config.gradient_checkpointing
    rollout = fixed_rollout(model.config.vocab_size)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    policy_update(trainer.state, copy.deepcopy(rollout), torch.linspace(-1.5, 1.5, len(rollout)),
                  trainer.settings.update)
    return {k: v.detach() - before[k] for k, v in model.named_parameters()}


def test_token_budget_and_gradient_checkpointing_give_the_same_update(base_config):
    expected = update_of(base_config)
    scale = max(v.abs().max().item() for v in expected.values())
    assert scale > 1e-3
    for changes in (dict(max_tokens_per_micro_batch=22), dict(gradient_checkpointing=True),
                    dict(max_tokens_per_micro_batch=30, gradient_checkpointing=True, padding_free=False)):
        got = update_of(base_config, **changes)
        assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6 * scale, changes


def test_fsdp_needs_two_processes(base_config):
    with pytest.raises(ConfigError, match=r"fsdp=true needs 2 or more processes: launch with torchrun"):
        sapo.Trainer(sapo.TrainConfig(**base_config, fsdp=True))
