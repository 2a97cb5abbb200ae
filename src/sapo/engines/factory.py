"""Which engine samples the rollouts (rollout_engine, vllm_mode), built from its settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .base import RolloutEngine, VLLMSettings


@dataclass(frozen=True)
class EngineSettings:
    """What building the rollout engine reads of the config."""

    name: str
    """rollout_engine: "hf" or "vllm"."""
    dtype: str
    """rollout_dtype of the hf engine: "float32" (the policy itself) or "bfloat16" (a copy)."""
    vllm: VLLMSettings
    """The vLLM engine's settings (vllm_mode and TRL's vllm_* fields)."""


@dataclass
class EngineContext:
    """What an engine needs of the running trainer."""

    model: torch.nn.Module
    """The policy, unwrapped (the hf engine samples with it)."""
    tokenizer: object
    device: torch.device
    sync_root: Path
    """A directory of the run's own that a server engine writes weights under."""
    lockstep: bool = False
    """Every forward pass is collective (a sharded model): all processes decode in step."""
    process_index: int = 0
    local_process_index: int = 0
    num_processes: int = 1
    on_main: Callable[[Callable], object] = field(default=lambda action: action())
    """Runs an action on the main process only and raises its failure on every process (the
    others wait for it)."""


def _hf(settings: EngineSettings, ctx: EngineContext) -> RolloutEngine:
    from ..model.sharding import PARAM_DTYPES
    from .hf import HFEngine

    dtype = None if settings.dtype == "float32" else PARAM_DTYPES[settings.dtype]
    return HFEngine(ctx.model, eos_token_id=ctx.tokenizer.eos_token_id, pad_token_id=ctx.tokenizer.pad_token_id,
                    device=ctx.device, lockstep=ctx.lockstep, dtype=dtype)


def _vllm_server(settings: EngineSettings, ctx: EngineContext) -> RolloutEngine:
    from .vllm_server import VLLMServerEngine

    return VLLMServerEngine(settings.vllm, tokenizer=ctx.tokenizer, sync_root=ctx.sync_root, device=ctx.device,
                            on_main=ctx.on_main)


def _vllm_colocate(settings: EngineSettings, ctx: EngineContext) -> RolloutEngine:
    from .vllm_colocate import VLLMColocateEngine

    return VLLMColocateEngine(settings.vllm, pad_token_id=ctx.tokenizer.pad_token_id, device=ctx.device,
                              process_index=ctx.process_index, local_process_index=ctx.local_process_index,
                              num_processes=ctx.num_processes)


_BUILDERS = {("hf", None): _hf, ("vllm", "server"): _vllm_server, ("vllm", "colocate"): _vllm_colocate}


def build_engine(settings: EngineSettings, ctx: EngineContext) -> RolloutEngine:
    mode = settings.vllm.mode if settings.name == "vllm" else None
    return _BUILDERS[settings.name, mode](settings, ctx)
