"""The `hf` engine: shared-prompt sampling draws exactly what model.generate draws, with one
prefill per prompt; masks stop after EOS; a group depends on its seed alone."""

import copy

import pytest
import torch

from sapo.data import PromptSet
from sapo.engines import HFEngine, SamplingSettings
from sapo.engines.hf import sample_groups, top_p_filter
from sapo.model.logprobs import ForwardSettings
from sapo.model.tiny import char_tokenizer, tiny_causal_lm
from sapo.training.rollout import RolloutSettings, batched_logprobs, sample

PROMPTS = ["7+8=", "12+345=", "1=", "99*9=", "3-2="]  # different lengths: left padding in the batch


def generate(model, tok, prompts, seeds, *, group_size=3, shared=True, max_new_tokens=5, max_sequences=0,
             **sampling):
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    engine = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      device=torch.device("cpu"), shared_prefill=shared)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, max_num_seqs=max_sequences, **sampling)
    return engine.generate(ids, group_size, settings, seeds)


def rollouts(model, tok, shared, **kw):
    return generate(model, tok, PROMPTS, [11, 12, 13, 14, 15], shared=shared, **{"group_size": 6,
                                                                                 "max_new_tokens": 10, **kw})


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
    assert (ours.logprobs is None) == (sampling.get("temperature") == 0)
    assert plain.logprobs is None


def test_sampling_logprobs_are_the_policy_at_temperature_without_top_p():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    engine = HFEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, device=torch.device("cpu"))
    prompts = PromptSet([{"prompt": p} for p in PROMPTS], [tok(p, add_special_tokens=False)["input_ids"]
                                                           for p in PROMPTS], conversational=False)
    forward = ForwardSettings(temperature=0.7, micro_batch_size=7)
    settings = RolloutSettings(group_size=6, sampling=SamplingSettings(10, temperature=0.7, top_p=0.5),
                               forward=forward, needs_old_logprobs=True, use_rollout_logprobs=True, seed=0)
    out = sample(engine, prompts, list(range(len(PROMPTS))), settings, step=0, first_position=0)
    recomputed = batched_logprobs(model, out, forward)
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
    torch.testing.assert_close(split.logprobs, whole.logprobs, rtol=1e-5, atol=1e-5)


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
        linear_key_head_dim=8, linear_value_head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"])
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
    assert got.logprobs is None  # the trainer then recomputes pi_old


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


def test_masks_stop_after_eos_and_truncation_is_flagged():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    with torch.no_grad():  # make EOS likely so both cases occur
        model.lm_head.weight[tok.eos_token_id] *= 0
    model.config.tie_word_embeddings = False
    out = generate(model, tok, ["1+1=", "22+3="], seeds=[1, 2])
    assert out.completion_ids.shape[0] == 6
    assert out.finish_reasons == ["length" if t else "stop" for t in out.truncated.tolist()]
    assert out.routed_experts is None  # a dense model, and an engine that does not report routing
    for ids, mask, trunc in zip(out.completion_ids, out.completion_mask, out.truncated):
        n = int(mask.sum())
        assert (mask[:n] == 1).all() and (mask[n:] == 0).all()
        assert (ids[n:] == tok.pad_token_id).all()
        has_eos = bool((ids[:n] == tok.eos_token_id).any())
        assert has_eos != bool(trunc)
        if has_eos:
            assert ids[n - 1] == tok.eos_token_id and (ids[:n - 1] != tok.eos_token_id).all()
        else:
            assert n == 5


def test_a_group_depends_only_on_its_seed():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    alone = generate(model, tok, ["7+8="], seeds=[42])
    together = generate(model, tok, ["1+2=", "7+8="], seeds=[5, 42])
    n = int(alone.completion_mask.sum(-1).max())
    assert torch.equal(alone.completion_ids[:, :n], together.completion_ids[3:, :n])
    again = generate(model, tok, ["7+8="], seeds=[43])
    assert not torch.equal(again.completion_ids, alone.completion_ids)


def test_sampling_ignores_the_models_own_generation_settings():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    plain = generate(model, tok, ["7+8="], seeds=[123], max_new_tokens=12)
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.no_repeat_ngram_size = 1
    again = generate(model, tok, ["7+8="], seeds=[123], max_new_tokens=12)
    assert torch.equal(plain.completion_ids, again.completion_ids)
    assert model.generation_config.repetition_penalty == 3.0  # and leaves them in place


def test_temperature_zero_is_greedy():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    a = generate(model, tok, ["7+8="], seeds=[1], temperature=0.0, group_size=1)
    b = generate(model, tok, ["7+8="], seeds=[2], temperature=0.0, group_size=1)
    assert torch.equal(a.completion_ids, b.completion_ids)
    ids = tok("7+8=", add_special_tokens=False, return_tensors="pt")["input_ids"]
    step = model(ids).logits[0, -1].argmax()
    assert a.completion_ids[0, 0] == step


def test_a_low_precision_copy_follows_the_policy_at_every_sync():
    from sapo.engines import HFEngine

    tok = char_tokenizer()
    policy = tiny_causal_lm(tok, hidden_size=32)
    engine = HFEngine(policy, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      device=torch.device("cpu"), dtype=torch.bfloat16)
    for change in (0.0, 0.25):
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(change)
        engine.sync(policy)
        copy = engine.model
        assert copy is not policy
        own = dict(copy.named_parameters())
        assert all(torch.equal(own[k], p.detach().to(torch.bfloat16)) for k, p in policy.named_parameters())
        # buffers keep their dtype: a bfloat16 model keeps its rotary frequencies in float32
        assert all(b.dtype == dict(policy.named_buffers())[k].dtype for k, b in copy.named_buffers())
        assert copy.lm_head.weight is copy.model.embed_tokens.weight  # still tied
    assert all(p.dtype == torch.float32 for p in policy.parameters())


