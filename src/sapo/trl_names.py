"""TRL's names and spellings, translated: `GRPOConfig` fields that are called otherwise here (an
unknown-field error points to ours), TRL `loss_type` values that are an aggregation here, and
values written as TRL takes them. The full name map is in docs/training.md."""

from __future__ import annotations

from typing import Any

# TRL GRPOConfig fields that are not ours, and what stands for them here.
TRL_FIELDS = {
    "steps_per_generation": "num_minibatches = steps_per_generation / gradient_accumulation_steps, the optimizer "
                            "steps per rollout batch",
    "generation_batch_size": "prompts_per_step = generation_batch_size / num_generations",
    "per_device_train_batch_size": "micro_batch_size (responses per forward pass); a minibatch is "
                                   "prompts_per_step * num_generations / num_minibatches responses",
    "gradient_accumulation_steps": "none: each minibatch is one optimizer step, split in micro_batch_size pieces",
    "num_train_epochs": "max_steps (rollout steps)",
    "lr_scheduler_type": "lr_scheduler",
    "importance_sampling_level": "loss_type=gspo for the sequence level",
    "sapo_temperature_pos": "tau_pos",
    "sapo_temperature_neg": "tau_neg",
    "use_vllm": "rollout_engine=vllm (with vllm_mode, vllm_server_base_url as in TRL)",
    "vllm_server_host": "vllm_server_base_url=http://HOST:PORT",
    "vllm_server_port": "vllm_server_base_url=http://HOST:PORT",
}
# TRL loss_type values that are an aggregation (and reward scaling) here.
TRL_LOSS_TYPES = {
    "dapo": "loss_type=grpo aggregation=token-mean",
    "bnpo": "loss_type=grpo aggregation=token-mean",
    "dr_grpo": "loss_type=grpo aggregation=seq-mean-token-sum-norm scale_rewards=none",
}


def from_trl(name: str, value: Any) -> Any:
    """A field's value as TRL spells it, in our spelling: scale_rewards true/false,
    resume_from_checkpoint true, report_to "none", one reward function not in a list."""
    if name == "scale_rewards" and isinstance(value, bool):
        return "group" if value else "none"
    if name == "resume_from_checkpoint" and isinstance(value, bool):
        return "latest" if value else None
    if name == "report_to" and value in ("none", ["none"]):
        return ["jsonl"]
    if name == "reward_funcs" and callable(value):
        return [value]
    return value
