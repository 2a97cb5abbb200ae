"""Per-process memory of the training state (float32 parameters, gradients and AdamW's two
moments) for Qwen3 shapes, at 1, 8 and 64 processes: replicated (fsdp=false: one process, or
DDP), sharded (fsdp=true) and sharded with offloading (cpu_offload=true, where the same shards
live in host memory).

Nothing is downloaded and nothing is allocated: each model is built from its config on the meta
device and sharded with `fully_shard` exactly as sapo-rl shards it (model/sharding.py: each
decoder layer, then the root) over a fake process group of the given size; AdamW then takes one
step on the meta tensors. The bytes are summed over the tensors process 0 actually holds (its
local shards of parameters, gradients and optimizer state), not taken from a formula. The last
column is the largest unit FSDP gathers at once (a decoder layer, or the root's embeddings and
output layer) in bfloat16: transient memory on top, like the activations, which are not counted.

    python benchmarks/memory.py [--shapes Qwen3-8B] [--worlds 1,8,64]
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

from sapo.model.sharding import decoder_layer_classes

# The published configs' shapes (hidden size, layers, heads, experts, vocabulary).
SHAPES = {
    "Qwen3-0.6B": lambda: Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                      num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                      vocab_size=151936, tie_word_embeddings=True),
    "Qwen3-1.7B": lambda: Qwen3Config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                      num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                      vocab_size=151936, tie_word_embeddings=True),
    "Qwen3-8B": lambda: Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                    tie_word_embeddings=False),
    "Qwen3-30B-A3B": lambda: Qwen3MoeConfig(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                            num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                            head_dim=128, num_experts=128, num_experts_per_tok=8,
                                            vocab_size=151936, tie_word_embeddings=False),
}
GB = 1e9


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def state_bytes(config, world: int, fsdp: bool) -> tuple[int, int, int, int]:
    """(parameters, parameters', gradients', optimizer state') bytes on process 0, and the
    largest gathered unit's bfloat16 bytes."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    count = sum(p.numel() for p in model.parameters())
    units = [model]
    if fsdp:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        layers = [m for m in model.modules() if isinstance(m, decoder_layer_classes(model))]
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        units = layers + [model]
    try:
        params = list(model.parameters())
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-6, foreach=False)
        optimizer.step()
        moments = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
        own = {id(p) for u in units[:-1] for p in u.parameters()}
        root_only = sum(p.numel() for p in units[-1].parameters() if id(p) not in own)
        layer_max = max((sum(p.numel() for p in u.parameters()) for u in units[:-1]), default=0)
        gathered = 2 * max(layer_max, root_only) if fsdp else 0
        return count, local_bytes(params), local_bytes(p.grad for p in params), local_bytes(moments), gathered
    finally:
        if fsdp:
            dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--worlds", default="1,8,64")
    args = parser.parse_args()
    print(f"{'shape':<14} {'params':>7} {'procs':>5} {'mode':<12} {'device GB':>9} {'host GB':>8} "
          f"{'(params':>8} {'grads':>6} {'AdamW)':>7} {'gathered GB':>11}")
    for name in args.shapes.split(","):
        config = SHAPES[name]()
        for world in (int(w) for w in args.worlds.split(",")):
            for mode in ("replicated", "fsdp", "fsdp+offload"):
                count, params, grads, optim, gathered = state_bytes(config, world, fsdp=mode != "replicated")
                total = params + grads + optim
                device, host = (0, total) if mode == "fsdp+offload" else (total, 0)
                print(f"{name:<14} {count / 1e9:>6.2f}B {world:>5} {mode:<12} {device / GB:>9.2f} {host / GB:>8.2f} "
                      f"{params / GB:>8.2f} {grads / GB:>6.2f} {optim / GB:>7.2f} {gathered / GB:>11.3f}")


if __name__ == "__main__":
    main()
