"""Loading a policy (any AutoModelForCausalLM) and its tokenizer from a local directory."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from ..errors import ConfigError

_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# Where a sharded checkpoint keeps its torch.distributed.checkpoint shards (training/sharded_checkpoint.py).
DCP_DIR = "dcp"
DCP_METADATA = f"{DCP_DIR}/.metadata"


def load_tokenizer(path: str | Path):
    """The directory's tokenizer, padded on the left for generation.

    A directory that declares a generic fast tokenizer gets exactly that: transformers' own
    lookup would otherwise swap in the model family's tokenizer class for some model types
    (e.g. qwen2) and change how text is split.
    """
    _check_config_json(path)
    config_file = Path(path) / "tokenizer_config.json"
    try:
        declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    except (ValueError, AttributeError) as err:
        raise ConfigError(f"{config_file} is not a tokenizer config ({err}); copy the model again") from None
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
    """A damaged model directory (unreadable config.json, truncated weights) is a ConfigError
    naming the file, not a traceback from deep inside transformers."""
    from safetensors import SafetensorError

    _check_config_json(path)
    if (Path(path) / DCP_METADATA).is_file():
        raise ConfigError(f"{path} is a sharded (fsdp=true) checkpoint, not a model directory: `sapo export {path} "
                          "--out DIR` writes one (or resume it with fsdp=true)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"model {path}: {_damaged_file(path) or err}; copy the model again or save it "
                          "with save_pretrained") from None
    model.config.use_cache = True
    return model


def _check_config_json(path: str | Path) -> None:
    file = Path(path) / "config.json"
    try:
        loaded = json.loads(file.read_bytes())
    except FileNotFoundError:
        return  # transformers' own message says what is missing
    except (OSError, ValueError) as err:
        raise ConfigError(f"{file} is not valid JSON ({err}); copy the model again or save it with "
                          "save_pretrained") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{file} is not a model config (a JSON object); copy the model again or save it with "
                          "save_pretrained")


def _damaged_file(path: str | Path) -> str | None:
    """Which weight file of `path` fails to open, and why (its header names the bytes it needs)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{file} is truncated or corrupt ({err})"
    return None


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


def check_sequence_lengths(model_config, max_prompt_length: int, max_completion_length: int) -> None:
    """Refuse lengths the model cannot hold: past its learned positions a model indexes out of
    range mid-run (GPT-2 style) or silently extrapolates its rotary positions (Qwen, Llama)."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    positions = getattr(text_config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return  # the model states no limit
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None)
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        # YaRN, linear or dynamic scaling stretch the positions a model was trained on by `factor`
        # (Qwen2.5's long-context setting keeps max_position_embeddings at 32768)
        # Llama 3.1 / DeepSeek configs already state the stretched length, with the original beside it.
        factor = float(rope.get("factor") or 1.0)
        original = rope.get("original_max_position_embeddings")
        positions = max(positions, int(original * factor)) if isinstance(original, int) else int(positions * factor)
    if max_prompt_length + max_completion_length > positions:
        raise ConfigError(f"max_prompt_length={max_prompt_length} + max_completion_length={max_completion_length} "
                          f"= {max_prompt_length + max_completion_length} tokens exceed the model's "
                          f"{positions} positions (max_position_embeddings, times any rope scaling factor); "
                          "lower one of them so that a prompt and its completion fit")
