"""The update's forward + backward on padded rows vs padding-free rows (`padding_free`), and the
cost model that chooses between them (`sapo.model.packing.layout_cost`).

    python benchmarks/padding_free.py [--repeats 20] [--long-repeats 3] [--lengths 64,128,256,512]
                                      [--threads N] [--skip-long] [--skip-demo]

Two setups, in one process, each layout timed alternately on the same inputs:

  demo   the shipped model, a real rollout at the `sapo train` demo's settings (16 arithmetic
         training prompts x G = 8, at most 6 completion tokens), split into its 4 minibatches of 32
  long   a random Qwen2-layout model of 25M parameters (H = 384, 6 layers, V = 32,000), one pass
         of 4 prompts of 64 tokens x 2 samples (the rows of a minibatch of G = 8 split in 4),
         completions of at most T tokens for each T of --lengths: all of exactly T tokens (nothing
         to drop but the repeated prompt: padding-free rows at their least favourable), then of
         T/8 .. T tokens (uniform, the spread of real rollouts)

For each: tokens the model computes (rows x columns) in each layout, milliseconds per pass
forward + backward (`completion_logprobs` and a backward of the summed log-probabilities), and
the ratio; for the demo the median over --repeats. The long setup first calibrates the cost
model's two constants on its model (`calibrate`: its layers over 4,096 cells as rows of 128 ..
1,024 columns, with and without a block mask), then times each pass in both layouts (the
fastest of --long-repeats: other work on the machine only adds time; padding-free rows are
timed even where the cost model would not pick them) and shows which layout was faster, the
cost model's padding-free / padded ratio, and the layout it picks with the constants shipped
in sapo/model/packing.py and with those just calibrated. The first padding-free call of a model
also checks it against padded rows; that warm-up is not timed. Timings move with whatever else
the machine runs: calibrate on a machine that is otherwise idle, or with --threads 1.

The shipped constants, ATTENTION_TOKENS = 3500 and MASKED_ATTENTION = 1.5, are the mean of
three calibrations on a 2-core CPU, rounded: 3761 and 1.77 (2 threads), 3719 and 1.57, 2913 and
1.26 (--threads 1). The timings behind them are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import statistics
import time

import numpy as np
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


def long_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=32_000, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config)


def long_pass(T: int, spread: bool, prompts=4, samples=2, P=64, V=32_000):
    """(prompt_ids, prompt_mask, completion_ids, completion_mask) of one pass: `prompts` prompts of
    P tokens, `samples` samples of each, completions of T tokens or of T/8 .. T (uniform)."""
    gen = torch.Generator().manual_seed(T + spread)
    N = prompts * samples
    prompt_ids = torch.randint(3, V, (prompts, P), generator=gen).repeat_interleave(samples, 0)
    lengths = torch.randint(max(1, T // 8), T + 1, (N,), generator=gen) if spread else torch.full((N,), T)
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    completion_ids = torch.randint(3, V, (N, T), generator=gen) * completion_mask
    return prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask


@contextlib.contextmanager
def cost_model_off():
    """Padding-free rows wherever they have fewer cells, even where the cost model would pick
    padded ones, so that both layouts can be timed."""
    import sapo.model.logprobs as logprobs

    chosen = logprobs.pack_rows
    logprobs.pack_rows = functools.partial(chosen, by_cost=False)
    try:
        yield
    finally:
        logprobs.pack_rows = chosen


def fastest(runs: dict, repeats: int) -> dict:
    """Milliseconds of the fastest of `repeats` calls of each of `runs`, after one untimed call of
    each. The runs take turns, so that a quiet moment of the machine serves them all (other work
    on it only ever adds time)."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for key, run in runs.items():
            started = time.perf_counter()
            run()
            best[key] = min(best[key], 1000 * (time.perf_counter() - started))
    return best


