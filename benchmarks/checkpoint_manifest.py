"""What checkpoint checksums cost: writing manifest.json at save (sha256 of every file, fsync)
and verifying it at resume, on a checkpoint-like directory (weights, AdamW state, RNG) of the
shipped model and of a bigger tiny model.

    python benchmarks/checkpoint_manifest.py [--hidden-size 512 --layers 8]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sapo.demo import shipped_model_path
from sapo.model.loading import load_model
from sapo.model.tiny import char_tokenizer, tiny_causal_lm
from sapo.training.checkpoint import rng_state, verify_checkpoint, write_manifest


def checkpoint_like(model, out: Path) -> int:
    model.save_pretrained(out, safe_serialization=True)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates exp_avg and exp_avg_sq: twice the weights
    torch.save(optimizer.state_dict(), out / "optimizer.pt")
    torch.save({}, out / "scheduler.pt")
    torch.save(rng_state(), out / "rng_state_0.pt")
    (out / "config.yaml").write_text("{}\n")
    (out / "trainer_state.json").write_text(json.dumps({"step": 1}))
    return sum(p.stat().st_size for p in out.iterdir())


def measure(name: str, model, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        size = checkpoint_like(model, out)
        start = time.perf_counter()
        write_manifest(out, 1)
        written = time.perf_counter() - start
        checks = []
        for _ in range(repeats):
            start = time.perf_counter()
            verify_checkpoint(out)
            checks.append(time.perf_counter() - start)
        print(f"{name:<28} {size / 2**20:9.1f} MiB  manifest at save {written * 1000:8.1f} ms  "
              f"verify at resume {min(checks) * 1000:8.1f} ms  ({size / 2**20 / min(checks):.0f} MiB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    measure("shipped model", load_model(shipped_model_path()), args.repeats)
    bigger = tiny_causal_lm(char_tokenizer(), hidden_size=args.hidden_size, num_layers=args.layers)
    measure(f"tiny qwen2 h={args.hidden_size} l={args.layers}", bigger, args.repeats)


if __name__ == "__main__":
    main()
