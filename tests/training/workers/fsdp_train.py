"""Run by tests/training/test_fsdp.py under `torch.distributed.run` with 2 CPU processes (gloo):
training runs with fsdp=true, one after the other in the same processes, as the JSON plan
(argv[1]) lists them, then the checks that need the processes themselves. Rank 0 writes what it
found to argv[2]. A hang fails the test through its timeout."""

import errno
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import sapo
from sapo.engines import HFEngine, SamplingSettings
from sapo.errors import CheckpointError
from sapo.model.sharding import ModelSettings, load_sharded
from sapo.training import checkpoint, micro_batches
from sapo.training.rollout import Rollout
from sapo.training.settings import RunSettings
from sapo.training.sharded_checkpoint import load_sharded_state, save_sharded_state
from sapo.training.update import PolicyState, policy_update


def full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.contiguous() for k, v in state.items()}


def train_runs(plan: dict, out: Path, found: dict) -> dict:
    trainers = {}
    for name, config in plan["runs"].items():
        trainer = trainers[name] = sapo.Trainer(sapo.TrainConfig(**config))
        trainer.train()
        state = full_state(trainer.model)  # collective: every process
        found[name] = {"param_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
                       "sharded": all(type(p).__name__ == "DTensor" for p in trainer.model.parameters())}
        if dist.get_rank() == 0:
            save_file(state, out / f"{name}.safetensors")
    return trainers


def failed_save(trainer, found: dict) -> None:
    """A full disk on process 1 alone while it writes its RNG state: both processes raise, the
    temporary directory is gone and the previous checkpoint is intact."""
    real = checkpoint._torch_save

    def full_disk(obj, path):
        if dist.get_rank() == 1 and path.name.startswith("rng_state"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path)

    checkpoint._torch_save = full_disk
    try:
        trainer.save(3)
        message = None
    except CheckpointError as err:
        message = str(err)
    finally:
        checkpoint._torch_save = real
    root = Path(trainer.config.output_dir)
    checkpoint.verify_checkpoint(root / "checkpoint-2", num_processes=2)  # raises if it were damaged
    found[f"failed_save_rank{dist.get_rank()}"] = {"message": message, "left": sorted(p.name for p in root.iterdir()
                                                                                       if "checkpoint" in p.name)}


def fixed_rollout(vocab: int, rank: int) -> tuple[Rollout, torch.Tensor]:
    """Process 0's completions are long, process 1's one token each: packed by a token budget,
    they make different numbers of micro-batches."""
    g = torch.Generator().manual_seed(10 + rank)
    B, P, T = 6, 4, 5
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[::2, :1] = 0
    lengths = torch.tensor([5, 2, 4, 1, 5, 3] if rank == 0 else [1] * 6)
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    rollout = Rollout(torch.randint(3, vocab, (B, P), generator=g), prompt_mask,
                      torch.randint(3, vocab, (B, T), generator=g) * completion_mask, completion_mask,
                      torch.zeros(B, dtype=torch.bool), list(range(B)))
    return rollout, torch.randn(B, generator=g)


def bf16_against_fp32(plan: dict, out: Path, found: dict) -> None:
    """Two SGD steps of policy_update on a fixed rollout, parameters gathered in float32 and in
    bfloat16: the updates (parameter changes) of both."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    settings = RunSettings.from_config(sapo.TrainConfig(**plan["update_config"])).update
    real_split_to, counts = micro_batches.split_to, []

    def recording_split_to(parts, lengths, count):
        counts.append((len(parts), count))
        return real_split_to(parts, lengths, count)

    micro_batches.split_to = recording_split_to
    for dtype in ("float32", "bfloat16"):
        model = load_sharded(plan["model"], ModelSettings(fsdp=True, param_dtype=dtype), acc.device)
        before = full_state(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        rollout, advantages = fixed_rollout(model.config.vocab_size, dist.get_rank())
        result = policy_update(PolicyState(model, optimizer, scheduler, acc), rollout, advantages, settings)
        after = full_state(model)
        found[f"update_{dtype}"] = {"loss": result.metrics["loss"],
                                    "param_dtypes": sorted({str(p.dtype) for p in model.parameters()})}
        if dist.get_rank() == 0:
            save_file({k: after[k] - before[k] for k in after}, out / f"update_{dtype}.safetensors")
    micro_batches.split_to = real_split_to
    found[f"micro_batch_counts_rank{dist.get_rank()}"] = counts


def unstepped_optimizer(plan: dict, out: Path, found: dict) -> None:
    """A sharded checkpoint of an optimizer that never stepped, saved and read back: it stays
    without state (torch would otherwise give it a first step)."""
    from accelerate import Accelerator

    model = load_sharded(plan["model"], ModelSettings(fsdp=True), Accelerator(cpu=True).device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    save_sharded_state(out / "unstepped", model, optimizer)
    empty_after_save = not optimizer.state
    load_sharded_state(out / "unstepped", model, optimizer)
    found["unstepped_optimizer"] = [empty_after_save, not optimizer.state]


def lockstep_decoding(plan: dict, found: dict) -> None:
    """Greedy decoding where rank 0 stops at once (its EOS is the first token it draws) and rank 1
    never does: without lockstep rank 1 would wait forever in rank 0's next parameter gather."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = load_sharded(plan["model"], ModelSettings(fsdp=True), acc.device, trainable=False)
    prompts = [[5, 6, 7]]
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([prompts[0]])).logits[0, -1].argmax())
    eos = first if dist.get_rank() == 0 else -1
    engine = HFEngine(model, eos_token_id=eos, pad_token_id=0, device=acc.device, lockstep=True)
    lengths = []
    for shared_prefill in (True, False):  # the shared-prompt sampler and model.generate
        engine.shared_prefill = shared_prefill
        generation = engine.generate(prompts, 1, SamplingSettings(max_new_tokens=6, temperature=0.0), [0])
        lengths.append(generation.completion_mask.sum(-1).tolist())
    found[f"lockstep_rank{dist.get_rank()}"] = lengths


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    found: dict = {}
    trainers = train_runs(plan, out, found)
    failed_save(trainers["dense"], found)
    bf16_against_fp32(plan, out, found)
    lockstep_decoding(plan, found)
    unstepped_optimizer(plan, out, found)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, found)
    if dist.get_rank() == 0:
        (out / "found.json").write_text(json.dumps({**gathered[1], **gathered[0]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
