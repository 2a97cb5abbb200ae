"""Micro-batches packed by token count hold every sample once within the budget, and neither
they nor gradient checkpointing change the update."""

import copy

import pytest
import torch

import sapo
from sapo.errors import ConfigError
from sapo.model.logprobs import ForwardSettings
from sapo.training.micro_batches import cost, pack_by_tokens, split, split_to
from sapo.training.update import policy_update
from tests.training.test_wiring import fixed_rollout


def test_packing_keeps_every_sample_once_within_the_budget_of_computed_positions():
    lengths = [(3, 2), (4, 5), (2, 1), (3, 4), (1, 1), (4, 4), (2, 2), (6, 6)]
    parts = pack_by_tokens(list(range(8)), lengths, budget=16)
    assert sorted(i for p in parts for i in p) == list(range(8))
    # the budget bounds rows x (longest prompt + longest completion): what a pass computes
    assert all(cost(p, lengths) <= 16 for p in parts)
    assert all(p == sorted(p) for p in parts)  # samples keep their order
    assert pack_by_tokens([0, 1], [(10, 10), (2, 1)], budget=12) == [[0], [1]]  # a longer sample alone
    assert cost([0, 2, 4], lengths) == 3 * (3 + 2)


def test_a_micro_batch_computes_no_column_that_is_padding_in_all_of_its_samples():
    rollout = fixed_rollout(50)
    part = rollout.select([1, 3]).trimmed()  # completions of 3 and 1 tokens, prompts of 4 (one left-padded)
    assert part.completion_ids.shape[1] == 3 and part.prompt_ids.shape[1] == 4
    part = rollout.select([3, 6]).trimmed()  # both prompts left-padded by 2, completions of 1 and 2
    assert part.prompt_ids.shape[1] == 2 and part.completion_ids.shape[1] == 2
    assert torch.equal(part.completion_mask, rollout.completion_mask[[3, 6], :2])


def test_splitting_to_a_count_halves_the_costliest():
    lengths = [(1, 0)] * 6
    assert split_to([[0, 1, 2, 3, 4, 5]], lengths, 3) == [[0], [1, 2], [3, 4, 5]]
    assert split_to([[0, 1], [2, 3, 4, 5]], [(1, 0), (1, 0), (9, 0), (1, 0), (1, 0), (1, 0)], 3) == \
        [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="cannot make 3 micro-batches of 2 samples"):
        split_to([[0], [1]], lengths, 3)


def test_sequence_count_micro_batches_are_unchanged_on_one_process():
    forward = ForwardSettings(micro_batch_size=3)
    assert split(list(range(8)), [(1, 1)] * 8, forward, torch.device("cpu")) == [[0, 1, 2], [3, 4, 5], [6, 7]]


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
