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

  vllm server      with --vllm-server URL (and --model, the directory the server serves): the
                   `vllm` engine in server mode (`sapo.engines.vllm_server.VLLMServerEngine`), after its
                   start-up checks; the server samples with its own EOS. Never run against a real
                   vLLM on this project's machines (a CPU; vLLM needs a GPU build); the test runs
                   it against tests/engines/fake_vllm_server.py, which says nothing of vLLM's speed.

Tokens per second count generated tokens up to and including EOS. Each variant runs once to
warm up, then --repeats times; the fastest run is reported.

    python benchmarks/rollout.py --split               # where a decoding step's time goes

splits the `hf` engine's time per generated token (prompt 64, 4 prompts x G = 8, 128 new
tokens unless given) into the model's forward pass, the sampling (logits processing, the
draws and their log-probabilities; of it, the Exp(1) noise that torch.multinomial draws), the
KV cache's growth, and the rest, for float32 and bfloat16 weights, alternating in one
process (medians of --repeats runs, 5 by default). The parts are timed by wrapping the
engine's functions and the model's forward, so the engine itself runs unchanged. Then it times
the model's own matmuls alone, at the shapes of one decoding step, in float32 and bfloat16:
what bfloat16 can give at most.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch


def build_model(path: str | None, device: str, hidden_size: int = 256, layers: int = 4):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if path:
        return AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    torch.manual_seed(0)
    # Qwen2 layout with a real vocabulary, small enough to run on a laptop CPU (by default): heads of
    # 32 dimensions, 4 query heads per key/value head.
    config = Qwen2Config(hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=layers,
                         num_attention_heads=hidden_size // 32, num_key_value_heads=hidden_size // 128,
                         vocab_size=32_000, max_position_embeddings=2048, tie_word_embeddings=True)
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


def vllm_server_variant(url: str, model_path: str, model, max_model_len: int):
    """The `vllm` engine in server mode, connected (its checks made) once, outside the timings."""
    import tempfile

    from transformers import AutoTokenizer

    from sapo.engines import SamplingSettings
    from sapo.engines.base import VLLMSettings
    from sapo.engines.vllm_server import VLLMServerEngine

    settings = VLLMSettings(mode="server", server_base_url=url, server_timeout=60.0, gpu_memory_utilization=0.0,
                            tensor_parallel_size=1, enable_sleep_mode=False, model=model_path,
                            max_model_len=max_model_len)
    engine = VLLMServerEngine(settings, tokenizer=AutoTokenizer.from_pretrained(model_path),
                              sync_root=Path(tempfile.mkdtemp(prefix="sapo-rollout-bench-")),
                              device=torch.device("cpu"))
    engine.connect(model, fresh=True)

    def generate(model, prompts, G, max_new_tokens, eos, pad, device):
        generation = engine.generate(prompts, G, SamplingSettings(max_new_tokens=max_new_tokens),
                                     list(range(len(prompts))))
        return int(generation.completion_mask.sum())

    return engine, generate


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


class StepSplit:
    """Wall time of the parts of `sapo.engines.hf.sample_groups`, by wrapping them while active:
    the model's forward (prefill apart; minus the KV-cache updates that run inside it), the
    cache layers' `update`, the engine's `_draw` (sampling) and, inside it, `_GroupDraws.noise`."""

    def __init__(self, model, device: str) -> None:
        self.model, self.sync = model, device.startswith("cuda")
        self.seconds: dict[str, float] = defaultdict(float)
        self.phase = "prefill"  # of the forward pass running: its cache updates count as its own

    def _timed(self, fn, name_of):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self.sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name_of(args, kwargs)] += time.perf_counter() - t0
            return out
        return wrapper

    def __enter__(self):
        from transformers.cache_utils import DynamicLayer

        from sapo.engines import hf

        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.phase = "prefill" if ids.shape[1] > 1 else "forward"
            return timed_forward(*args, **kwargs)

        self._undo = [(hf, "_draw", hf._draw), (hf._GroupDraws, "noise", hf._GroupDraws.noise),
                      (DynamicLayer, "update", DynamicLayer.update)]
        if hasattr(hf, "_PreallocatedLayer"):
            self._undo.append((hf._PreallocatedLayer, "update", hf._PreallocatedLayer.update))
        hf._draw = self._timed(hf._draw, lambda a, k: "sampling")
        hf._GroupDraws.noise = self._timed(hf._GroupDraws.noise, lambda a, k: "noise")
        for owner, name, fn in self._undo[2:]:
            setattr(owner, name, self._timed(fn, lambda a, k: f"cache in {self.phase}"))
        timed_forward = self._timed(self.model.forward, lambda a, k: self.phase)
        self.model.forward = functools.wraps(timed_forward)(forward)
        return self

    def __exit__(self, *exc):
        for owner, name, fn in self._undo:
            setattr(owner, name, fn)
        del self.model.forward  # the class's method again


