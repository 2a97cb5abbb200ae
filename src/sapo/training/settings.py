"""The flat `TrainConfig`, split by who reads it: each phase of the loop gets one frozen view,
whole. This is the one place where config fields are handed to the knobs of the phases (and of
`policy_loss`); tests/training/test_wiring.py checks every slot."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..algorithms import LossSettings
from ..algorithms.mismatch import CorrectionSettings
from ..config import TrainConfig
from ..engines import SamplingSettings, VLLMSettings
from ..engines.factory import EngineSettings
from ..model.logprobs import ForwardSettings
from ..model.sharding import ModelSettings
from ..rewards import RewardSettings
from .evaluation import EvalSettings
from .reward import AdvantageSettings
from .rollout import RolloutSettings
from .update import UpdateSettings


@dataclass(frozen=True)
class RunSettings:
    model: ModelSettings
    engine: EngineSettings
    rollout: RolloutSettings
    rewards: RewardSettings
    advantage: AdvantageSettings
    update: UpdateSettings
    evaluation: EvalSettings

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "RunSettings":
        sampling = SamplingSettings(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                    top_p=cfg.top_p, max_num_seqs=cfg.max_num_seqs)
        forward = ForwardSettings(temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size,
                                  padding_free=cfg.padding_free, micro_batch_size=cfg.micro_batch_size,
                                  max_tokens_per_micro_batch=cfg.max_tokens_per_micro_batch)
        loss = LossSettings(loss_type=cfg.loss_type, tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg, epsilon=cfg.epsilon,
                            epsilon_high=cfg.epsilon_high, beta=cfg.beta, aggregation=cfg.aggregation,
                            max_tokens=cfg.max_completion_length)
        weights = None if cfg.reward_weights is None else tuple(cfg.reward_weights)
        needs_old_logprobs = cfg.num_minibatches > 1 or cfg.num_iterations > 1
        # The engine is the training forward only when it samples with the float32 policy itself.
        exact_engine = cfg.rollout_engine == "hf" and cfg.rollout_dtype == "float32"
        correct = (not exact_engine) if cfg.vllm_importance_sampling_correction is None \
            else cfg.vllm_importance_sampling_correction
        correction = CorrectionSettings(mode=cfg.vllm_importance_sampling_mode,
                                        clip_min=cfg.vllm_importance_sampling_clip_min,
                                        clip_max=cfg.vllm_importance_sampling_clip_max) if correct else None
        vllm = VLLMSettings(mode=cfg.vllm_mode, server_base_url=cfg.vllm_server_base_url,
                            server_timeout=cfg.vllm_server_timeout,
                            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                            tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                            enable_sleep_mode=cfg.vllm_enable_sleep_mode, model=cfg.model,
                            max_model_len=cfg.max_prompt_length + cfg.max_completion_length)
        use_rollout_logprobs = cfg.use_rollout_logprobs and exact_engine
        # The engine's routing is the behaviour routing where its log-probabilities are pi_old (r2),
        # and what r3 replays; a dense model's engine finds no routers and reports none.
        routed = cfg.routing_replay == "r3" or (needs_old_logprobs and use_rollout_logprobs)
        return cls(
            engine=EngineSettings(name=cfg.rollout_engine, dtype=cfg.rollout_dtype, vllm=vllm),
            model=ModelSettings(fsdp=cfg.fsdp, param_dtype=cfg.param_dtype, cpu_offload=cfg.cpu_offload,
                                gradient_checkpointing=cfg.gradient_checkpointing),
            rollout=RolloutSettings(group_size=cfg.num_generations,
                                    sampling=dataclasses.replace(sampling, return_routed_experts=routed),
                                    forward=forward, needs_old_logprobs=needs_old_logprobs,
                                    use_rollout_logprobs=use_rollout_logprobs, routing_replay=cfg.routing_replay,
                                    seed=cfg.seed),
            rewards=RewardSettings(weights=weights, skip_errors=cfg.skip_reward_errors),
            advantage=AdvantageSettings(group_size=cfg.num_generations, scale=cfg.scale_rewards),
            update=UpdateSettings(group_size=cfg.num_generations, num_minibatches=cfg.num_minibatches,
                                  num_iterations=cfg.num_iterations, max_grad_norm=cfg.max_grad_norm,
                                  max_nonfinite_steps=cfg.max_nonfinite_steps,
                                  mask_truncated_completions=cfg.mask_truncated_completions, seed=cfg.seed,
                                  learning_rate=cfg.learning_rate, loss=loss, forward=forward, correction=correction,
                                  track_mismatch=correction is not None or not exact_engine,
                                  routing_replay=cfg.routing_replay, router_aux_loss_coef=cfg.router_aux_loss_coef),
            evaluation=EvalSettings(samples=cfg.eval_num_generations, greedy=cfg.eval_greedy, sampling=sampling,
                                    rewards=RewardSettings(weights=weights, skip_errors=True), seed=cfg.seed),
        )
