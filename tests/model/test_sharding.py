"""What sharding refuses up front, with the fix (the sharded runs themselves: training/test_fsdp.py)."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sapo.errors import ConfigError
from sapo.model.sharding import (
    compute_dtype,
    decoder_layer_classes,
    enable_gradient_checkpointing,
    max_over_processes,
)


def tiny():
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=32))


def test_the_decoder_layers_are_found_by_the_models_own_declaration():
    model = tiny()
    assert [c.__name__ for c in decoder_layer_classes(model)] == ["Qwen2DecoderLayer"]
    model._no_split_modules = None
    with pytest.raises(ConfigError, match=r"fsdp=true: Qwen2ForCausalLM declares no decoder layer to shard "
                                          r"\(_no_split_modules .*\); train it with fsdp=false"):
        decoder_layer_classes(model)


def test_gradient_checkpointing_of_a_model_without_it_is_refused():
    model = tiny()
    enable_gradient_checkpointing(model)
    assert model.model.gradient_checkpointing
    model.supports_gradient_checkpointing = False
    with pytest.raises(ConfigError, match=r"gradient_checkpointing=true: Qwen2ForCausalLM does not support it"):
        enable_gradient_checkpointing(model)


def test_one_process_is_its_own_maximum_and_an_unsharded_model_computes_in_its_dtype():
    assert max_over_processes(7, torch.device("cpu")) == 7
    assert compute_dtype(tiny()) == torch.float32


def test_a_sharded_checkpoint_is_not_loaded_as_a_model_directory(tmp_path):
    from sapo.model.loading import load_model

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is a sharded \(fsdp=true\) checkpoint, not a model directory: `sapo "
                                          r"export .* --out DIR` writes one"):
        load_model(tmp_path)
