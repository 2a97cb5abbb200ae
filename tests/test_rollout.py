import torch

from sapo.rollout import generate
from sapo.tiny import char_tokenizer, tiny_causal_lm


def sample(model, tok, prompts, seeds, **kw):
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    args = dict(group_size=3, max_new_tokens=5, temperature=1.0, top_p=1.0, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, device=torch.device("cpu"))
    args.update(kw)
    return generate(model, ids, list(range(len(prompts))), seeds=seeds, **args)


def test_masks_stop_after_eos_and_truncation_is_flagged():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    with torch.no_grad():  # make EOS likely so both cases occur
        model.lm_head.weight[tok.eos_token_id] *= 0
    model.config.tie_word_embeddings = False
    out = sample(model, tok, ["1+1=", "22+3="], seeds=[1, 2])
    assert out.completion_ids.shape[0] == 6 and out.prompt_ids.shape == (6, 5)
    assert (out.prompt_mask[:3, 0] == 0).all() and (out.prompt_mask[3:] == 1).all()  # left padding
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
    alone = sample(model, tok, ["7+8="], seeds=[42])
    together = sample(model, tok, ["1+2=", "7+8="], seeds=[5, 42])
    n = int(alone.completion_mask.sum(-1).max())
    assert torch.equal(alone.completion_ids[:, :n], together.completion_ids[3:, :n])
    again = sample(model, tok, ["7+8="], seeds=[43])
    assert not torch.equal(again.completion_ids, alone.completion_ids)


def test_sampling_ignores_the_models_own_generation_settings():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    plain = sample(model, tok, ["7+8="], seeds=[123], max_new_tokens=12)
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.no_repeat_ngram_size = 1
    again = sample(model, tok, ["7+8="], seeds=[123], max_new_tokens=12)
    assert torch.equal(plain.completion_ids, again.completion_ids)
    assert model.generation_config.repetition_penalty == 3.0  # and leaves them in place


def test_temperature_zero_is_greedy():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    a = sample(model, tok, ["7+8="], seeds=[1], temperature=0.0, group_size=1)
    b = sample(model, tok, ["7+8="], seeds=[2], temperature=0.0, group_size=1)
    assert torch.equal(a.completion_ids, b.completion_ids)
    ids = tok("7+8=", add_special_tokens=False, return_tensors="pt")["input_ids"]
    step = model(ids).logits[0, -1].argmax()
    assert a.completion_ids[0, 0] == step
