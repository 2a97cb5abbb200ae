"""Update time with and without MoE routing replay, side by side in one process.

    python benchmarks/routing_replay.py                   # tiny MoE and a larger random MoE, CPU
    python benchmarks/routing_replay.py --sizes large --device cuda

For each model (random Qwen3-MoE from a config, nothing downloaded): one synthetic rollout batch
(prompts x G samples, prompt and completion lengths below), its behaviour pass recorded once,
then the update phase (`policy_update`: num_minibatches optimizer steps, forward and backward
over every micro-batch) timed from the same weights for each variant, alternating, median of
--repeats:

  no hooks     the policy without routing hooks (the trainer before routing replay; a dense run)
  none         routing_replay=none: hooks compare each token's experts with the recorded ones
               (moe/routing_changed_frac, moe/load_entropy), nothing forced
  r2           routing_replay=r2: the recorded experts forced, gate weights recomputed
  r2 + aux     r2 with router_aux_loss_coef=0.01 (transformers' load-balancing loss)

and prints each variant's seconds and its overhead over "no hooks". The issue's target: r2
under 5% of the update time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch

SIZES = {  # hidden, layers, experts, top-k, expert width
    # the shipped moe-tiny's sizes (sapo warmstart --arch qwen3_moe)
    "tiny": dict(hidden_size=128, num_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128),
    "large": dict(hidden_size=256, num_layers=8, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128),
}


def build(size: str, device: str):
    from sapo.model.tiny import char_tokenizer, tiny_causal_lm

    spec = dict(SIZES[size])
    hidden, layers = spec.pop("hidden_size"), spec.pop("num_layers")
    tok = char_tokenizer()
    model = tiny_causal_lm(tok, "qwen3_moe", hidden_size=hidden, num_layers=layers, seed=0, **spec,
                           head_dim=32, num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 128))
    with torch.no_grad():  # away from the zero init, so tokens spread over the experts
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.02 * hidden ** 0.5, generator=torch.Generator().manual_seed(1))
    return model.to(device), len(tok)


def synthetic_rollout(vocab: int, prompts: int, G: int, P: int, C: int, device: str):
    from sapo.training.rollout import Rollout

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (prompts, P), generator=g).repeat_interleave(G, 0)
    completion = torch.randint(3, vocab, (prompts * G, C), generator=g)
    mask = torch.ones_like(completion)
    lengths = torch.randint(C // 2, C + 1, (prompts * G,), generator=g)  # spread lengths, as real completions
    mask[torch.arange(C) >= lengths.unsqueeze(1)] = 0
    return Rollout(prompt.to(device), torch.ones_like(prompt).to(device), completion.to(device), mask.to(device),
                   torch.zeros(prompts * G, dtype=torch.bool, device=device), list(range(prompts * G)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "large"], choices=list(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--completion-length", type=int, default=128)
    parser.add_argument("--num-minibatches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: torch's own; 1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from accelerate import Accelerator

    from sapo.algorithms import LossSettings
    from sapo.engines import SamplingSettings
    from sapo.model.logprobs import ForwardSettings
    from sapo.model.routing import MoERouting
    from sapo.training.rollout import RolloutSettings, behaviour_logprobs
    from sapo.training.update import PolicyState, UpdateSettings, policy_update

    G = args.num_generations
    forward = ForwardSettings(micro_batch_size=args.micro_batch_size, padding_free=True, chunk_size=4096)
    print(f"device={args.device}, threads={torch.get_num_threads()}, torch {torch.__version__}; {args.prompts} prompts "
          f"x G={G}, prompt {args.prompt_length}, completions {args.completion_length // 2}-{args.completion_length} "
          f"tokens, {args.num_minibatches} minibatches, micro-batch {args.micro_batch_size}\n")
    print(f"{'model':<7} {'params':>7} {'variant':<10} {'seconds':>8} {'overhead':>9}  runs")
    accelerator = Accelerator(cpu=args.device == "cpu")
    for size in args.sizes:
        model, vocab = build(size, args.device)
        start = copy.deepcopy(model.state_dict())
        rollout = synthetic_rollout(vocab, args.prompts, G, args.prompt_length, args.completion_length, args.device)
        routing = MoERouting(model)
        settings = RolloutSettings(group_size=G, sampling=SamplingSettings(max_new_tokens=args.completion_length),
                                   forward=forward, needs_old_logprobs=True, use_rollout_logprobs=False, seed=0)
        rollout.old_logprobs, rollout.routing = behaviour_logprobs(model, rollout, settings, routing)
        advantages = torch.randn(len(rollout), generator=torch.Generator().manual_seed(2)).to(args.device)
        base = UpdateSettings(group_size=G, num_minibatches=args.num_minibatches, num_iterations=1, max_grad_norm=1.0,
                              max_nonfinite_steps=3, mask_truncated_completions=False, seed=0, learning_rate=1e-5,
                              loss=LossSettings(loss_type="sapo"), forward=forward)
        variants = {"no hooks": (False, base), "none": (True, base),
                    "r2": (True, dataclasses.replace(base, routing_replay="r2")),
                    "r2 + aux": (True, dataclasses.replace(base, routing_replay="r2", router_aux_loss_coef=0.01))}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, (hooks, update) in variants.items():
                model.load_state_dict(start)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
                state = PolicyState(model, optimizer, scheduler, accelerator, routing if hooks else None)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                policy_update(state, rollout, advantages, update)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if repeat:
                    times[name].append(time.perf_counter() - t0)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        reference = statistics.median(times["no hooks"])
        for name, runs in times.items():
            median = statistics.median(runs)
            print(f"{size:<7} {params:>6.1f}M {name:<10} {median:>8.3f} {median / reference - 1:>+8.1%}  "
                  + ", ".join(f"{t:.3f}" for t in runs), flush=True)
        routing.close()


if __name__ == "__main__":
    main()
