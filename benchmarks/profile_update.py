"""Where one optimizer step of the demo's policy update spends its time: forward (log-probs),
objective, backward, gradient clipping, optimizer, on the shipped model with the demo's
minibatch shape (32 sequences, 6 prompt + 6 completion tokens), and the top operators.

    python benchmarks/profile_update.py [--steps 50] [--chunk-size 0] [--compile]

Every row is full (random prompts, no padding, no prompt shared), so this is the model math of
one padded minibatch; benchmarks/padding_free.py measures what padding-free rows save on real
rollouts.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--chunk-size", type=int, default=0, help="logprob_chunk_size (0: full logits)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=6)
    parser.add_argument("--completion-len", type=int, default=6)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model first (prints the warm-up)")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from sapo import policy_loss
    from sapo.demo import shipped_model_path
    from sapo.model.loading import load_model
    from sapo.model.logprobs import ForwardSettings, completion_logprobs

    torch.manual_seed(0)
    model = load_model(str(shipped_model_path())).train()
    if args.compile:
        model.compile(dynamic=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    V = model.config.vocab_size
    prompt = torch.randint(3, V, (args.batch, args.prompt_len))
    completion = torch.randint(3, V, (args.batch, args.completion_len))
    prompt_mask, completion_mask = torch.ones_like(prompt), torch.ones_like(completion)
    advantages = torch.randn(args.batch)
    phases = dict.fromkeys(("forward", "objective", "backward", "clip", "optimizer"), 0.0)

    def step(record: bool) -> None:
        t = [time.perf_counter()]
        logp, _ = completion_logprobs(model, prompt, prompt_mask, completion, completion_mask,
                                      ForwardSettings(temperature=1.0, chunk_size=args.chunk_size), with_entropy=True)
        t.append(time.perf_counter())
        out = policy_loss(logp, logp.detach() + 0.01, advantages, completion_mask, loss_type="sapo")
        t.append(time.perf_counter())
        out.loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if record:
            for name, a, b in zip(phases, t, t[1:]):
                phases[name] += b - a

    started = time.perf_counter()
    for _ in range(10):
        step(False)
    print(f"warm-up (10 steps{', compilation included' if args.compile else ''}): "
          f"{time.perf_counter() - started:.1f} s")
    for _ in range(args.steps):
        step(True)
    total = sum(phases.values())
    print(f"shipped model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params), minibatch "
          f"{args.batch} x ({args.prompt_len} + {args.completion_len}) tokens, threads {torch.get_num_threads()}")
    print(f"{'phase':<10} {'ms / optimizer step':>19} {'share':>6}")
    for name, seconds in phases.items():
        print(f"{name:<10} {1000 * seconds / args.steps:>19.2f} {seconds / total:>6.0%}")
    print(f"{'total':<10} {1000 * total / args.steps:>19.2f}\n")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step(False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
