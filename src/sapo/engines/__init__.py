"""Rollout engines: what samples the completions (`base.py` is the interface the trainer calls;
`hf.py` samples with the training model itself)."""

from .base import Generation, RolloutEngine, SamplingSettings
from .hf import HFEngine, sample_groups, top_p_filter

__all__ = ["Generation", "HFEngine", "RolloutEngine", "SamplingSettings", "sample_groups", "top_p_filter"]
