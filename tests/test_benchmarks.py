"""The benchmark scripts start and fail clearly without their optional dependencies (timings
themselves are not tested: see docs/performance.md)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="TRL is installed: the script would train")
def test_vs_trl_without_trl_says_what_to_install():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--steps", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "pip install trl" in done.stdout and "Traceback" not in done.stderr


def test_rollout_benchmark_runs_on_a_small_setting():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout.py"), "--prompt-lengths", "8",
                           "--prompts", "1", "--num-generations", "2", "--max-new-tokens", "3", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("8 ")]
    assert len(rows) == 3 and all(float(r[-1].rstrip("x")) > 0 for r in rows)  # generate, sapo-rl, bf16


def test_update_profile_runs():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_update.py"), "--steps", "1",
                           "--batch", "8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "total" in done.stdout and "aten::" in done.stdout


def test_padding_free_benchmark_runs_on_the_demo_setting():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "padding_free.py"), "--repeats", "1",
                           "--skip-long"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    padded, packed = (line.split() for line in done.stdout.splitlines()
                      if line.strip().startswith(("padded", "padding-free")))
    assert int(packed[1]) < int(padded[1])  # fewer tokens computed on a real rollout


def test_memory_benchmark_counts_the_shards_of_a_real_shape():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--shapes", "Qwen3-0.6B",
                           "--worlds", "1,8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {(r[2], r[3]): [float(x) for x in r[4:9]] for r in (line.split() for line in done.stdout.splitlines())
            if r[0] == "Qwen3-0.6B"}
    full, sharded = rows[("8", "replicated")], rows[("8", "fsdp")]
    assert full[0] > 9 and abs(sharded[0] - full[0] / 8) < 0.02  # 16 bytes a parameter, an eighth of it each
    assert abs(sum(full[2:5]) - full[0]) < 0.02  # parameters + gradients + AdamW


def test_gpu_check_runs_small_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), str(tmp_path), "--small",
                           "--parts", "rollout,update_checkpointing,fsdp"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["fsdp"]["restored_exactly"] and "model.safetensors" in report["fsdp"]["exported"]
    assert report["update_checkpointing"]["tokens_per_second"] > 0
