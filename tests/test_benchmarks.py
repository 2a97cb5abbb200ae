"""The benchmark scripts start and fail clearly without their optional dependencies (timings
themselves are not tested: see docs/performance.md)."""

import importlib.util
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
    assert len(rows) == 2 and all(float(r[-1].rstrip("x")) > 0 for r in rows)


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
