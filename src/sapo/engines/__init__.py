"""Rollout engines: what samples the completions (`base.py` is the interface the trainer calls;
`hf.py` samples with the training model itself; `vllm_server.py` and `vllm_colocate.py` with
vLLM; `factory.py` builds the one the config names)."""

from .base import Generation, RolloutEngine, SamplingSettings, VLLMSettings
from .hf import HFEngine, sample_groups, top_p_filter

__all__ = ["Generation", "HFEngine", "RolloutEngine", "SamplingSettings", "VLLMSettings", "sample_groups",
           "top_p_filter"]
