"""Holding a model that does not fit one process: PyTorch's FSDP2 (`fully_shard`) over each
decoder layer and the root, with `MixedPrecisionPolicy` and `CPUOffloadPolicy`, loaded from one
full copy on the main process, plus activation checkpointing. The training loop sees a module
whose forward and backward gather and scatter its parameters; every such call is collective,
so every process must make the same calls (see docs/scaling.md)."""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError
from .loading import disable_dropout, load_model

PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSettings:
    """How the policy is held in memory (the config's fsdp, param_dtype, cpu_offload and
    gradient_checkpointing)."""

    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the processes with `fully_shard`."""
    param_dtype: str = "float32"
    """Dtype of the gathered parameters in forward and backward (FSDP only); the sharded masters,
    the reduced gradients and the optimizer state stay float32."""
    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in host memory (FSDP only)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (non-reentrant)."""


# The dtype a sharded model computes in (its MixedPrecisionPolicy), where it is not its parameters'.
_COMPUTE_DTYPE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def compute_dtype(model) -> torch.dtype:
    """The dtype of the weights a forward pass multiplies with: a sharded model's param_dtype."""
    return _COMPUTE_DTYPE.get(model) or next(model.parameters()).dtype


def decoder_layer_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes of the blocks to shard one by one: the model's `_no_split_modules` (the decoder
    layer of every transformers model), as accelerate and verl find them."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    if not classes:
        raise ConfigError(f"fsdp=true: {type(model).__name__} declares no decoder layer to shard (_no_split_modules "
                          "is empty or names no module of it); train it with fsdp=false")
    return classes


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing of each decoder layer (transformers 5.24 renamed
    gradient_checkpointing_enable to activation_checkpointing_enable)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing=true: {type(model).__name__} does not support it; set "
                          "gradient_checkpointing=false")
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard(model: nn.Module, settings: ModelSettings, device: torch.device) -> nn.Module:
    """`fully_shard` every decoder layer, then the root (embeddings, final norm, output layer),
    over all processes, in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    param_dtype = PARAM_DTYPES[settings.param_dtype]
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
                   offload_policy=CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy())
    classes = decoder_layer_classes(model)
    for module in list(model.modules()):
        if isinstance(module, classes):
            fully_shard(module, **options)
    fully_shard(model, **options)
    if param_dtype != torch.float32:
        _COMPUTE_DTYPE[model] = param_dtype
    return model


def load_sharded(path: str | Path, settings: ModelSettings, device: torch.device, *, trainable: bool = True):
    """The model at `path`, sharded over all processes. Only the main process reads the weights
    (one full copy in host memory, not one per process); the others build it on the meta device,
    and the shards are sent from the main process. A load that fails there fails everywhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    main = dist.get_rank() == 0
    full, failure = None, None
    if main:
        try:
            full = load_model(path)
        except ConfigError as err:
            failure = err
        except Exception as err:  # noqa: BLE001 - any failure here must reach the waiting processes
            failure = ConfigError(f"model {path} could not be loaded: {type(err).__name__}: {err}")
    # The main process's config and generation config, so that every process builds the same model.
    failure, config, generation = _broadcast((failure, full.config, full.generation_config) if main and not failure
                                             else (failure, None, None))
    if failure is not None:
        raise failure
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = True
    model.generation_config = generation
    disable_dropout(model)
    if trainable and settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if not trainable:
        model.requires_grad_(False)
    shard(model, settings, device)
    model.to_empty(device="cpu" if settings.cpu_offload else device)
    set_model_state_dict(model, full.state_dict() if main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers that are not in the state dict (rotary frequencies) are what the main process computed.
    own = dict(full.named_buffers()) if main else {}
    for prefix, module in model.named_modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            if buffer.device != device:  # offloading keeps parameters on the host, not buffers
                buffer = module._buffers[name] = torch.empty_like(buffer, device=device)
            if main:
                buffer.copy_(own[f"{prefix}.{name}" if prefix else name])
            dist.broadcast(buffer, src=0)
    del full, own
    return model if trainable else model.eval()


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_processes(value: int, device: torch.device) -> int:
    """The largest `value` of all processes (itself when there is one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor(value, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gradient_sync(accelerator, model, sync: bool):
    """Where gradients are reduced: DDP reduces once per optimizer step (no_sync on the other
    micro-batches); a sharded model reduce-scatters after every micro-batch, since holding
    unsharded gradients until the last one would cost a full model's worth of memory."""
    if sync or is_sharded(model):
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def total_grad_norm(parameters: list[Tensor], device: torch.device) -> Tensor:
    """The 2-norm of all gradients as a plain tensor on the gradients' device. FSDP shards every
    parameter over the processes: the squares of each process's shards are summed over
    processes on `device` (offloaded shards are on the CPU, and an NCCL group reduces only
    CUDA tensors)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.get_total_norm(grads)
    local = local_tensors(grads)
    squares = torch.stack([n.to(device) for n in torch._foreach_norm(local)]).pow(2).sum()
    dist.all_reduce(squares)
    return squares.sqrt().to(local[0].device)


def local_tensors(tensors) -> list[Tensor]:
    """This process's shards of (possibly) sharded tensors."""
    from torch.distributed.tensor import DTensor

    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