def split_decoding(model, prompts, G, max_new_tokens, eos, pad, device, repeats) -> None:
    from sapo.engines import HFEngine, SamplingSettings

    engines = {"float32": HFEngine(model, eos_token_id=eos, pad_token_id=pad, device=torch.device(device)),
               "bfloat16": HFEngine(model, eos_token_id=eos, pad_token_id=pad, device=torch.device(device),
                                    dtype=torch.bfloat16)}
    for engine in engines.values():
        engine.sync(model)  # the bfloat16 copy is cast once, outside the timings
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    seeds = list(range(len(prompts)))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, engine in engines.items():
            with StepSplit(engine.model, device) as split:
                t0 = time.perf_counter()
                generation = engine.generate(prompts, G, settings, seeds)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                total = time.perf_counter() - t0
            if repeat:
                s = split.seconds
                positions = generation.completion_ids.shape[0] * generation.completion_ids.shape[1]
                parts = {"prefill": s["prefill"], "forward": s["forward"] - s["cache in forward"],
                         "cache": s["cache in forward"], "sampling": s["sampling"], "noise": s["noise"]}
                parts["other"] = total - sum(v for k, v in parts.items() if k != "noise")
                parts = {k: v / positions * 1e6 for k, v in parts.items()}  # microseconds per generated token
                parts["total"] = total / positions * 1e6
                parts["tokens/s"] = int(generation.completion_mask.sum()) / total
                runs[name].append(parts)
    print(f"decoding step, microseconds per generated token (median of {repeats} runs, alternating):\n")
    columns = ["prefill", "forward", "cache", "sampling", "noise", "other", "total", "tokens/s"]
    print(f"{'weights':<9}" + "".join(f"{c:>10}" for c in columns))
    medians = {name: {c: statistics.median(r[c] for r in rs) for c in columns} for name, rs in runs.items()}
    for name, m in medians.items():
        print(f"{name:<9}" + "".join(f"{m[c]:>10.1f}" if c != "tokens/s" else f"{m[c]:>10.0f}" for c in columns))
    share = {name: {c: m[c] / m["total"] for c in columns[:-2]} for name, m in medians.items()}
    for name, sh in share.items():
        print(f"{name + ' %':<9}" + "".join(f"{100 * sh[c]:>10.0f}" for c in columns[:-2]))
    print(f"\nbfloat16 / float32 tokens/s: {medians['bfloat16']['tokens/s'] / medians['float32']['tokens/s']:.2f}x  "
          f"(forward alone: {medians['float32']['forward'] / medians['bfloat16']['forward']:.2f}x)")
    print("forward: the model's decoding passes without the cache updates inside them; cache: the KV cache's "
          "update (concatenation or writes into a buffer);\nsampling: logits to tokens and log-probs (noise: the "
          "Exp(1) noise of torch.multinomial's draw, part of sampling); other: the rest of the call")


