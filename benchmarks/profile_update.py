"""Where one optimizer step of the demo's policy update spends its time: forward (log-probs),
objective, backward, gradient clipping, optimizer, on the shipped model with the demo's
minibatch shape (32 sequences, 6 prompt + 6 completion tokens), and the top operators.

    python benchmarks/profile_update.py [--steps 50] [--chunk-size 0] [--shared-prefix]

Both frameworks in benchmarks/vs_trl.py run this same model math in their update phase; this
shows how much of it is the model itself. `--shared-prefix` also times what the trainer does
not do: the model's forward and backward with each prompt computed once for the samples of it
in the minibatch (one row per prompt, its completions after it, a block attention mask), against
the usual one row per sample, to size that saving.
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
    parser.add_argument("--shared-prefix", action="store_true",
                        help="also time the forward/backward with each prompt shared by its samples")
    parser.add_argument("--samples-per-prompt", type=int, default=2,
                        help="with --shared-prefix: samples of one prompt in a minibatch (the demo: G 8 / 4 minibatches)")
    args = parser.parse_args()
    if args.shared_prefix and not 1 <= args.samples_per_prompt <= args.batch:
        parser.error("--samples-per-prompt must be between 1 and --batch")

    from torch.profiler import ProfilerActivity, profile

    from sapo import policy_loss
    from sapo.demo import shipped_model_path
    from sapo.logprobs import completion_logprobs
    from sapo.models import load_model

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
        logp, _ = completion_logprobs(model, prompt, prompt_mask, completion, completion_mask, 1.0,
                                      with_entropy=True, chunk_size=args.chunk_size)
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
    if args.shared_prefix:
        shared_prefix(model, args)


def shared_prefix(model, args) -> None:
    """Forward + backward of the minibatch's completions (the objective's inputs, no optimizer)
    as one row per sample, and as one row per prompt holding the prompt once and then its k
    completions, each attending to the prompt and causally to itself (a 4D mask; the positions
    of every completion start after the prompt). Same tokens scored, fewer computed."""
    P, C, k = args.prompt_len, args.completion_len, args.samples_per_prompt
    rows = args.batch // k
    V = model.config.vocab_size
    prompts = torch.randint(3, V, (rows, P))
    completions = torch.randint(3, V, (rows, k, C))
    ids = torch.cat([prompts.repeat_interleave(k, 0), completions.flatten(0, 1)], 1)  # (rows * k, P + C)

    def per_sample() -> torch.Tensor:
        out = model(input_ids=ids, use_cache=False, logits_to_keep=C + 1)
        return out.logits[:, :-1]  # (rows * k, C, V): the logits that score the C completion tokens

    L = P + k * C
    segment = torch.tensor([0] * P + [j + 1 for j in range(k) for _ in range(C)])  # 0: prompt, j: completion j
    positions = torch.cat([torch.arange(P), torch.arange(P, P + C).repeat(k)]).expand(rows, L)
    causal = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
    mask = (causal & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))).expand(rows, 1, L, L)
    grouped = torch.cat([prompts, completions.flatten(1)], 1)  # (rows, P + k C)
    # Completion j's first token is scored from the prompt's last position, the others from its own.
    scoring = torch.stack([torch.cat([torch.tensor([P - 1]), P + j * C + torch.arange(C - 1)]) for j in range(k)])

    def per_prompt() -> torch.Tensor:
        out = model(input_ids=grouped, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.logits[:, scoring].flatten(0, 1)  # (rows * k, C, V), in per_sample's order

    torch.testing.assert_close(per_prompt(), per_sample(), rtol=1e-4, atol=1e-4)  # the same scores

    def timed(fn) -> float:
        for _ in range(5):
            fn().logsumexp(-1).sum().backward()
        started = time.perf_counter()
        for _ in range(args.steps):
            fn().logsumexp(-1).sum().backward()
        return 1000 * (time.perf_counter() - started) / args.steps

    a, b = timed(per_sample), timed(per_prompt)
    print(f"\nmodel forward + backward, {args.batch} samples = {rows} prompts x {k}, {P} + {C} tokens each:")
    print(f"  one row per sample:  {rows * k} x {P + C} = {rows * k * (P + C)} tokens  {a:6.2f} ms")
    print(f"  prompt shared:       {rows} x {L} = {rows * L} tokens  {b:6.2f} ms  ({b / a:.2f}x)")


if __name__ == "__main__":
    main()
