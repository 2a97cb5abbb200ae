"""The update's forward + backward on padded rows vs padding-free rows (`padding_free`).

    python benchmarks/padding_free.py [--repeats 20] [--long-repeats 3] [--skip-long]

Two setups, in one process, each layout timed alternately on the same minibatches:

  demo   the shipped model, a real rollout at the `sapo train` demo's settings (16 arithmetic
         training prompts x G = 8, at most 6 completion tokens), split into its 4 minibatches of 32
  long   a random Qwen2-layout model (H = 256, 4 layers, V = 32,000, as benchmarks/rollout.py),
         8 prompts of 128 tokens x G = 8, completion lengths drawn uniformly from 16 .. 512 (the
         spread of real reasoning rollouts), 4 minibatches of 16

For each: tokens the model computes (rows x columns) in each layout, milliseconds per minibatch
forward + backward (`completion_logprobs` and a backward of the summed log-probabilities; the
median over repeats), and the ratio. The first padding-free call of a model also checks it
against padded rows; that warm-up is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def demo_minibatches():
    from sapo.data import load_rows, prepare_prompts
    from sapo.demo import demo_config
    from sapo.engines import HFEngine, SamplingSettings
    from sapo.model.loading import load_model, load_tokenizer
    from sapo.training.rollout import Rollout
    from sapo.training.update import minibatch_plan

    cfg = demo_config()
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    rows = load_rows(cfg.dataset, split="train")[:cfg.prompts_per_step]
    prompts = prepare_prompts(rows, tokenizer, max_prompt_length=cfg.max_prompt_length, filter_overlong=True)
    n = len(prompts)
    engine = HFEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      device=torch.device("cpu"))
    sampling = SamplingSettings(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature)
    generation = engine.generate(prompts.prompt_ids, cfg.num_generations, sampling, seeds=list(range(n)))
    rollout = Rollout.from_generation(generation, prompts, list(range(n)))
    plan = minibatch_plan(n, cfg.num_generations, cfg.num_minibatches, seed=0, step=0, iteration=0, first_position=0)
    return model, [rollout.select(idx) for idx in plan]


def long_minibatches(prompts=8, G=8, P=128, shortest=16, longest=512, num_minibatches=4):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sapo.training.rollout import Rollout
    from sapo.training.update import minibatch_plan

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32_000, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    N, V = prompts * G, config.vocab_size
    prompt_ids = torch.randint(3, V, (prompts, P)).repeat_interleave(G, 0)
    lengths = torch.randint(shortest, longest + 1, (N,))
    completion_mask = (torch.arange(longest) < lengths[:, None]).long()
    rollout = Rollout(prompt_ids, torch.ones_like(prompt_ids), torch.randint(3, V, (N, longest)) * completion_mask,
                      completion_mask, torch.zeros(N, dtype=torch.bool), list(range(N)))
    plan = minibatch_plan(prompts, G, num_minibatches, seed=0, step=0, iteration=0, first_position=0)
    return model, [rollout.select(idx) for idx in plan]


def compare(name: str, model, minibatches, repeats: int) -> None:
    from sapo.model.logprobs import _PACKING_VERIFIED, ForwardSettings, completion_logprobs
    from sapo.model.packing import pack_rows

    model.train()

    def step(part, padding_free: bool) -> None:
        forward = ForwardSettings(temperature=1.0, padding_free=padding_free)
        logp, _ = completion_logprobs(model, part.prompt_ids, part.prompt_mask, part.completion_ids,
                                      part.completion_mask, forward, with_entropy=True)
        logp.sum().backward()
        model.zero_grad(set_to_none=True)

    for padding_free in (False, True):  # warm-up, and the padding-free layout's one-time check
        step(minibatches[0], padding_free)
    if _PACKING_VERIFIED.get(model) is not True:  # else both timings would be of padded rows
        raise SystemExit(f"{name}: the model did not take padding-free rows (check: {_PACKING_VERIFIED.get(model)})")
    times = {False: [], True: []}
    for _ in range(repeats):
        for padding_free in (False, True):
            started = time.perf_counter()
            for part in minibatches:
                step(part, padding_free)
            times[padding_free].append(1000 * (time.perf_counter() - started) / len(minibatches))
    padded_cells = sum(p.prompt_ids.shape[0] * (p.prompt_ids.shape[1] + p.completion_ids.shape[1]) for p in minibatches)
    packed = [pack_rows(p.prompt_ids, p.prompt_mask, p.completion_ids, p.completion_mask) for p in minibatches]
    packed_cells = sum(r.input_ids.numel() if r is not None else p.prompt_ids.shape[0] * (
        p.prompt_ids.shape[1] + p.completion_ids.shape[1]) for r, p in zip(packed, minibatches))
    real = sum(int(p.prompt_mask.sum() + p.completion_mask.sum()) for p in minibatches)
    a, b = statistics.median(times[False]), statistics.median(times[True])
    print(f"\n{name}: {len(minibatches)} minibatches of {minibatches[0].prompt_ids.shape[0]}, "
          f"{real} prompt + completion tokens in all, median of {repeats}")
    print(f"  {'layout':<14} {'tokens computed':>15} {'ms / minibatch':>15}")
    print(f"  {'padded':<14} {padded_cells:>15} {a:>15.1f}")
    print(f"  {'padding-free':<14} {packed_cells:>15} {b:>15.1f}   ({b / a:.2f}x time, "
          f"{packed_cells / padded_cells:.2f}x tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed passes over the demo's minibatches")
    parser.add_argument("--long-repeats", type=int, default=3, help="timed passes over the long setup's minibatches")
    parser.add_argument("--skip-long", action="store_true", help="only the demo setup")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    compare("demo", *demo_minibatches(), args.repeats)
    if not args.skip_long:
        compare("long", *long_minibatches(), args.long_repeats)


if __name__ == "__main__":
    main()