def _probs_and_seeds(rows=12, vocab=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, vocab, generator=g) * 3
    scores[: rows // 2] = top_p_filter(scores[: rows // 2], 0.5)  # zeros in the probabilities, as with top-p
    return scores.softmax(-1), [7, 8, 9, 10][: rows // 3]


@pytest.mark.parametrize("fast", [True, False])
def test_batched_draws_are_torch_multinomial_group_by_group(monkeypatch, fast):
    from sapo.engines import hf

    assert hf._uniform_noise_is_exponential(), "this torch's exponential_ is no longer reproduced: the slow path runs"
    if not fast:
        monkeypatch.setattr(hf, "_uniform_noise_is_exponential", lambda: False)
    probs, seeds = _probs_and_seeds()
    draws = hf._GroupDraws(seeds, 3, torch.device("cpu"))
    assert draws.fast == fast
    plain = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(4):  # the generators move on identically, step after step
        want = torch.cat([torch.multinomial(probs[g * 3:(g + 1) * 3], 1, generator=gen).squeeze(1)
                          for g, gen in enumerate(plain)])
        assert torch.equal(draws.multinomial(probs), want)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(draws.generators, plain))


def test_close_calls_are_drawn_again_with_exponential(monkeypatch):
    from sapo.engines import hf

    assert hf._uniform_noise_is_exponential()  # its check, made once, before counting
    probs, seeds = _probs_and_seeds(seed=1)
    monkeypatch.setattr(hf._GroupDraws, "CLOSE", 1.0)  # every row a close call: every group drawn again
    redraws = []
    exponential = torch.Tensor.exponential_  # torch.multinomial below calls its own, not this attribute
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *a, **k: redraws.append(1) or
                        exponential(self, *a, **k))
    draws = hf._GroupDraws(seeds, 3, torch.device("cpu"))
    plain = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(3):
        want = torch.cat([torch.multinomial(probs[g * 3:(g + 1) * 3], 1, generator=gen).squeeze(1)
                          for g, gen in enumerate(plain)])
        assert torch.equal(draws.multinomial(probs), want)
    assert len(redraws) == 3 * len(seeds)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(draws.generators, plain))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_cache_grows_in_place_with_the_values_of_concatenation(monkeypatch, attention):
    from sapo.engines import hf

    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32).eval()
    model.config._attn_implementation = attention
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    args = dict(group_size=4, max_new_tokens=9, temperature=1.0, top_p=1.0, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, seeds=list(range(5)), device=torch.device("cpu"))
    pointers = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: pointers.append(
        {layer.keys.data_ptr() for layer in hf._returned_cache(out).layers}), with_kwargs=True)
    tokens, logprobs = sample_groups(model, ids, **args)
    handle.remove()
    assert tokens.shape[1] > 2 and all(p == pointers[1] for p in pointers[1:])  # the same buffers at every step
    monkeypatch.setattr(hf, "_preallocate", lambda cache, extra_tokens: None)
    concatenated, concatenated_logprobs = sample_groups(model, ids, **args)
    assert torch.equal(tokens, concatenated) and torch.equal(logprobs, concatenated_logprobs)


def test_non_finite_logits_raise_as_multinomial_does():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32).eval()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    with pytest.raises(RuntimeError, match="probability tensor contains either `inf`, `nan` or element < 0"):
        sample_groups(model, ids, group_size=2, max_new_tokens=3, temperature=1.0, top_p=1.0,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, seeds=list(range(5)),
                      device=torch.device("cpu"))


def test_a_bfloat16_model_on_a_cpu_decodes_with_a_4d_mask_and_the_same_draws(monkeypatch):
    from sapo.engines import hf

    tok = char_tokenizer()
    policy = tiny_causal_lm(tok, hidden_size=32).eval()  # grouped-query attention: 4 heads, 2 key/value heads
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    args = dict(group_size=3, max_new_tokens=8, temperature=1.0, top_p=1.0, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, seeds=list(range(5)), device=torch.device("cpu"))
    low = copy.deepcopy(policy).to(torch.bfloat16)
    for model, decoding_mask_dims in ((policy, {2}), (low, {4})):
        dims = []
        handle = model.register_forward_pre_hook(lambda m, a, kw: dims.append(kw["attention_mask"].dim()),
                                                 with_kwargs=True)
        packed = sample_groups(model, ids, **args)
        handle.remove()
        assert dims[0] == 2 and set(dims[1:]) == decoding_mask_dims  # float32 keeps the 2D mask
    # The prompts have different lengths, so transformers builds a mask of its own and packs the
    # queries too: the same kernel on the same mask, the same numbers.
    monkeypatch.setattr(hf, "_PACK_LOW_PRECISION", False)
    plain = sample_groups(low, ids, **args)
    assert torch.equal(packed[0], plain[0]) and torch.equal(packed[1], plain[1])


def test_the_rollout_benchmark_splits_a_decoding_step():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "rollout.py"
    done = subprocess.run([sys.executable, str(script), "--split", "--prompt-lengths", "8", "--prompts", "1",
                           "--num-generations", "2", "--max-new-tokens", "3", "--repeats", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.strip()}
    split = {r[0]: r[1:] for r in (line.split() for line in done.stdout.splitlines()) if len(r) == 9}
    for weights in ("float32", "bfloat16"):
        prefill, forward, cache, sampling, noise, other, total, rate = map(float, split[weights])
        assert min(prefill, forward, cache, sampling, noise) > 0 and noise < sampling and rate > 0
        assert abs(prefill + forward + cache + sampling + other - total) < 1e-3 * total + 0.2
    assert "lm_head" in rows and "all," in rows  # the bare matmuls
