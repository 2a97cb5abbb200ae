"""Run by tests/training/test_distributed.py under `torch.distributed.run` with 2 CPU processes (gloo):
`completion_logprobs` through a model sharded with FSDP2 (`fully_shard`) against the same model
unsharded. Each rank takes its own batch; FSDP averages the gradients over ranks, so the
reference is the unsharded model's gradient of the mean of both ranks' losses. Prints one JSON
line per call on rank 0."""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import Qwen2Config, Qwen2ForCausalLM

from sapo.model.logprobs import _VERIFIED, ForwardSettings, completion_logprobs, lean_head


def batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    prompt = torch.randint(3, 96, (3, 5), generator=g)
    completion = torch.randint(3, 96, (3, 6), generator=g)
    prompt_mask, completion_mask = torch.ones_like(prompt), torch.ones_like(completion)
    prompt_mask[0, :2] = 0  # left padding
    completion_mask[1, 4:] = 0  # right padding
    return prompt, prompt_mask, completion, completion_mask


def loss(logp_BC: torch.Tensor) -> torch.Tensor:
    return (logp_BC * torch.linspace(-1, 2, logp_BC.shape[1])).sum()


def main() -> None:
    tied = sys.argv[1] == "tied"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, tie_word_embeddings=tied)
    reference = Qwen2ForCausalLM(config)
    model = Qwen2ForCausalLM(config)
    model.load_state_dict(reference.state_dict())
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for call in range(2):  # the first call checks the chunked values against the logits, the second uses them
        model.zero_grad()
        reference.zero_grad()
        logp = completion_logprobs(model, *batch(rank), ForwardSettings(temperature=0.7, chunk_size=16))[0]
        loss(logp).backward()
        mean = sum(loss(completion_logprobs(reference, *batch(r), ForwardSettings(temperature=0.7))[0])
                   for r in range(world)) / world
        mean.backward()
        expected = completion_logprobs(reference, *batch(rank), ForwardSettings(temperature=0.7))[0]
        worst_grad = 0.0
        for (name, sharded), (_, plain) in zip(model.named_parameters(), reference.named_parameters()):
            grad = sharded.grad.full_tensor()
            worst_grad = max(worst_grad, ((grad - plain.grad).abs().max() / plain.grad.abs().max()).item())
        head = lean_head(model)
        if rank == 0:
            print(json.dumps({"call": call, "chunked": head is not None and bool(_VERIFIED.get(head)),
                              "value_error": (logp - expected).abs().max().item(), "grad_error": worst_grad}),
                  flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    # Skip interpreter teardown: gloo's threads can abort it ("terminate called without an active
    # exception") after everything above has finished, about one run in ten here.
    os._exit(0)
