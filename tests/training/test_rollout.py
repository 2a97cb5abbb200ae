"""Phase 1, rollout: the engine's samples with their prompts, seeds derived from the position in
the step's global batch, and pi_old only where the update needs one."""

import dataclasses

import torch

from sapo.data import PromptSet
from sapo.engines import HFEngine, SamplingSettings
from sapo.model.logprobs import ForwardSettings
from sapo.model.tiny import char_tokenizer, tiny_causal_lm
from sapo.training.rollout import RolloutSettings, batched_logprobs, behaviour_logprobs, sample

TEXTS = ["1+1=", "22+3=", "7+8="]


def setup(**settings):
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    engine = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, device=torch.device("cpu"))
    prompts = PromptSet([{"prompt": t} for t in TEXTS], [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS],
                        conversational=False)
    values = dict(group_size=3, sampling=SamplingSettings(max_new_tokens=5), forward=ForwardSettings(),
                  needs_old_logprobs=True, use_rollout_logprobs=True, seed=7)
    return model, engine, prompts, RolloutSettings(**{**values, **settings})


def test_samples_carry_left_padded_prompts_and_their_rows():
    _, engine, prompts, settings = setup()
    out = sample(engine, prompts, [0, 1], settings, step=3, first_position=0)
    assert out.prompt_ids.shape == (6, 5) and out.row_indices == [0, 0, 0, 1, 1, 1]
    assert (out.prompt_mask[:3, 0] == 0).all() and (out.prompt_mask[3:] == 1).all()
    assert out.prompt_ids[4][out.prompt_mask[4].bool()].tolist() == prompts.prompt_ids[1]
    assert (out.step, out.first_position) == (3, 0)
    picked = out.select([4, 1])
    assert picked.row_indices == [1, 0] and (picked.step, picked.first_position) == (3, 0)


def test_a_group_depends_on_the_seed_step_and_its_global_position_only():
    _, engine, prompts, settings = setup()
    together = sample(engine, prompts, [0, 2], settings, step=1, first_position=4)
    alone = sample(engine, prompts, [2], settings, step=1, first_position=5)  # another process's share
    n = int(alone.completion_mask.sum(-1).max())
    assert torch.equal(alone.completion_ids[:, :n], together.completion_ids[3:, :n])
    for other in (dict(step=2, first_position=5), dict(step=1, first_position=6)):
        moved = sample(engine, prompts, [2], settings, **other)
        assert not torch.equal(moved.completion_ids, alone.completion_ids)
    reseeded = sample(engine, prompts, [2], dataclasses.replace(settings, seed=8), step=1, first_position=5)
    assert not torch.equal(reseeded.completion_ids, alone.completion_ids)


def test_pi_old_is_only_computed_when_the_policy_can_move():
    model, engine, prompts, settings = setup()
    out = sample(engine, prompts, [0, 1], settings, step=0, first_position=0)
    assert behaviour_logprobs(model, out, dataclasses.replace(settings, needs_old_logprobs=False)) == (None, None)
    assert behaviour_logprobs(model, out, settings)[0] is out.sampling_logprobs
    recomputed, routing = behaviour_logprobs(model, out, dataclasses.replace(settings, use_rollout_logprobs=False))
    assert routing is None  # a dense model
    assert recomputed is not out.sampling_logprobs
    torch.testing.assert_close(recomputed, batched_logprobs(model, out, settings.forward))
    mask = out.completion_mask.bool()
    torch.testing.assert_close(recomputed[mask], out.sampling_logprobs[mask], rtol=1e-5, atol=1e-5)
