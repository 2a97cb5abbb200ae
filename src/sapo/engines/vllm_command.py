"""The `vllm serve` command a training run with rollout_engine=vllm, vllm_mode=server needs
(`sapo vllm-serve` prints or runs it): the flags below are what sapo's server client relies on
(engines/vllm_server.py)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
"""vLLM serves its weight-update routes (/init_weight_transfer_engine, /update_weights, ...,
/pause, /resume) only in dev mode."""


def serve_command(model: str, *, host: str = "127.0.0.1", port: int = 8000, max_model_len: int | None = None,
                  tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                  dtype: str = "auto") -> list[str]:
    """argv of `vllm serve` for a sapo-rl run (run it with SERVER_ENV)."""
    argv = ["vllm", "serve", str(Path(model).resolve()), "--host", host, "--port", str(port),
            # log-probabilities of the temperature-scaled distribution it samples from, as the
            # importance sampling correction needs (vLLM's default is the raw model's)
            "--logprobs-mode", "processed_logprobs",
            # weights arrive as safetensors in a directory the trainer writes (no NCCL group)
            "--weight-transfer-config", json.dumps({"backend": "disk"}),
            # sample with exactly the request's settings, not the model's generation_config.json defaults
            "--generation-config", "vllm",
            "--tensor-parallel-size", str(tensor_parallel_size),
            "--gpu-memory-utilization", str(gpu_memory_utilization), "--dtype", dtype]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    return argv


def shell_line(argv: list[str]) -> str:
    return " ".join(f"{k}={v}" for k, v in SERVER_ENV.items()) + " " + shlex.join(argv)
