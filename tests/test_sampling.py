"""Shared-prompt sampling draws exactly what model.generate draws, with one prefill per prompt."""

import pytest
import torch

from sapo.rollout import batched_logprobs, generate
from sapo.sampling import sample_groups, top_p_filter
from sapo.tiny import char_tokenizer, tiny_causal_lm

PROMPTS = ["7+8=", "12+345=", "1=", "99*9=", "3-2="]  # different lengths: left padding in the batch


def rollouts(model, tok, shared, **kw):
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    args = dict(group_size=6, max_new_tokens=10, temperature=1.0, top_p=1.0, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, seeds=[11, 12, 13, 14, 15], device=torch.device("cpu"))
    args.update(kw)
    return generate(model, ids, list(range(len(ids))), shared_prefill=shared, **args)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3_moe"])
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.7, top_p=0.8), dict(temperature=0.0, group_size=1)])
def test_same_samples_as_generate_group_by_group(arch, sampling):
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, arch, hidden_size=32)
    ours = rollouts(model, tok, shared=True, **sampling)
    plain = rollouts(model, tok, shared=False, **sampling)
    assert torch.equal(ours.completion_ids, plain.completion_ids)
    assert torch.equal(ours.completion_mask, plain.completion_mask)
    assert torch.equal(ours.truncated, plain.truncated)
    assert ours.completion_mask.sum() > len(PROMPTS)  # more than one token each: the cache was used
    assert (ours.sampling_logprobs is None) == (sampling.get("temperature") == 0)
    assert plain.sampling_logprobs is None


def test_sampling_logprobs_are_the_policy_at_temperature_without_top_p():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    out = rollouts(model, tok, shared=True, temperature=0.7, top_p=0.5)
    recomputed = batched_logprobs(model, out, 0.7, micro_batch_size=7)
    mask = out.completion_mask.bool()
    assert (out.sampling_logprobs[~mask] == 0).all()
    torch.testing.assert_close(out.sampling_logprobs[mask], recomputed[mask], rtol=1e-5, atol=1e-5)


def test_max_sequences_splits_the_batch_without_changing_the_samples():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    whole = rollouts(model, tok, shared=True)
    shapes = []
    model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    split = rollouts(model, tok, shared=True, max_sequences=13)  # 2 groups of 6 per batch: 2 + 2 + 1 prompts
    assert {s[0] for s in shapes} == {2, 1, 12, 6}
    assert torch.equal(split.completion_ids, whole.completion_ids)
    torch.testing.assert_close(split.sampling_logprobs, whole.sampling_logprobs, rtol=1e-5, atol=1e-5)


def test_one_prefill_per_prompt_then_one_decoding_batch():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    shapes = []
    model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    rollouts(model, tok, shared=True, max_new_tokens=4)
    assert shapes[0] == (5, 7)  # 5 prompts, not 5 * 6 rows
    assert set(shapes[1:]) == {(30, 1)} and len(shapes) <= 4


def test_model_with_linear_attention_state_falls_back_to_generate():
    from transformers import AutoConfig, AutoModelForCausalLM

    # Qwen3-Next mixes linear-attention layers (recurrent state) with attention: repeating only
    # keys and values along the batch would be wrong, so the sampler hands over to generate.
    config = AutoConfig.for_model(
        "qwen3_next", vocab_size=len(char_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = AutoModelForCausalLM.from_config(config)
    calls = []
    original_generate = model.generate
    model.generate = lambda *a, **k: calls.append(1) or original_generate(*a, **k)
    got = rollouts(model, tok, shared=True)
    assert len(calls) == len(PROMPTS)
    model.generate = original_generate
    assert torch.equal(got.completion_ids, rollouts(model, tok, shared=False).completion_ids)
    assert got.sampling_logprobs is None  # the trainer then recomputes pi_old


def test_top_p_keeps_the_smallest_set_reaching_the_mass_and_never_nothing():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1e-9)).sum(-1).tolist() == [1, 1]


def test_sample_groups_pads_after_eos():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 0
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    out, logprobs = sample_groups(model, ids, group_size=4, max_new_tokens=12, temperature=1.0, top_p=1.0,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seeds=list(range(5)),
                                  device=torch.device("cpu"))
    assert out.shape[0] == 20 and logprobs.shape == out.shape
    for row in out.tolist():
        if tok.eos_token_id in row:
            end = row.index(tok.eos_token_id)
            assert all(t == tok.pad_token_id for t in row[end + 1:])
