"""completion_logprobs: the chunked output layer gives the full-logits values and gradients."""

import pytest
import torch
from torch import nn

from sapo.model.logprobs import _VERIFIED, ForwardSettings, completion_logprobs, lean_head
from sapo.model.tiny import char_tokenizer, tiny_causal_lm


def batch(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (5, 6), generator=gen)
    prompt_mask = torch.ones(5, 6, dtype=torch.long)
    prompt_mask[0, :3] = 0  # left padding
    completion_ids = torch.randint(3, vocab, (5, 7), generator=gen)
    completion_mask = torch.ones(5, 7, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 1:] = 0
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def run(model, chunk_size, data, temperature=0.8):
    if chunk_size and model.lm_head not in _VERIFIED:  # the first call only checks the chunked path
        completion_logprobs(model, *data, ForwardSettings(temperature=temperature, chunk_size=chunk_size))
        assert _VERIFIED[model.lm_head]
    model.zero_grad()
    logp, entropy = completion_logprobs(model, *data, ForwardSettings(temperature=temperature, chunk_size=chunk_size),
                                        with_entropy=True)
    (logp * torch.linspace(-1, 1, logp.shape[1])).sum().backward()
    return logp.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch, tied", [("qwen2", False), ("qwen2", True), ("llama", False), ("qwen3_moe", False)])
@pytest.mark.parametrize("chunk_size", [5, 19])
def test_chunked_head_matches_full_logits(arch, tied, chunk_size):
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, arch, hidden_size=32, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    data = batch(len(tok))
    full_logp, full_entropy, full_grads = run(model, 0, data)
    logp, entropy, grads = run(model, chunk_size, data)
    mask = data[3].bool()
    assert (logp[~mask] == 0).all() and (full_logp[~mask] == 0).all()
    torch.testing.assert_close(logp, full_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, full_entropy, rtol=1e-5, atol=1e-5)
    assert grads.keys() == full_grads.keys()
    for name, g in grads.items():
        scale = full_grads[name].abs().max().clamp(min=1e-12)
        assert float((g - full_grads[name]).abs().max() / scale) < 1e-5, name


def test_forward_goes_through_the_head_module_and_leaves_it_as_it_was():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    seen = []
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))  # as FSDP's unshard hook
    completion_logprobs(model, *batch(len(tok)), ForwardSettings(temperature=1.0, chunk_size=8))
    assert len(seen) >= 1
    assert "forward" not in vars(model.lm_head)  # the instance override is gone
    assert model(torch.tensor([[4, 5]])).logits.shape[-1] == len(tok)
    hooked = tiny_causal_lm(tok, hidden_size=32)
    hooked.lm_head.forward = hooked.lm_head.forward  # as accelerate's offloading hooks install themselves
    assert lean_head(hooked) is None


def test_a_model_that_post_processes_its_logits_falls_back_to_them():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    data = batch(len(tok))
    model.register_forward_hook(lambda m, args, out: out.__setitem__("logits", out.logits * 0.5) or out)
    full, _ = completion_logprobs(model, *data, ForwardSettings(temperature=1.0, chunk_size=0))
    with pytest.warns(UserWarning, match="using full logits"):
        checked, _ = completion_logprobs(model, *data, ForwardSettings(temperature=1.0, chunk_size=8))
    assert _VERIFIED[model.lm_head] is False
    chunked, _ = completion_logprobs(model, *data, ForwardSettings(temperature=1.0, chunk_size=8))
    torch.testing.assert_close(checked, full)
    torch.testing.assert_close(chunked, full)


def test_the_check_needs_a_token_and_compares_the_same_forward():
    tok = char_tokenizer()
    # Dropout on: two forward passes would differ, the check must not mistake that for post-processing.
    model = tiny_causal_lm(tok, hidden_size=32, attention_dropout=0.5).train()
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch(len(tok))
    completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, torch.zeros_like(completion_mask),
                        ForwardSettings(temperature=1.0, chunk_size=8))
    assert model.lm_head not in _VERIFIED  # nothing to compare: no verdict
    completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                        ForwardSettings(temperature=1.0, chunk_size=8))
    assert _VERIFIED[model.lm_head] is True


def test_heads_that_are_not_plain_linear_keep_the_full_logits():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    assert lean_head(model) is model.lm_head

    class Adapted(nn.Linear):  # a PEFT/LoRA or quantized layer subclasses or replaces nn.Linear
        pass

    adapted = tiny_causal_lm(tok, hidden_size=32)
    adapted.lm_head.__class__ = Adapted
    assert lean_head(adapted) is None
    capped = tiny_causal_lm(tok, hidden_size=32)
    capped.config.final_logit_softcapping = 30.0
    assert lean_head(capped) is None
    wrapped = nn.Module()
    wrapped.module = model  # DDP's attribute
    assert lean_head(wrapped) is model.lm_head


def test_chunked_path_only_when_the_vocabulary_spans_more_than_one_chunk(monkeypatch):
    import sapo.model.logprobs as module

    calls = []
    real = module.token_logprobs
    monkeypatch.setattr(module, "token_logprobs", lambda *a, **k: calls.append(k["chunk_size"]) or real(*a, **k))
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    data = batch(len(tok))
    completion_logprobs(model, *data, ForwardSettings(temperature=1.0, chunk_size=len(tok)))
    completion_logprobs(model, *data, ForwardSettings(temperature=1.0, chunk_size=0))
    assert calls == []
    completion_logprobs(model, *data, ForwardSettings(temperature=1.0, chunk_size=len(tok) - 1))
    assert calls and set(calls) == {len(tok) - 1}


def test_a_model_without_logits_to_keep_is_called_once_without_it():
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32)
    calls = []

    class Old(nn.Module):  # a model class that predates logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            calls.append(1)
            return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    data = batch(len(tok))
    logp, _ = completion_logprobs(Old(), *data, ForwardSettings(temperature=1.0))
    torch.testing.assert_close(logp, completion_logprobs(model, *data, ForwardSettings(temperature=1.0))[0])
    assert len(calls) == 1


def test_a_type_error_inside_the_model_is_raised_without_a_second_forward():
    calls = []

    class Broken(nn.Module):
        def forward(self, **kwargs):
            calls.append(1)
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    with pytest.raises(TypeError, match="unsupported operand"):
        completion_logprobs(Broken(), *batch(20), ForwardSettings(temperature=1.0))
    assert len(calls) == 1
