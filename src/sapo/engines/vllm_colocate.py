"""The `vllm` engine in colocate mode: a `vllm.LLM` inside each training process, sharing its
GPU, as TRL's `vllm_mode="colocate"` does: `distributed_executor_backend="external_launcher"`
(vLLM joins the trainer's processes instead of starting its own), `logprobs_mode=
"processed_logprobs"` (log-probabilities of the temperature-scaled distribution it samples from),
weights pushed in-process with the model's `load_weights`, and with sleep mode the weights and
KV cache freed while the trainer updates (`sleep(level=2)`, `wake_up(tags=...)`).

Never run: vLLM is a CUDA build that cannot be installed beside the CPU test stack. Tests drive
this module against a stand-in `vllm` module that records the calls (tests/engines).
"""

from __future__ import annotations

import os
import socket

import torch

from ..errors import ConfigError
from .base import Generation, SamplingSettings, VLLMSettings, generation_from_lists
from .vllm_server import full_state_dict


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(f"rollout_engine=vllm with vllm_mode=colocate needs vLLM in this environment ({err}): "
                          "pip install 'sapo-rl[vllm]' on a CUDA machine, or use vllm_mode=server with a vLLM "
                          "server running elsewhere") from None
    return vllm


class VLLMColocateEngine:
    """One `vllm.LLM` per training process (or per tensor-parallel group of them)."""

    def __init__(self, settings: VLLMSettings, *, pad_token_id: int, device: torch.device, process_index: int = 0,
                 local_process_index: int = 0, num_processes: int = 1) -> None:
        vllm = _import_vllm()
        self.vllm = vllm
        self.settings = settings
        self.pad_token_id, self.device = pad_token_id, device
        # vLLM's external launcher joins torch.distributed through env://: the process layout as
        # torchrun sets it, and a rendezvous address even for a single process (as TRL's
        # ensure_master_addr_port does).
        os.environ.setdefault("RANK", str(process_index))
        os.environ.setdefault("LOCAL_RANK", str(local_process_index))
        os.environ.setdefault("WORLD_SIZE", str(num_processes))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
        self.llm = vllm.LLM(model=settings.model, tensor_parallel_size=settings.tensor_parallel_size,
                            gpu_memory_utilization=settings.gpu_memory_utilization,
                            max_model_len=settings.max_model_len, enable_sleep_mode=settings.enable_sleep_mode,
                            distributed_executor_backend="external_launcher",
                            seed=process_index // settings.tensor_parallel_size,
                            # TRL's value: vLLM's memory profiler is misled by its much larger default
                            max_num_batched_tokens=4096, logprobs_mode="processed_logprobs")
        # Level 2 sleep frees the weights as well as the KV cache: they are pushed whole again.
        self._weights_asleep = self._cache_asleep = settings.enable_sleep_mode
        if settings.enable_sleep_mode:
            self.llm.sleep(level=2)
        self._model = None
        self._synced_version: int | None = None

    def _runner_model(self):
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    def sync(self, model, version: int | None = None) -> None:
        self._model = model
        if version is not None and version == self._synced_version and not self._weights_asleep:
            return
        if self._weights_asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False
        self._runner_model().load_weights(list(full_state_dict(model).items()))
        self.llm.reset_prefix_cache()
        self._synced_version = version

    def generate(self, prompt_ids: list[list[int]], group_size: int, sampling: SamplingSettings,
                 seeds: list[int]) -> Generation:
        vllm = self.vllm
        if self._weights_asleep:  # a second generation after one sync (the evaluation's greedy pass)
            self.sync(self._model, self._synced_version)
        if self._cache_asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._cache_asleep = False
        params = [vllm.SamplingParams(n=group_size, seed=seed, max_tokens=sampling.max_new_tokens,
                                      temperature=sampling.temperature, top_p=sampling.top_p, logprobs=0)
                  for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], sampling_params=params,
                                    use_tqdm=False)
        if self.settings.enable_sleep_mode:
            self.llm.sleep(level=2)
            self._weights_asleep = self._cache_asleep = True
        token_ids, logprobs, finish = [], [], []
        for request in outputs:
            for out in request.outputs:
                ids = list(out.token_ids)
                token_ids.append(ids)
                # out.logprobs: per drawn token, {token id: Logprob}, the drawn one among them
                logprobs.append([step[i].logprob for step, i in zip(out.logprobs, ids, strict=True)])
                finish.append(out.finish_reason)
        return generation_from_lists(token_ids, None if sampling.temperature == 0 else logprobs, finish,
                                     pad_token_id=self.pad_token_id, device=self.device)