def block_mask(R: int, L: int) -> torch.Tensor:
    """(R, 1, L, L) booleans: padding-free rows of a prompt of L/8 tokens and two completions."""
    seg = torch.full((L,), -1)
    half = (L - L // 8) // 2
    seg[L // 8:L // 8 + half], seg[L // 8 + half:] = 0, 1
    allowed = torch.ones(L, L, dtype=torch.bool).tril() & ((seg[None] == -1) | (seg[None] == seg[:, None]))
    return allowed.expand(R, 1, L, L).clone()


def calibrate(model, repeats: int, cells=4096, lengths=(128, 256, 512, 1024)) -> tuple[float, float]:
    """ATTENTION_TOKENS and MASKED_ATTENTION of `model`: the forward and backward of its layers
    (without the output layer, which costs the same in both layouts) over `cells` cells as rows
    of L columns for each L, with no mask (sdpa's causal path) and with a block mask. At fixed
    cells the cost model's time is a * cells + b * cells * L: a straight line in L, whose slope
    over its intercept is 1 / ATTENTION_TOKENS (b / a); the block mask's slope over the causal
    one is MASKED_ATTENTION."""
    def layers(L: int, masked: bool):
        R = cells // L
        input_ids, position_ids = torch.randint(3, model.config.vocab_size, (R, L)), torch.arange(L).expand(R, L)
        mask = dict(attention_mask=block_mask(R, L)) if masked else {}

        def run():
            hidden = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **mask)
            hidden.last_hidden_state.square().mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    ms = fastest({(L, masked): layers(L, masked) for L in lengths for masked in (False, True)}, repeats)
    # (slope, intercept) of each path
    line = {masked: np.polyfit(lengths, [ms[L, masked] for L in lengths], 1) for masked in (False, True)}
    print(f"\ncalibration: forward + backward of the layers over {cells} cells as rows of L columns, "
          f"fastest of {repeats}")
    print(f"  {'L':>6} " + " ".join(f"{L:>7}" for L in lengths) + "   ms = intercept + slope * L")
    for masked in (False, True):
        slope, intercept = line[masked]
        print(f"  {'block mask' if masked else 'causal':<10} " + " ".join(f"{ms[L, masked]:>7.0f}" for L in lengths)
              + f"   {intercept:.0f} + {slope:.3f} L")
    (slope, intercept), masked_slope = line[False], line[True][0]
    if min(slope, intercept, masked_slope) <= 0:
        print("  a slope or intercept is not positive: the timings are too noisy to calibrate (rerun on an idle "
              "machine, or with more --long-repeats)")
        return float("nan"), float("nan")
    print(f"  ATTENTION_TOKENS = intercept / slope (causal) = {intercept / slope:.0f}, "
          f"MASKED_ATTENTION = slope (block mask) / slope (causal) = {masked_slope / slope:.2f}")
    return intercept / slope, masked_slope / slope


def sweep(lengths: list[int], repeats: int) -> None:
    from sapo.config import TrainConfig
    from sapo.model.logprobs import _PACKING_VERIFIED, ForwardSettings, completion_logprobs
    from sapo.model.packing import ATTENTION_TOKENS, MASKED_ATTENTION, layout_cost, pack_rows

    model = long_model()
    model.train()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\nlong: random Qwen2 of {params:.1f}M parameters (H = 384, 6 layers, V = 32,000)")
    calibrated = calibrate(model, repeats)
    chunk = TrainConfig.logprob_chunk_size  # the trainer's default output layer: vocabulary chunks

    def step(data, padding_free: bool):
        forward = ForwardSettings(temperature=1.0, padding_free=padding_free, chunk_size=chunk)

        def run():
            completion_logprobs(model, *data, forward, with_entropy=True)[0].sum().backward()
            model.zero_grad(set_to_none=True)
        return run

    cases = [(T, spread) for spread in (False, True) for T in lengths]
    runs, shapes, chosen = {}, {}, {}
    for case in cases:
        data = long_pass(*case)
        rows = pack_rows(*data, by_cost=False)
        B, P, T = data[0].shape[0], data[0].shape[1], data[2].shape[1]
        shapes[case] = ((B, P + T, not bool(data[3].all())), (*rows.input_ids.shape, True))
        chosen[case] = "padded" if pack_rows(*data) is None else "padding-free"  # as the trainer would
        for padding_free in (False, True):
            runs[case, padding_free] = step(data, padding_free)
    with cost_model_off():  # padding-free rows timed also where the cost model would not pick them
        ms = fastest(runs, repeats)
    if _PACKING_VERIFIED.get(model) is not True:
        raise SystemExit(f"long: the model did not take padding-free rows (check: {_PACKING_VERIFIED.get(model)})")

    def picks(padded, packed, attention_tokens=ATTENTION_TOKENS, masked_attention=MASKED_ATTENTION):
        padded_cost, packed_cost = (layout_cost(R, L, masked=masked, attention_tokens=attention_tokens,
                                                masked_attention=masked_attention) for R, L, masked in (padded, packed))
        return packed_cost / padded_cost, "padding-free" if packed_cost < padded_cost else "padded"

    print(f"\nlong: one pass (completion_logprobs + backward) of 4 prompts of 64 tokens x 2 samples, fastest of "
          f"{repeats}; cost: the cost model's padding-free / padded with the shipped constants "
          f"(ATTENTION_TOKENS = {ATTENTION_TOKENS:g}, MASKED_ATTENTION = {MASKED_ATTENTION:g})")
    print(f"  {'completions':<16} {'cells padded -> pf':>19} {'ms padded -> pf':>19} {'time':>6} {'cost':>6}  "
          f"{'faster':<13} {'cost model picks':<16} {'(calibrated)':<13}")
    shipped_right = calibrated_right = 0
    for case in cases:
        T, spread = case
        padded, packed = shapes[case]
        a, b = ms[case, False], ms[case, True]
        faster = "padding-free" if b < a else "padded"
        ratio, pick = picks(padded, packed)
        assert pick == chosen[case]
        again = "-" if math.isnan(calibrated[0]) else picks(padded, packed, *calibrated)[1]
        shipped_right += pick == faster
        calibrated_right += again == faster
        label = f"{max(1, T // 8)}..{T} tokens" if spread else f"{T} tokens each"
        print(f"  {label:<16} {padded[0] * padded[1]:>8} -> {packed[0] * packed[1]:>7} {a:>8.0f} -> {b:>7.0f} "
              f"{b / a:>5.2f}x {ratio:>5.2f}x  {faster:<13} {pick:<16} {again:<13}")
    print(f"  the cost model picks the faster layout in {shipped_right} of {len(cases)} cases with the shipped "
          f"constants, {calibrated_right} with the calibrated ones")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed passes over the demo's minibatches")
    parser.add_argument("--long-repeats", type=int, default=3, help="timed passes per layout and length (long)")
    parser.add_argument("--lengths", default="64,128,256,512", help="completion lengths T of the long setup")
    parser.add_argument("--skip-long", action="store_true", help="only the demo setup")
    parser.add_argument("--skip-demo", action="store_true", help="only the long setup")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 on a machine shared with other work, whose "
                             "threads would otherwise hold up every parallel region of a pass")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    if not args.skip_demo:
        compare("demo", *demo_minibatches(), args.repeats)
    if not args.skip_long:
        sweep([int(x) for x in args.lengths.split(",")], args.long_repeats)


if __name__ == "__main__":
    main()
