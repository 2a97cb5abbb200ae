"""Padding-free rows: the layout itself, and completion_logprobs on it against padded rows."""

import pytest
import torch
from torch import nn

from sapo.model.logprobs import _PACKING_VERIFIED, ForwardSettings, _packed_layout, completion_logprobs
from sapo.model.packing import PADDING, PROMPT, layout_cost, pack_rows
from sapo.model.tiny import char_tokenizer, tiny_causal_lm

P, C = 6, 7


def shared_batch(vocab, lengths=(7, 3, 1, 5, 2, 6), seed=0):
    """Six samples of three prompts (0, 0, 1, 2, 0, 1), left-padded prompts of 4, 6 and 2 tokens,
    completions of the given lengths (right-padded to C)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(3, vocab, (3, P), generator=gen)
    prompt_ids = base[[0, 0, 1, 2, 0, 1]]
    prompt_mask = torch.ones(6, P, dtype=torch.long)
    prompt_mask[[0, 1, 4], :2] = 0
    prompt_mask[3, :4] = 0
    prompt_ids = prompt_ids * prompt_mask  # padding holds token 0
    completion_ids = torch.randint(3, vocab, (6, C), generator=gen)
    completion_mask = (torch.arange(C) < torch.tensor(lengths)[:, None]).long()
    return prompt_ids, prompt_mask, completion_ids * completion_mask, completion_mask


def test_rows_hold_each_prompt_once_and_every_token_in_its_place():
    prompt_ids, prompt_mask, completion_ids, completion_mask = data = shared_batch(100)
    rows = pack_rows(*data)
    R, L = rows.input_ids.shape
    assert R == 3 and L <= 2 * (P + C) and R * L < 6 * (P + C) and rows.shared
    mask = completion_mask.bool()
    for b in range(6):
        prompt = prompt_ids[b][prompt_mask[b].bool()]
        completion = completion_ids[b][mask[b]]
        tokens = slice(int(mask[:b].sum()), int(mask[:b + 1].sum()))  # sample b's entries in rows_N / cols_N
        r = int(rows.rows_N[tokens][0])
        assert (rows.rows_N[tokens] == r).all()
        seg = rows.segments[r]
        assert torch.equal(rows.input_ids[r][seg == PROMPT], prompt)
        assert torch.equal(rows.position_ids[r][seg == PROMPT], torch.arange(len(prompt)))
        assert torch.equal(rows.input_ids[r][seg == b], completion)
        assert torch.equal(rows.position_ids[r][seg == b], len(prompt) + torch.arange(len(completion)))
        # The position predicting token t holds token t - 1, or the prompt's last token for t = 0.
        assert torch.equal(rows.input_ids[r][rows.cols_N[tokens]], torch.cat([prompt[-1:], completion[:-1]]))


def test_the_mask_keeps_each_completion_to_its_prompt_and_itself():
    rows = pack_rows(*shared_batch(100))
    allowed = rows.attention_mask()[:, 0]
    seg = rows.segments
    for r in range(seg.shape[0]):
        for i in range(seg.shape[1]):
            for j in range(seg.shape[1]):
                want = j <= i and seg[r, j] != PADDING and seg[r, j] in (PROMPT, seg[r, i])
                assert bool(allowed[r, i, j]) == want
    assert allowed.any(-1).all()  # no empty softmax row, padding queries included
    additive = rows.attention_mask(torch.float32)[:, 0]
    assert (additive[allowed] == 0).all() and (additive[~allowed] == torch.finfo(torch.float32).min).all()


def test_a_prompt_whose_samples_do_not_fit_gets_another_row_never_longer_than_two_padded_rows():
    vocab = 50
    prompt_ids = torch.randint(3, vocab, (1, 3)).repeat(12, 1)
    completion_mask = torch.ones(12, 5, dtype=torch.long)
    completion_mask[1::2, 2:] = 0  # lengths alternate 5, 2
    rows = pack_rows(prompt_ids, torch.ones_like(prompt_ids), torch.randint(3, vocab, (12, 5)), completion_mask)
    assert rows.input_ids.shape[1] <= 2 * (3 + 5)
    # 12 samples of 3 + 5 or 3 + 2 tokens: rows of 16 columns hold 3 + 5 + 2 + 5 (one prompt, three samples).
    assert rows.input_ids.shape[0] == 4


def test_no_rows_where_they_would_not_be_smaller_or_the_masks_are_not_prefixes():
    prompt_ids = torch.arange(12).reshape(3, 4) + 3  # three different prompts, no padding anywhere
    full = torch.ones(3, 2, dtype=torch.long)
    assert pack_rows(prompt_ids, torch.ones_like(prompt_ids), torch.full((3, 2), 5), full) is None
    holes = torch.tensor([[1, 0, 1], [1, 1, 0]])
    prompts = torch.full((2, 4), 7)
    assert pack_rows(prompts, torch.ones_like(prompts), torch.full((2, 3), 5), holes) is None
    empty_prompt = torch.ones_like(prompts)
    empty_prompt[0] = 0
    assert pack_rows(prompts, empty_prompt, torch.full((2, 3), 5), torch.ones(2, 3, dtype=torch.long)) is None


def one_pass(P, lengths, samples=2, vocab=1000, seed=0):
    """Prompts of P tokens (no padding), `samples` samples of each (as a minibatch of G = 8 split
    in 4 holds them), completions of the given lengths, right-padded to the longest."""
    gen = torch.Generator().manual_seed(seed)
    N, T = len(lengths), max(lengths)
    prompt_ids = torch.randint(3, vocab, (N // samples, P), generator=gen).repeat_interleave(samples, 0)
    completion_mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    completion_ids = torch.randint(3, vocab, (N, T), generator=gen) * completion_mask
    return prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask


# Measured on CPU with a 25M-parameter Qwen2 (benchmarks/padding_free.py, docs/performance.md):
# a 64-token prompt with its 2 completions in one row took 0.86-0.95x the padded rows' time at
# completions of 64 and 128 tokens, 0.98-1.14x at 256 and 1.04-1.14x at 512; with completions of
# spread lengths (padding to drop) 0.65-0.86x.
@pytest.mark.parametrize("P, lengths, padding_free", [
    (64, [64] * 8, True),
    (64, [128] * 8, True),
    (64, [256] * 8, False),  # rows twice as long: attention costs more than the 64 prompt tokens saved
    (64, [512] * 8, False),
    (16, [512] * 8, False),
    (64, [512, 64, 300, 450, 100, 500, 200, 380], True),  # padding to drop as well
    (512, [128] * 8, True),  # a long shared prompt, short completions
    (6, [4] * 32, True),  # the demo's shape: prompts as long as the completions
])
def test_the_cost_model_picks_padded_rows_where_longer_rows_cost_more_than_they_save(P, lengths, padding_free):
    data = one_pass(P, lengths)
    rows = pack_rows(*data)
    assert (rows is not None) is padding_free
    forced = pack_rows(*data, by_cost=False)  # the same rows, where they have fewer cells
    B, T = len(lengths), max(lengths)
    R, L = forced.input_ids.shape
    assert R * L < B * (P + T)
    assert rows is None or torch.equal(rows.input_ids, forced.input_ids)
    padded = layout_cost(B, P + T, masked=min(lengths) < T)
    assert (layout_cost(R, L, masked=True) < padded) is padding_free


def test_where_the_cost_model_picks_padded_rows_the_values_are_the_padded_ones_exactly():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    data = one_pass(4, [300, 300], vocab=len(tok))  # one short prompt, two long completions
    assert pack_rows(*data) is None and pack_rows(*data, by_cost=False) is not None
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    want, want_entropy, want_grads = logprobs_and_grads(model, data, False, 0)
    got, entropy, grads = logprobs_and_grads(model, data, True, 0)
    assert seen == [(2, 304), (2, 304)] and model not in _PACKING_VERIFIED  # padded rows, nothing checked
    assert torch.equal(got, want) and torch.equal(entropy, want_entropy)
    assert all(torch.equal(grads[name], g) for name, g in want_grads.items())


def logprobs_and_grads(model, data, padding_free, chunk_size, temperature=0.8):
    model.zero_grad()
    logp, entropy = completion_logprobs(model, *data, ForwardSettings(temperature=temperature, chunk_size=chunk_size,
                                                                      padding_free=padding_free), with_entropy=True)
    (logp * torch.linspace(-1, 1, logp.shape[1])).sum().backward()
    return logp.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch, tied", [("qwen2", False), ("qwen2", True), ("llama", False), ("qwen3_moe", False)])
@pytest.mark.parametrize("attention, chunk_size", [("sdpa", 0), ("sdpa", 5), ("eager", 0)])
def test_padding_free_rows_give_the_padded_values_and_gradients(arch, tied, attention, chunk_size):
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, arch, hidden_size=32, tie_word_embeddings=tied, attn_implementation=attention)
    data = shared_batch(len(tok))
    if chunk_size:  # the chunked head's own first-use check takes the full-logits path
        completion_logprobs(model, *data, ForwardSettings(temperature=0.8, chunk_size=chunk_size))
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    want_logp, want_entropy, want_grads = logprobs_and_grads(model, data, False, chunk_size)
    assert seen == [(6, P + C)]
    logp, entropy, grads = logprobs_and_grads(model, data, True, chunk_size)
    packed_shape = pack_rows(*data).input_ids.shape
    # The first call checks the layout against padded rows: the two layouts, then the training forward.
    assert seen[1:] == [(6, P + C), packed_shape, packed_shape] and _PACKING_VERIFIED[model] is True
    mask = data[3].bool()
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all()
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        scale = want_grads[name].abs().max().clamp(min=1e-12)
        assert float((g - want_grads[name]).abs().max() / scale) < 1e-5, name
    logprobs_and_grads(model, data, True, chunk_size)
    assert seen[4:] == [packed_shape]  # checked once


def test_bfloat16_weights_agree_within_their_rounding():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32).to(torch.bfloat16)
    data = shared_batch(len(tok))
    want, _ = completion_logprobs(model, *data, ForwardSettings(temperature=1.0))
    got, _ = completion_logprobs(model, *data, ForwardSettings(temperature=1.0, padding_free=True))
    assert _PACKING_VERIFIED[model] is True and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2)


def test_the_check_waits_for_rows_that_share_a_prompt():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    prompt_ids, prompt_mask, completion_ids, completion_mask = shared_batch(len(tok))
    distinct = [0, 2, 3]  # one sample of each prompt
    completion_logprobs(model, prompt_ids[distinct], prompt_mask[distinct], completion_ids[distinct],
                        completion_mask[distinct], ForwardSettings(temperature=1.0, padding_free=True))
    assert _PACKING_VERIFIED[model] == "unshared"
    completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                        ForwardSettings(temperature=1.0, padding_free=True))
    assert _PACKING_VERIFIED[model] is True


def test_a_model_that_ignores_the_block_mask_keeps_padded_rows(monkeypatch):
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)

    class Ignores(nn.Module):  # takes the mask but attends causally over the whole row
        def __init__(self):
            super().__init__()
            self.config = model.config
            self.inner = model

        def forward(self, attention_mask, **kwargs):
            return model(attention_mask=None if attention_mask.dim() == 4 else attention_mask, **kwargs)

    data = shared_batch(len(tok))
    want, _ = completion_logprobs(model, *data, ForwardSettings(temperature=1.0))
    wrapper = Ignores()
    with pytest.warns(UserWarning, match="using padded rows"):
        got, _ = completion_logprobs(wrapper, *data, ForwardSettings(temperature=1.0, padding_free=True))
    assert _PACKING_VERIFIED[wrapper] is False
    torch.testing.assert_close(got, want)
    import sapo.model.logprobs

    built = []
    monkeypatch.setattr(sapo.model.logprobs, "pack_rows", lambda *a, **k: built.append(1) or pack_rows(*a, **k))
    torch.testing.assert_close(completion_logprobs(wrapper, *data,
                                                   ForwardSettings(temperature=1.0, padding_free=True))[0], want)
    assert built == []  # padded rows straight away: no rows built, nothing checked again


def test_models_whose_own_mask_the_block_mask_would_replace_keep_padded_rows():
    tok = char_tokenizer()
    data = shared_batch(len(tok))
    sliding = tiny_causal_lm(tok, "qwen2", hidden_size=32, use_sliding_window=True, sliding_window=4)
    seen = []
    sliding.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    completion_logprobs(sliding, *data, ForwardSettings(temperature=1.0, padding_free=True))
    assert seen == [(6, P + C)] and sliding not in _PACKING_VERIFIED
    model = tiny_causal_lm(tok, hidden_size=32)
    assert _packed_layout(model, *data) is not None
    for setting, value in (("attention_chunk_size", 8), ("layer_types", ["full_attention", "linear_attention"]),
                           ("_attn_implementation", "flash_attention_2")):  # Llama 4, Qwen3-Next, no 4D mask
        other = tiny_causal_lm(tok, hidden_size=32)
        setattr(other.config, setting, value)
        assert _packed_layout(other, *data) is None, setting


def test_row_padding_does_not_use_the_configs_pad_token():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    model.config.pad_token_id = -1  # as some converted LLaMA checkpoints ship it
    data = shared_batch(len(tok))
    want, _ = completion_logprobs(model, *data, ForwardSettings(temperature=1.0))
    torch.testing.assert_close(completion_logprobs(model, *data,
                                                   ForwardSettings(temperature=1.0, padding_free=True))[0], want)
    assert _PACKING_VERIFIED[model] is True


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_check_sees_through_accelerates_mixed_precision(fresh_accelerate_state):
    from accelerate import Accelerator

    tok = char_tokenizer()
    # bf16 rounding differs between the two layouts by more than a float32 comparison allows
    # (about 2e-3 at this size): the check must compute in the weights' float32.
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = accelerator.prepare(tiny_causal_lm(tok, hidden_size=128))
    assert "forward" in vars(model)  # accelerate's autocast wrapper
    wrapper = model.forward
    data = shared_batch(len(tok))
    with accelerator.autocast():
        completion_logprobs(model, *data, ForwardSettings(temperature=1.0, padding_free=True))
    assert _PACKING_VERIFIED[model] is True and model.forward == wrapper
