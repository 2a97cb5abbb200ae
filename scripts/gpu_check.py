"""The GPU check: what sapo-rl does on one GPU, measured, in one command.

    PYTHONPATH=src python scripts/gpu_check.py OUT_DIR [--small]

1. demo: the shipped demo for 20 steps on CUDA with bfloat16 autocast (dtype=bfloat16).
2. rollout: a random model of Qwen3-1.7B's shape in bfloat16 samples 8 prompts x 8 completions
   of 256 + 1024 tokens (EOS never drawn) with the `hf` engine: tokens/s and peak memory.
3. update: one `policy_update` optimizer step over 64 samples of 256 + 2048 tokens of that
   shape, sharded over one process with FSDP2 (param_dtype bfloat16, float32 masters and AdamW),
   chunked log-probs, padding-free rows, micro-batches of 16384 tokens, gradient checkpointing
   off and on: seconds, tokens/s, peak memory and MFU (6 x parameters x tokens / seconds / the
   GPU's dense bfloat16 peak, each prompt counted once per group as padding-free rows share it;
   the recomputation of checkpointing is not counted as useful work).
4. fsdp: the shipped model loaded with `load_sharded` (one process, bfloat16 MixedPrecisionPolicy),
   one update, a sharded checkpoint saved and read back, and exported.

Needs torch, transformers and accelerate (and this repository on PYTHONPATH); downloads nothing.
Each part writes its result (or its error) to OUT_DIR/gpu_check.json as soon as it ends, so one
failing part loses nothing else. `--small` runs every part with tiny shapes on whatever device
there is (a CPU, with gloo): the check of this script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

# Dense bfloat16 peaks (no sparsity), from the vendors' data sheets, in FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def qwen3_shape(small: bool):
    from transformers import Qwen3Config

    if small:
        return Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=1000, tie_word_embeddings=True)
    return Qwen3Config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=40960)


def part_demo(out: Path, small: bool, device: torch.device) -> dict:
    from sapo.demo import demo_config
    from sapo.training.trainer import Trainer

    steps = 2 if small else 20
    config = demo_config([f"max_steps={steps}", f"eval_steps={steps}", "dtype=bfloat16" if device.type == "cuda"
                          else "dtype=float32", f"output_dir={out / 'demo'}", "eval_num_generations=2"])
    t0 = time.perf_counter()
    history = Trainer(config).train()
    seconds = time.perf_counter() - t0
    last = history[-1]
    return {"steps": steps, "seconds": seconds, "seconds_per_step": seconds / steps, "reward_last": last.get("reward"),
            "eval_pass@1_before": history[0].get("eval/pass@1"), "eval_pass@1_after": last.get("eval/pass@1")}


def part_rollout(small: bool, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM

    from sapo.engines import HFEngine, SamplingSettings

    Q, G, P, T = (2, 2, 8, 16) if small else (8, 8, 256, 1024)
    config = qwen3_shape(small)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device.type == "cuda"
                                                 else torch.float32)
    prompts = torch.randint(1, config.vocab_size, (Q, P)).tolist()
    engine = HFEngine(model, eos_token_id=-1, pad_token_id=0, device=device)  # -1: EOS is never drawn
    reset_peak(device)
    t0 = time.perf_counter()
    generation = engine.generate(prompts, G, SamplingSettings(max_new_tokens=T, temperature=1.0), list(range(Q)))
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = int(generation.completion_mask.sum())
    del model
    return {"prompts": Q, "group_size": G, "prompt_tokens": P, "new_tokens": T, "generated_tokens": tokens,
            "seconds": seconds, "tokens_per_second": tokens / seconds, "peak_gb": peak_gb(device)}


def init_one_process(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def random_rollout(vocab: int, Q: int, G: int, P: int, T: int, device: torch.device):
    from sapo.training.rollout import Rollout

    prompts = torch.randint(1, vocab, (Q, P), device=device).repeat_interleave(G, 0)
    completions = torch.randint(1, vocab, (Q * G, T), device=device)
    ones = lambda t: torch.ones_like(t)  # noqa: E731
    return Rollout(prompts, ones(prompts), completions, ones(completions),
                   torch.zeros(Q * G, dtype=torch.bool, device=device), list(range(Q * G)))


def part_update(small: bool, device: torch.device, checkpointing: bool) -> dict:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from sapo.algorithms import LossSettings
    from sapo.model.logprobs import ForwardSettings
    from sapo.model.sharding import ModelSettings, enable_gradient_checkpointing, shard
    from sapo.training.update import PolicyState, UpdateSettings, policy_update

    Q, G, P, T, budget = (2, 4, 8, 16, 64) if small else (8, 8, 256, 2048, 16384)
    init_one_process(device)
    acc = Accelerator(cpu=device.type == "cpu")
    config = qwen3_shape(small)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    if checkpointing:
        enable_gradient_checkpointing(model)
    shard(model, ModelSettings(fsdp=True, param_dtype="bfloat16"), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    forward = ForwardSettings(chunk_size=8192, padding_free=True, max_tokens_per_micro_batch=budget)
    settings = UpdateSettings(group_size=G, num_minibatches=1, num_iterations=1, max_grad_norm=1.0,
                              max_nonfinite_steps=0, mask_truncated_completions=False, seed=0, learning_rate=1e-6,
                              loss=LossSettings(max_tokens=T), forward=forward)
    rollout = random_rollout(config.vocab_size, Q, G, P, T, device)
    advantages = torch.randn(Q * G, device=device)
    state = PolicyState(model, optimizer, scheduler, acc)
    policy_update(state, rollout, advantages, settings)  # warm-up: kernels, allocator, padding-free check
    reset_peak(device)
    t0 = time.perf_counter()
    result = policy_update(state, rollout, advantages, settings)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = Q * G * (P + T)
    # Useful work: padding-free rows compute a shared prompt once per row, not once per sample, so
    # MFU counts each prompt once per group (a lower bound of the positions actually computed).
    useful = Q * P + Q * G * T
    peak = peak_flops()
    return {"parameters": params, "samples": Q * G, "tokens": tokens, "gradient_checkpointing": checkpointing,
            "seconds_per_optimizer_step": seconds, "tokens_per_second": tokens / seconds, "peak_gb": peak_gb(device),
            "mfu": 6 * params * useful / seconds / peak if peak else None, "loss": result.metrics["loss"],
            "grad_norm": result.metrics["grad_norm"]}


def part_fsdp(out: Path, device: torch.device) -> dict:
    from accelerate import Accelerator

    from sapo.algorithms import LossSettings
    from sapo.demo import shipped_model_path
    from sapo.model.logprobs import ForwardSettings
    from sapo.model.sharding import ModelSettings, load_sharded
    from sapo.training.export import export_model
    from sapo.training.sharded_checkpoint import load_sharded_state, save_sharded_state
    from sapo.training.update import PolicyState, UpdateSettings, policy_update

    init_one_process(device)
    acc = Accelerator(cpu=device.type == "cpu")
    model = load_sharded(shipped_model_path(), ModelSettings(fsdp=True, param_dtype="bfloat16"), device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    settings = UpdateSettings(group_size=4, num_minibatches=2, num_iterations=1, max_grad_norm=1.0,
                              max_nonfinite_steps=0, mask_truncated_completions=False, seed=0, learning_rate=1e-3,
                              loss=LossSettings(max_tokens=6), forward=ForwardSettings(micro_batch_size=4))
    rollout = random_rollout(model.config.vocab_size, 2, 4, 6, 6, device)
    result = policy_update(PolicyState(model, optimizer, scheduler, acc), rollout, torch.randn(8, device=device),
                           settings)
    directory = out / "fsdp_checkpoint"
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    from sapo.model.loading import load_tokenizer

    load_tokenizer(shipped_model_path()).save_pretrained(directory)
    save_sharded_state(directory, model, optimizer)
    before = [p.detach().full_tensor().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_sharded_state(directory, model, optimizer)
    restored = all(torch.equal(a, p.detach().full_tensor()) for a, p in zip(before, model.parameters()))
    exported = export_model(directory, out / "fsdp_export", dtype="bfloat16")
    return {"loss": result.metrics["loss"], "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "restored_exactly": restored, "exported": sorted(p.name for p in exported.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--small", action="store_true", help="tiny shapes, any device: a check of this script")
    parser.add_argument("--parts", default="demo,rollout,update,update_checkpointing,fsdp")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "small": args.small}
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        pass
    work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.out))
    parts = {"demo": lambda: part_demo(work, args.small, device),
             "rollout": lambda: part_rollout(args.small, device),
             "update": lambda: part_update(args.small, device, checkpointing=False),
             "update_checkpointing": lambda: part_update(args.small, device, checkpointing=True),
             "fsdp": lambda: part_fsdp(work, device)}
    failed = False
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            report[name] = parts[name]()
        except Exception as err:  # noqa: BLE001 - recorded, and the other parts still run
            failed = True
            report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        report[name]["wall_seconds"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({name: {k: v for k, v in report[name].items() if k != "traceback"}}), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
