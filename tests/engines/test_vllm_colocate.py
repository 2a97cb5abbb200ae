"""The colocated vLLM engine against a stand-in `vllm` module that records the calls it gets and
answers as vLLM's `LLM` does (RequestOutput.outputs[j].token_ids / .logprobs / .finish_reason).
This checks sapo's side of the calls only: no real vLLM runs here (docs/engines.md)."""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from sapo.config import TrainConfig
from sapo.engines import SamplingSettings
from sapo.engines.factory import EngineContext, build_engine
from sapo.errors import ConfigError
from sapo.model.loading import load_model, load_tokenizer
from sapo.training.settings import RunSettings


@dataclass
class _Logprob:
    logprob: float


def _stand_in_vllm(calls: list, loaded: dict):
    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            calls.append(("LLM", kwargs))
            model = types.SimpleNamespace(load_weights=lambda weights: loaded.update(weights))
            runner = types.SimpleNamespace(model=model)
            self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=runner)))

        def sleep(self, level):
            calls.append(("sleep", level))

        def wake_up(self, tags):
            calls.append(("wake_up", tuple(tags)))

        def reset_prefix_cache(self):
            calls.append(("reset_prefix_cache",))

        def generate(self, prompts, sampling_params, use_tqdm):
            calls.append(("generate", [p["prompt_token_ids"] for p in prompts], [s.kwargs for s in sampling_params]))
            outputs = []
            for prompt, params in zip(prompts, sampling_params, strict=True):
                rows = []
                for j in range(params.kwargs["n"]):
                    n = 1 + (len(prompt["prompt_token_ids"]) + j) % params.kwargs["max_tokens"]
                    ids = [(7 * j + t) % 50 + 2 for t in range(n)]
                    rows.append(types.SimpleNamespace(
                        token_ids=ids, logprobs=[{i: _Logprob(-0.1 * (t + 1)), 99: _Logprob(-9.0)}
                                                 for t, i in enumerate(ids)],
                        finish_reason="length" if n == params.kwargs["max_tokens"] else "stop"))
                outputs.append(types.SimpleNamespace(outputs=rows))
            return outputs

    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)


@pytest.mark.parametrize("sleep", [False, True])
def test_colocated_engine_calls(base_config, monkeypatch, sleep):
    calls, loaded = [], {}
    monkeypatch.setitem(sys.modules, "vllm", _stand_in_vllm(calls, loaded))
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                                 "MASTER_PORT")}
    monkeypatch.setattr(os, "environ", environ)  # what the engine sets for vLLM's launcher stays in the test
    config = TrainConfig(**{**base_config, "rollout_engine": "vllm", "vllm_mode": "colocate",
                            "vllm_enable_sleep_mode": sleep, "vllm_gpu_memory_utilization": 0.4}).validate()
    settings = RunSettings.from_config(config)
    model, tokenizer = load_model(config.model), load_tokenizer(config.model)
    engine = build_engine(settings.engine, EngineContext(model=model, tokenizer=tokenizer, device=torch.device("cpu"),
                                                         sync_root=config.output_dir))
    name, kwargs = calls[0]
    assert name == "LLM" and kwargs["model"] == config.model and kwargs["gpu_memory_utilization"] == 0.4
    assert kwargs["logprobs_mode"] == "processed_logprobs" and kwargs["distributed_executor_backend"] == \
        "external_launcher" and kwargs["enable_sleep_mode"] is sleep
    assert kwargs["max_model_len"] == config.max_prompt_length + config.max_completion_length
    assert environ["RANK"] == "0" and environ["WORLD_SIZE"] == "1" and environ["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(environ["MASTER_PORT"]) < 65536  # env:// rendezvous even for one process

    engine.sync(model, version=0)
    assert set(loaded) == set(model.state_dict()) and all(torch.equal(loaded[k], v)
                                                           for k, v in model.state_dict().items())
    sampling = SamplingSettings(max_new_tokens=4, temperature=0.7)
    gen = engine.generate([[3, 4, 5], [6, 7]], 3, sampling, seeds=[11, 12])
    _, prompts, params = next(c for c in calls if c[0] == "generate")
    assert prompts == [[3, 4, 5], [6, 7]] and [p["seed"] for p in params] == [11, 12]
    assert all(p["n"] == 3 and p["logprobs"] == 0 and p["temperature"] == 0.7 for p in params)
    assert gen.completion_ids.shape == (6, 4)
    lengths = gen.completion_mask.sum(1)
    assert lengths.tolist() == [4, 1, 2, 3, 4, 1]
    assert gen.truncated.tolist() == [n == 4 for n in lengths.tolist()]
    assert torch.allclose(gen.logprobs[1, :1], torch.tensor([-0.1])) and (gen.logprobs[1, 1:] == 0).all()
    loaded.clear()
    engine.generate([[3, 4, 5]], 2, sampling, seeds=[13])  # a second generation after one sync (evaluation)
    order = [c[0] if c[0] != "wake_up" else c[1] for c in calls]
    if sleep:  # level 2 sleep drops the weights after each generation: they are pushed again before the next
        assert order == ["LLM", "sleep", ("weights",), "reset_prefix_cache", ("kv_cache",), "generate", "sleep",
                         ("weights",), "reset_prefix_cache", ("kv_cache",), "generate", "sleep"]
        assert set(loaded) == set(model.state_dict())
    else:
        assert order == ["LLM", "reset_prefix_cache", "generate", "generate"] and not loaded
        engine.sync(model, version=0)  # a version synced already is not pushed again
        assert not loaded


def test_colocate_without_vllm_names_the_extra(base_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    config = TrainConfig(**{**base_config, "rollout_engine": "vllm", "vllm_mode": "colocate"}).validate()
    model, tokenizer = load_model(config.model), load_tokenizer(config.model)
    with pytest.raises(ConfigError, match=r"pip install 'sapo-rl\[vllm\]'"):
        build_engine(RunSettings.from_config(config).engine,
                     EngineContext(model=model, tokenizer=tokenizer, device=torch.device("cpu"),
                                   sync_root=config.output_dir))
