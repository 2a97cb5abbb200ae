"""Generation throughput: plain `model.generate` on repeated prompts vs sapo-rl's shared-prompt
sampler (one prefill per prompt, KV cache expanded G ways, all groups decoded as one batch).

    python benchmarks/rollout.py                       # random Qwen2-style model, CPU
    python benchmarks/rollout.py --model PATH --device cuda

For each prompt length (64 and 512 by default) with G = 8, in one process and one after the
other on the same model and prompts:

  plain generate   one `model.generate` call on the batch of prompts, each repeated G times
                   (what TRL's GRPOTrainer does without vLLM): G prefills per prompt
  sapo-rl          the `hf` engine (`sapo.engines.HFEngine`), shared prefill (the trainer's default)
  sapo-rl bf16     the same engine sampling with a bfloat16 copy of the model (rollout_dtype=bfloat16),
                   refreshed from the float32 weights before every call, as the trainer does each step

Tokens per second count generated tokens up to and including EOS. Each variant runs once to
warm up, then --repeats times; the fastest run is reported.
"""

from __future__ import annotations

import argparse
import time

import torch


def build_model(path: str | None, device: str):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if path:
        return AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    torch.manual_seed(0)
    # Qwen2 layout with a real vocabulary, small enough to run on a laptop CPU.
    config = Qwen2Config(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32_000, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).to(device).eval()


def plain_generate(model, prompts, G, max_new_tokens, eos, pad, device):
    from transformers import GenerationConfig

    ids = torch.tensor(prompts, device=device).repeat_interleave(G, dim=0)  # same length: no padding needed
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=pad)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = out[:, ids.shape[1]:]
    return int(_lengths(new, eos).sum())


def sapo_generate(model, prompts, G, max_new_tokens, eos, pad, device):
    from sapo.engines import HFEngine, SamplingSettings

    engine = HFEngine(model, eos_token_id=eos, pad_token_id=pad, device=torch.device(device))
    generation = engine.generate(prompts, G, SamplingSettings(max_new_tokens=max_new_tokens), list(range(len(prompts))))
    return int(generation.completion_mask.sum())


_BF16_ENGINES: dict = {}


def sapo_generate_bf16(model, prompts, G, max_new_tokens, eos, pad, device):
    from sapo.engines import HFEngine, SamplingSettings

    engine = _BF16_ENGINES.setdefault(id(model), HFEngine(model, eos_token_id=eos, pad_token_id=pad,
                                                          device=torch.device(device), dtype=torch.bfloat16))
    engine.sync(model)  # the copy is refreshed (cast) from the float32 weights, included in the time
    generation = engine.generate(prompts, G, SamplingSettings(max_new_tokens=max_new_tokens), list(range(len(prompts))))
    return int(generation.completion_mask.sum())


def _lengths(new: torch.Tensor, eos: int) -> torch.Tensor:
    is_eos = new == eos
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, new.shape[1])
    return first


def timed(fn, repeats, device, *args):
    fn(*args)  # warm-up
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = fn(*args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return tokens, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a local causal LM directory (default: random Qwen2-style)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--prompts", type=int, default=4, help="prompts (groups) per batch")
    parser.add_argument("--num-generations", type=int, default=8, help="G")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model = build_model(args.model, args.device)
    V = model.config.vocab_size
    eos = V - 1
    pad = V - 2
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model or 'random Qwen2 (H=256, 4 layers, V=32000)'} ({params / 1e6:.1f} M params), "
          f"device={args.device}, threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{args.prompts} prompts x G={args.num_generations}, {args.max_new_tokens} new tokens, temperature 1\n")
    print(f"{'prompt len':>10} {'variant':<16} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'speed-up':>9}")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for P in args.prompt_lengths:
            prompts = torch.randint(0, V - 2, (args.prompts, P), generator=gen).tolist()
            base = None
            for name, fn in (("plain generate", plain_generate), ("sapo-rl", sapo_generate),
                             ("sapo-rl bf16", sapo_generate_bf16)):
                tokens, seconds = timed(fn, args.repeats, args.device, model, prompts, args.num_generations,
                                        args.max_new_tokens, eos, pad, args.device)
                rate = tokens / seconds
                base = base or rate
                print(f"{P:>10} {name:<16} {tokens:>7} {seconds:>8.2f} {rate:>9.0f} {rate / base:>8.2f}x", flush=True)
    print("\nspeed-up: tokens/s over plain generate's; sapo-rl bf16 / sapo-rl is the low-precision engine's gain")


if __name__ == "__main__":
    main()
