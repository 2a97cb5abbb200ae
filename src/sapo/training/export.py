"""`sapo export`: a checkpoint, sharded (fsdp=true) or not, as a model directory that
`AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..model.loading import DCP_DIR, load_model, load_tokenizer
from .checkpoint import verify_checkpoint
from .sharded_checkpoint import is_sharded_checkpoint


def export_model(checkpoint: Path, out: Path, dtype: str | None = None) -> Path:
    """A `save_pretrained` directory (safetensors weights, config, generation config, tokenizer
    and its chat template) from a checkpoint, sharded or not, in one process; `dtype` casts the
    weights ("bfloat16", "float16", "float32"; None keeps float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / "config.json").is_file():
        raise ConfigError(f"{checkpoint} is not a checkpoint or model directory (no config.json)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; sapo export writes only into a new or empty "
                          "directory")
    cast = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in cast:
        raise ConfigError(f"--dtype {dtype!r} is not one of float32, bfloat16, float16")
    if (checkpoint / "manifest.json").is_file():  # a checkpoint, not a model directory: every file intact
        verify_checkpoint(checkpoint, num_processes=1)
    if is_sharded_checkpoint(checkpoint):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint), dtype=torch.float32)
        _read_sharded_weights(checkpoint, model)
    else:
        model = load_model(checkpoint)
    if cast[dtype] is not None:
        model = model.to(cast[dtype])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(checkpoint).save_pretrained(out)
    if (checkpoint / "generation_config.json").is_file():
        (out / "generation_config.json").write_bytes((checkpoint / "generation_config.json").read_bytes())
    return out


def _read_sharded_weights(checkpoint: Path, model) -> None:
    """Every weight of `model` from the checkpoint's DCP shards (without a process group: DCP
    reads all shards into this process). A weight tied to another one (the output layer to the
    embeddings) is stored once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    reader = FileSystemReader(str(checkpoint / DCP_DIR))
    stored = {key.removeprefix("model.") for key in reader.read_metadata().state_dict_metadata
              if key.startswith("model.")}
    own = model.state_dict()
    missing = [k for k in own if k not in stored and not _tied(model, k, stored)]
    if missing:
        raise CheckpointError(f"{checkpoint / DCP_DIR} holds no {missing[0]} (and {len(missing) - 1} more) for "
                              f"{type(model).__name__}: not a checkpoint of this model")
    state = {"model": {k: v for k, v in own.items() if k in stored}}
    with warnings.catch_warnings():  # that there is no process group: reading in one process is the point
        warnings.filterwarnings("ignore", message=r"torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
    model.load_state_dict(state["model"], strict=False)
    model.tie_weights()


def _tied(model, key: str, stored: set[str]) -> bool:
    """Whether parameter `key` is the same tensor as a stored one."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return key in params and any(params.get(k) is params[key] for k in stored)
