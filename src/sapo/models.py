"""Loading a policy (any AutoModelForCausalLM) and its tokenizer from a local directory."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path):
    """The directory's tokenizer, padded on the left for generation.

    A directory that declares a generic fast tokenizer gets exactly that: transformers' own
    lookup would otherwise swap in the model family's tokenizer class for some model types
    (e.g. qwen2) and change how text is split.
    """
    config_file = Path(path) / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if declared in _GENERIC_TOKENIZER_CLASSES:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


_MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


def mixed_precision(name: str) -> str:
    """accelerate's mixed_precision for the config's `dtype`: the weights and optimizer state stay
    float32 (updates of 1e-6 would round away in bf16 weights); forward passes run in `dtype`
    under autocast. "auto": bf16 on GPUs that support it, float32 elsewhere."""
    if name == "auto":
        name = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return _MIXED_PRECISION[name]


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.use_cache = True
    return model


def disable_dropout(model: PreTrainedModel) -> PreTrainedModel:
    """Behaviour log-probabilities are taken in eval mode; with dropout off the update's forward
    passes match them, and the first minibatch is on-policy up to the numerics of batching and
    the KV cache (logged as rollout/logprob_abs_diff)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # attention layers keep their rate as a float attribute (e.g. `attention_dropout`)
        for owner in (module, getattr(module, "config", None)):
            for key, value in list(vars(owner).items()) if owner is not None else []:
                if "dropout" in key and isinstance(value, float):
                    setattr(owner, key, 0.0)
    return model


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A reference policy: the same weights, no gradients, eval mode."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def forward_keeping_logits(model, keep: int, **kwargs):
    """model(**kwargs) computing the logits of the last `keep` positions only. A model class that
    predates `logits_to_keep` rejects it before computing anything and is called again without
    it (all logits); any other TypeError comes from inside the model and is raised at once."""
    try:
        return model(**kwargs, logits_to_keep=keep)
    except TypeError as error:
        if "logits_to_keep" not in str(error):
            raise
        return model(**kwargs)