def bare_matmuls(model, rows: int, device: str, repeats: int) -> None:
    """The model's linear layers alone, at the shapes of one decoding step (`rows` sequences, one
    token each), float32 against bfloat16 weights and inputs."""
    import torch.nn.functional as F

    layers, head = getattr(getattr(model, "model", None), "layers", None), model.get_output_embeddings()
    if not layers or not isinstance(head, torch.nn.Linear):
        print("\n(no bare matmuls: the model has no `model.layers` or no linear output layer)")
        return
    linears = {name: m for name, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    count = {name: len(layers) for name in linears}
    linears["lm_head"], count["lm_head"] = head, 1
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for _ in range(repeats):
        for name, linear in linears.items():
            for dtype in (torch.float32, torch.bfloat16):
                w = linear.weight.detach().to(dtype)
                b = None if linear.bias is None else linear.bias.detach().to(dtype)
                x = torch.randn(rows, w.shape[1], device=device).to(dtype)
                F.linear(x, w, b)
                n, t0 = 0, time.perf_counter()
                while n < 3 or (n < 1000 and time.perf_counter() - t0 < 0.02):  # about 20 ms of calls
                    F.linear(x, w, b)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    n += 1
                times[(name, str(dtype).removeprefix("torch."))].append((time.perf_counter() - t0) / n * 1e6)
    print(f"\nthe model's matmuls alone, one decoding step ({rows} rows), microseconds (median of {repeats}):\n")
    print(f"{'layer':<24} {'shape':>14} {'count':>6} {'float32':>9} {'bfloat16':>9} {'speed-up':>9}")
    step = {"float32": 0.0, "bfloat16": 0.0}
    for name, linear in linears.items():
        t = {d: statistics.median(times[(name, d)]) for d in step}
        for d in step:
            step[d] += t[d] * count[name]
        shape = f"{linear.in_features}x{linear.out_features}" + ("+b" if linear.bias is not None else "")
        print(f"{name:<24} {shape:>14} {count[name]:>6} {t['float32']:>9.1f} {t['bfloat16']:>9.1f} "
              f"{t['float32'] / t['bfloat16']:>8.2f}x")
    print(f"{'all, per step':<24} {'':>14} {'':>6} {step['float32']:>9.1f} {step['bfloat16']:>9.1f} "
          f"{step['float32'] / step['bfloat16']:>8.2f}x")
    print(f"{'all, per token':<24} {'':>14} {'':>6} {step['float32'] / rows:>9.1f} {step['bfloat16'] / rows:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a local causal LM directory (default: random Qwen2-style)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden-size", type=int, default=256, help="of the random model (a multiple of 128)")
    parser.add_argument("--layers", type=int, default=4, help="of the random model")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--prompts", type=int, default=4, help="prompts (groups) per batch")
    parser.add_argument("--num-generations", type=int, default=8, help="G")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64, with --split 128")
    parser.add_argument("--repeats", type=int, default=None, help="default 2, with --split 5")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: torch's own; 1 is steadier on a shared machine)")
    parser.add_argument("--split", action="store_true",
                        help="split a decoding step's time into forward, sampling and cache, float32 and bfloat16")
    parser.add_argument("--vllm-server", default=None, metavar="URL",
                        help="also time a running `vllm serve` of --model through the vllm engine (server mode)")
    args = parser.parse_args()
    if args.vllm_server and not args.model:
        parser.error("--vllm-server needs --model, the directory the server serves (its weights are checked)")
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if args.split else 64
    if args.repeats is None:
        args.repeats = 5 if args.split else 2
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.model, args.device, args.hidden_size, args.layers)
    V = model.config.vocab_size
    eos = V - 1
    pad = V - 2
    params = sum(p.numel() for p in model.parameters())
    random = f"random Qwen2 (H={args.hidden_size}, {args.layers} layers, V=32000)"
    print(f"model: {args.model or random} ({params / 1e6:.1f} M params), "
          f"device={args.device}, threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{args.prompts} prompts x G={args.num_generations}, {args.max_new_tokens} new tokens, temperature 1\n")
    if args.split:
        gen = torch.Generator().manual_seed(0)
        P = args.prompt_lengths[0]  # 64 unless given
        prompts = torch.randint(0, V - 2, (args.prompts, P), generator=gen).tolist()
        print(f"prompt length {P}")
        with torch.no_grad():
            split_decoding(model, prompts, args.num_generations, args.max_new_tokens, eos, pad, args.device,
                           args.repeats)
            bare_matmuls(model, args.prompts * args.num_generations, args.device, max(args.repeats, 5))
        return
    print(f"{'prompt len':>10} {'variant':<16} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'speed-up':>9}")
    gen = torch.Generator().manual_seed(0)
    variants = [("plain generate", plain_generate), ("sapo-rl", sapo_generate), ("sapo-rl bf16", sapo_generate_bf16)]
    server = None
    if args.vllm_server:
        server, fn = vllm_server_variant(args.vllm_server, args.model, model,
                                         max(args.prompt_lengths) + args.max_new_tokens)
        variants.append(("vllm server", fn))
    with torch.no_grad():
        for P in args.prompt_lengths:
            prompts = torch.randint(0, V - 2, (args.prompts, P), generator=gen).tolist()
            base = None
            for name, fn in variants:
                tokens, seconds = timed(fn, args.repeats, args.device, model, prompts, args.num_generations,
                                        args.max_new_tokens, eos, pad, args.device)
                rate = tokens / seconds
                base = base or rate
                print(f"{P:>10} {name:<16} {tokens:>7} {seconds:>8.2f} {rate:>9.0f} {rate / base:>8.2f}x", flush=True)
    if server is not None:
        server.close()  # the server gets its model's own weights back
        shutil.rmtree(server.sync_root, ignore_errors=True)  # the benchmark's own temporary directory
    print("\nspeed-up: tokens/s over plain generate's; sapo-rl bf16 / sapo-rl is the low-precision engine's gain")


if __name__ == "__main__":
    main()
