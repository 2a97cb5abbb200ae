"""Forward+backward time and peak extra memory of three ways to get token log-probabilities from
final hidden states with a real vocabulary (H = 896, V = 151,936, Qwen2.5-0.5B's sizes):

  (a) full logits, log_softmax + gather   (what most trainers do)
  (b) full logits, F.cross_entropy         (fused log_softmax + nll)
  (c) sapo.token_logprobs                  (vocabulary chunks, custom autograd; no (N, V) tensor)

    python benchmarks/logprobs.py                 # N in 512 2048 8192, CPU
    python benchmarks/logprobs.py --n 2048 --device cuda

Every (variant, N) runs in its own child process, one after the other, so that peak memory is
that variant's alone: on CPU the peak resident set (VmHWM, reset before the run) minus the resident
set once the inputs exist; on CUDA max_memory_allocated minus memory_allocated. "Extra" memory
therefore includes the weight's gradient (V x H float32, 545 MB), which every variant makes.
A variant whose estimated need exceeds the memory available is reported as skipped, not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

H, V = 896, 151_936
VARIANTS = {"a": "log_softmax+gather", "b": "cross_entropy", "c": "sapo.token_logprobs"}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_one(variant: str, N: int, device: str, chunk_size: int | None, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from sapo import token_logprobs

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.02).to(device).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=gen).to(device)
    upstream = torch.randn(N, generator=gen).to(device)  # stands in for dLoss/dlogp

    def step():
        if variant == "a":
            logp = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        elif variant == "b":
            logp = -F.cross_entropy(hidden @ weight.T, ids, reduction="none")
        else:
            logp = token_logprobs(hidden, weight, ids, chunk_size=chunk_size)
        (logp * upstream).sum().backward()
        hidden.grad = weight.grad = None

    cuda = device.startswith("cuda")
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            base = _rss_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024) - base
    return {"seconds": min(times), "peak_extra_bytes": peak}


def _estimate_bytes(variant: str, N: int) -> int:
    grad_w = V * H * 4
    return grad_w + (4 * N * V * 4 if variant in "ab" else 4 * (1 << 24) * 4)


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[512, 2048, 8192], help="tokens per batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-size", type=int, default=None, help="vocabulary chunk of (c); default the library's")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant; the fastest is reported")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.device, args.chunk_size, args.repeats)))
        return

    import torch

    print(f"H={H} V={V} device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"cpus={os.cpu_count()}")
    print(f"{'N':>6} {'variant':<22} {'fwd+bwd s':>10} {'peak extra GB':>14} {'time / (a)':>11} {'memory / (a)':>13}")
    for N in args.n:
        results = {}
        for key in VARIANTS:
            need = _estimate_bytes(key, N)
            if args.device == "cpu" and need > 0.9 * _available_bytes():
                results[key] = None
                print(f"{N:>6} ({key}) {VARIANTS[key]:<18} skipped: needs about {need / 1e9:.1f} GB, "
                      f"{_available_bytes() / 1e9:.1f} GB available")
                continue
            cmd = [sys.executable, __file__, "--one", key, str(N), "--device", args.device,
                   "--repeats", str(args.repeats)]
            if args.chunk_size:
                cmd += ["--chunk-size", str(args.chunk_size)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                results[key] = None
                print(f"{N:>6} ({key}) {VARIANTS[key]:<18} failed (exit {done.returncode}): "
                      f"{(done.stderr.strip().splitlines() or ['killed'])[-1]}")
                continue
            results[key] = r = json.loads(done.stdout.strip().splitlines()[-1])
            base = results.get("a")
            ratio_t = f"{r['seconds'] / base['seconds']:.2f}x" if base else "-"
            ratio_m = f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.3f}" if base else "-"
            print(f"{N:>6} ({key}) {VARIANTS[key]:<18} {r['seconds']:>10.2f} {r['peak_extra_bytes'] / 1e9:>14.2f} "
                  f"{ratio_t:>11} {ratio_m:>13}", flush=True)


if __name__ == "__main__":
    main()
