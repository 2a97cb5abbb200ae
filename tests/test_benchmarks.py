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


def test_update_profile_runs_and_its_shared_prompt_layout_scores_the_same_tokens():
    # The script asserts that one row per prompt gives the logits of one row per sample.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_update.py"), "--steps", "1",
                           "--batch", "8", "--shared-prefix", "--samples-per-prompt", "4"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prompt shared:       2 x 30 = 60 tokens" in done.stdout and "total" in done.stdout
