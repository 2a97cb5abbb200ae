"""`TrainConfig`: every knob of a run, with TRL's names where the meaning is the same.

Loaded from YAML, overridden by `key=value` strings, checked up front by `validate()` so a
mistake is an error naming the field and the fix before any model is loaded.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .algorithms import SCALES, available_aggregations, available_policy_losses, check_settings
from .algorithms.mismatch import MODES as IS_MODES
from .errors import ConfigError
from .trl_names import TRL_FIELDS, TRL_LOSS_TYPES, from_trl

LR_SCHEDULERS = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
ROLLOUT_ENGINES = ("hf", "vllm")
VLLM_MODES = ("server", "colocate")
ROUTING_REPLAYS = ("none", "r2", "r3")
REPORTERS = ("jsonl", "tensorboard", "wandb")
SHIPPED_MODELS = ("arithmetic-tiny", "moe-tiny")  # in src/sapo/assets; `sapo warmstart` regenerates them


def resolve_model(model: str) -> str:
    """A shipped model's name -> its directory inside the package; anything else (or a name that
    is also a local path here) unchanged."""
    if model in SHIPPED_MODELS and not Path(model).exists():
        from importlib.resources import files

        return str(files(__package__) / "assets" / model)
    return model


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; in a config that is a silent typo."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        merges = [k for k, _ in node.value if k.tag == "tag:yaml.org,2002:merge"]
        if len(merges) > 1:
            raise ConfigError(f"'<<' is given twice (lines {merges[0].start_mark.line + 1} and "
                              f"{merges[1].start_mark.line + 1}); merge several mappings with <<: [*a, *b]")
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges a mapping in, and the keys after it may override it
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not key_node.start_mark:
                raise ConfigError(f"key {key!r} is given twice (lines {first.line + 1} and "
                                  f"{key_node.start_mark.line + 1}); keep one")
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML config file's `field: value` mapping; every problem is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r}: {err.strerror}") from None
    except ConfigError as err:
        raise ConfigError(f"config file {str(path)!r}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of field: value, got {type(loaded).__name__}")
    return loaded


@dataclass
class TrainConfig:
    # --- model and data ---
    model: str = ""
    """Local path of a Hugging Face causal LM directory (anything AutoModelForCausalLM loads), or
    a shipped model's name: "arithmetic-tiny" (dense) or "moe-tiny" (Qwen3-MoE)."""
    dataset: str = ""
    """A local .jsonl, .json or .parquet file with a `prompt` column, or a built-in task name."""
    dataset_format: str = "trl"
    """Rows of `dataset`/`eval_dataset` files: "trl" (a `prompt` column), "gsm8k" (`question`,
    `answer` ending in "#### 42") or "math" (`problem`, `solution` with a \\boxed{} answer)."""
    prompt_template: str = "{question}\nPut your final answer within \\boxed{{}}."
    """Prompt of a "gsm8k" or "math" row; {question} is replaced by its question or problem."""
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    """Options of a built-in task, e.g. {digits: 3, operands: 3} (`sapo tasks` lists them)."""
    eval_dataset: str | None = None
    """Held-out prompts in the same format, scored every `eval_steps`; None: no evaluation."""
    reward_funcs: list[str | Callable] = field(default_factory=list)
    """Reward functions: "path/to/file.py:function", "package.module:function" or built-in names;
    from Python also the functions themselves (config.yaml keeps their names)."""
    reward_weights: list[float] | None = None
    """One weight per reward function; None weighs them all 1.0."""
    skip_reward_errors: bool = False
    """If a reward function raises: False stops the run naming it and the sample; True scores the
    sample as 'does not apply' (advantage 0) and counts it in `rewards/errors`. A SystemExit
    (sys.exit) always stops the run."""
    allow_unsandboxed_code: bool = False
    """Let code rewards run programs without bubblewrap's isolation (no network namespace) when it
    is unavailable; by default the run refuses to start."""
    filter_overlong_prompts: bool = False
    """Drop prompts longer than `max_prompt_length` tokens instead of stopping with an error."""

    # --- rollout ---
    num_generations: int = 8
    """G: responses sampled per prompt (the group of the group-relative advantage); at least 2."""
    prompts_per_step: int = 8
    """Prompts per rollout batch; the batch holds prompts_per_step * num_generations responses."""
    max_prompt_length: int = 512
    """Longest prompt in tokens (see `filter_overlong_prompts`)."""
    max_completion_length: int = 256
    """Most tokens sampled per response; a response that reaches it without EOS is truncated."""
    temperature: float = 1.0
    """Sampling temperature; log-probabilities are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""

    # --- rollout engine (docs/engines.md) ---
    rollout_engine: str = "hf"
    """What samples the rollouts: "hf", the training model itself through sapo-rl's sampler (or
    a low-precision copy of it, `rollout_dtype`); "vllm", a vLLM server or a colocated vLLM
    (`vllm_mode`, docs/engines.md), whose log-probabilities are corrected for (importance sampling)."""
    rollout_dtype: str = "float32"
    """Weights the hf engine samples with: "float32" (the policy itself) or "bfloat16" (a copy
    refreshed from the policy before every rollout; the update stays float32). A bfloat16 copy
    samples from a slightly different distribution than the trainer's: pi_old then comes from a
    forward pass, and the importance sampling correction is on by default."""
    vllm_mode: str = "server"
    """With rollout_engine=vllm: "server" (HTTP to a `vllm serve` process; `sapo vllm-serve MODEL`
    prints its command) or "colocate" (vllm.LLM inside each training process, on its GPU)."""
    vllm_server_base_url: str = "http://localhost:8000"
    """vllm_mode=server: where the server listens. The weights are synced through a directory
    under output_dir, which the server must be able to read (same machine or a shared disk)."""
    vllm_server_timeout: float = 240.0
    """vllm_mode=server: seconds to wait at start-up for the server to answer."""
    vllm_gpu_memory_utilization: float = 0.3
    """vllm_mode=colocate: share of the GPU's memory vLLM takes (weights and KV cache); the rest
    is the trainer's. Server mode: set on the server (`sapo vllm-serve` prints it)."""
    vllm_tensor_parallel_size: int = 1
    """GPUs one vLLM instance is split over (server mode: a server flag `sapo vllm-serve` prints)."""
    vllm_enable_sleep_mode: bool = False
    """vllm_mode=colocate: free vLLM's weights and KV cache while the trainer updates, and
    reload them before each rollout (less memory, more time per step)."""
    vllm_importance_sampling_correction: bool | None = None
    """Weight each token's objective by pi_old / pi_rollout (TRL's name): the trainer's
    log-probability of a sampled token over the rollout engine's. None: on where the engine is
    not the training forward (rollout_dtype=bfloat16), off where it is."""
    vllm_importance_sampling_mode: str = "sequence_mask"
    """"token_truncate" (TIS), "token_mask", "sequence_truncate" or "sequence_mask" (MIS):
    per-token or per-sequence ratios, truncated to or masked outside the clip bounds."""
    vllm_importance_sampling_clip_max: float | None = 3.0
    """C_max: truncated modes cap the ratio at it; mask modes zero ratios above it (a positive number)."""
    vllm_importance_sampling_clip_min: float | None = None
    """C_min: truncated modes raise ratios below it to it; mask modes zero ratios below it (None: no bound)."""

    # --- policy update ---
    num_minibatches: int = 4
    """Optimizer steps per rollout batch (the paper uses 4): minibatches after the first are off-policy."""
    num_iterations: int = 1
    """Passes over each rollout batch (TRL's num_iterations, PPO epochs)."""
    micro_batch_size: int = 8
    """Responses per forward/backward pass; gradients are accumulated so the update does not depend on it."""
    logprob_chunk_size: int = 8192
    """Vocabulary entries per chunk when computing log-probabilities from the final hidden states
    (`sapo.token_logprobs`): no (tokens x vocabulary) logits are held. Used when the vocabulary
    is larger than one chunk (smaller ones gain nothing); 0: always full logits + log_softmax.
    Models whose output layer is not a plain linear layer use full logits anyway."""
    padding_free: bool = True
    """Score completions on padding-free rows (TRL's padding_free, verl's use_remove_padding):
    a row holds a prompt once, then the completions of its samples in the micro-batch, with a
    block attention mask; rows are at most two padded rows long, and used only where a cost
    model (`sapo.model.packing.layout_cost`: tokens, plus attention growing with the square of
    a row's length, dearer under a block mask) rates them cheaper than padded rows: not for long
    completions after short prompts, where the rows' longer attention costs more than the
    prompts they save. Same values up to rounding. Models that cannot take
    the mask (attention other than sdpa/eager, layers that attend locally: sliding windows,
    chunked or linear attention; or values that differ from padded rows at the first check)
    keep padded rows."""
    max_num_seqs: int = 0
    """Most sequences sampled in one decoding batch (vLLM's and verl's max_num_seqs), rounded
    down to whole groups but at least one group; 0: the whole rollout batch at once. Lower it
    when the KV cache of the whole batch does not fit. Samples do not depend on it (each group
    has its own seed), up to the numerics of batching. Also used by the evaluation."""
    use_rollout_logprobs: bool = True
    """Take pi_old from the log-probabilities computed while sampling (verl's rollout log-probs)
    instead of a separate forward pass over the batch. They are the same model and weights in
    eval mode; only batching and KV-cache numerics differ (below 1e-6 in float32, more in
    bfloat16). False recomputes them with a full forward pass."""
    optim: str = "adamw"
    """Optimizer: "adamw" (torch.optim.AdamW) or "sgd" (plain gradient steps, handy to compare updates)."""
    learning_rate: float = 1e-6
    """Peak learning rate."""
    lr_scheduler: str = "constant"
    """"constant", "linear" or "cosine" decay after warmup, over max_steps * optimizer steps per step."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping; the norm is still logged)."""
    max_nonfinite_steps: int = 3
    """Optimizer steps in a row that may be skipped because their loss, gradient norm or loss
    inputs are NaN or infinite (no update; the schedule moves on; counted in `nonfinite_steps`)
    before the run stops with an error; 0 stops at the first. Parameters that become non-finite
    stop the run at once. Either way no checkpoint is written with non-finite parameters."""
    loss_type: str = "sapo"
    """Policy objective: "sapo", "grpo", "gspo" or a registered custom one."""
    tau_pos: float = 1.0
    """SAPO gate temperature for positive advantages."""
    tau_neg: float = 1.05
    """SAPO gate temperature for non-positive advantages (larger damps faster)."""
    epsilon: float | None = None
    """Lower clip width for grpo/gspo; None: 0.2 (grpo), 3e-4 (gspo)."""
    epsilon_high: float | None = None
    """Upper clip width for grpo/gspo; None: epsilon (grpo), 4e-4 (gspo)."""
    beta: float = 0.0
    """KL coefficient to the frozen initial model (k3 estimator); 0 loads no reference model."""
    scale_rewards: str = "group"
    """Advantage scaling: "group" (GRPO), "batch" or "none" (Dr. GRPO)."""
    aggregation: str = "seq-mean-token-mean"
    """Token aggregation: "seq-mean-token-mean" (the paper's), "token-mean", "seq-mean-token-sum",
    "seq-mean-token-sum-norm" (divides by max_completion_length)."""
    mask_truncated_completions: bool = False
    """Leave responses that hit max_completion_length out of the loss (they still get rewards)."""
    routing_replay: str = "none"
    """Mixture-of-Experts routing replay (docs/moe.md): "none"; "r2", the experts each token was
    routed to in the behaviour pass (the forward that gives pi_old) are forced in every update
    forward of that rollout batch, with the gate weights recomputed from the current router's
    logits over them (the router still learns); "r3", the experts the rollout engine chose while
    sampling are forced in the behaviour pass and the update. Needs a model whose routers sapo-rl
    knows (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3 style)."""
    router_aux_loss_coef: float = 0.0
    """Weight of the MoE router's load-balancing loss (transformers' load_balancing_loss_func over
    the update's router logits) added to the objective; logged as `moe/aux_loss`. 0: not computed."""

    # --- memory and scale (docs/scaling.md) ---
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state over the processes with PyTorch's FSDP2
    (`fully_shard` on each decoder layer and on the root); launch 2 or more processes with
    torchrun or accelerate launch. Checkpoints are then sharded (torch.distributed.checkpoint);
    `sapo export` turns one into a model directory."""
    param_dtype: str = "float32"
    """With fsdp: dtype of the gathered parameters in forward and backward, "float32" or
    "bfloat16"; the sharded masters, the gradient reduction and the optimizer state stay float32
    (FSDP2's MixedPrecisionPolicy). Without fsdp, `dtype` (autocast) does this job."""
    cpu_offload: bool = False
    """With fsdp on GPUs: keep the sharded parameters, gradients and optimizer state in host
    memory (FSDP2's CPUOffloadPolicy; the optimizer steps on the CPU)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (non-reentrant; transformers' activation checkpointing): far less activation memory for
    about one more forward pass of time. The update does not change."""
    max_tokens_per_micro_batch: int = 0
    """Pack micro-batches by the positions a forward pass computes instead of micro_batch_size
    sequences (verl's use_dynamic_bsz with ppo_max_token_len_per_gpu): each micro-batch is
    trimmed to its longest prompt and completion, and rows x (longest prompt + longest
    completion) stays within this; 0: off. It must hold the longest possible sample,
    max_prompt_length + max_completion_length. The update does not change: each micro-batch is
    divided by its whole minibatch's denominator."""

    # --- run ---
    max_steps: int = 100
    """Rollout steps (each: one rollout batch and num_minibatches * num_iterations optimizer steps)."""
    eval_steps: int = 0
    """Evaluate on eval_dataset every this many steps and at the end (0: only at the end, if set)."""
    eval_num_generations: int = 1
    """Samples per eval prompt, at the training temperature: eval/pass@1 is their mean
    correctness (reward >= 1), eval/pass@<n> the chance that one of n is correct."""
    eval_greedy: bool = True
    """Also decode each eval prompt greedily (eval/greedy_accuracy)."""
    save_steps: int = 0
    """Write a checkpoint every this many steps (0: only at the end)."""
    save_total_limit: int | None = None
    """Keep only the newest this many checkpoints (None: keep all)."""
    resume_from_checkpoint: str | None = None
    """"latest" (the newest checkpoint in output_dir, if any; a corrupt one is an error),
    "latest_valid" (the newest that passes its checksums, skipping corrupt newer ones) or a
    checkpoint directory."""
    output_dir: str = "outputs/run"
    """Where metrics, sampled completions and checkpoints go."""
    seed: int = 0
    """Seeds data order, sampling and minibatch shuffles: a run is reproducible."""
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    """Loggers: "jsonl" (always on), "tensorboard", "wandb" (optional extras)."""
    log_completions: int = 4
    """Responses per step written to completions.jsonl."""
    dtype: str = "auto"
    """Compute dtype of forward passes (autocast): "auto" (bfloat16 on GPUs that support it, else
    float32), "float32", "bfloat16", "float16" (CUDA only). Weights and optimizer state stay float32, and the
    objective is always computed in float32. With fsdp, param_dtype takes its place (no autocast)."""

    def __post_init__(self) -> None:
        # TRL's spellings of some values first; then every field is checked against its type, so
        # the Python API gets the same checks as YAML files and the command line.
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = from_trl(f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, _coerce(f.name, value, hints[f.name]))
        object.__setattr__(self, "model", resolve_model(self.model))

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_sources(cls, path: str | Path | None = None, overrides: list[str] | None = None,
                     base: dict[str, Any] | None = None) -> "TrainConfig":
        """`base` values, then a YAML file's (optional), then `key=value` overrides on top."""
        values: dict[str, Any] = dict(base or {})
        if path is not None:
            values.update(read_yaml_mapping(path))
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} is not key=value (e.g. loss_type=grpo)")
            try:
                values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                raise ConfigError(f"override {item!r}: the value is not valid YAML; quote it "
                                  f"({key.strip()}='\"...\"') or fix the brackets") from None
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
                if key in TRL_FIELDS:
                    hints.append(f"{key!r} (TRL's; here: {TRL_FIELDS[key]})")
                else:
                    hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise ConfigError(f"unknown config field(s): {', '.join(hints)}. "
                              "`sapo train --help-config` lists them all.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as config.yaml keeps them: a reward function given as a Python object
        by its name (a resumed run passes the function again)."""
        values = dataclasses.asdict(self)
        values["reward_funcs"] = [reward_name(f) for f in self.reward_funcs]
        return values

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def load_saved(cls, path: str | Path) -> "TrainConfig | None":
        """The config a run saved (its output_dir's or a checkpoint's config.yaml), or None if
        absent. Fields this version does not know (saved by another one) are left out."""
        path = Path(path)
        if not path.is_file():
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: v for k, v in read_yaml_mapping(path).items() if k in known})

    # ---------------------------------------------------------------- checks
    def validate(self) -> "TrainConfig":
        """Check what can be checked without loading anything; raises ConfigError."""
        need = []
        if not self.model:
            need.append("model (a local model directory)")
        if not self.dataset:
            need.append("dataset (a .jsonl/.json/.parquet file or a built-in task)")
        if not self.reward_funcs:
            need.append("reward_funcs (at least one reward function)")
        if need:
            raise ConfigError("missing required field(s): " + "; ".join(need))
        _require(self.num_generations >= 2, "num_generations", self.num_generations,
                 "must be at least 2: a group of one has no relative advantage")
        for name in ("prompts_per_step", "max_prompt_length", "max_completion_length", "num_minibatches",
                     "num_iterations", "micro_batch_size", "max_steps", "eval_num_generations"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be a positive integer")
        for name in ("eval_steps", "save_steps", "warmup_steps", "log_completions", "logprob_chunk_size",
                     "max_num_seqs", "max_nonfinite_steps", "max_tokens_per_micro_batch"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        batch = self.prompts_per_step * self.num_generations
        _require(batch % self.num_minibatches == 0, "num_minibatches", self.num_minibatches,
                 f"must divide the rollout batch prompts_per_step * num_generations = {batch}")
        _require(self.temperature > 0 and math.isfinite(self.temperature), "temperature", self.temperature,
                 "must be a positive number")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _require(0 <= self.learning_rate < math.inf, "learning_rate", self.learning_rate,
                 "must be a finite number >= 0")
        _require(0 <= self.max_grad_norm < math.inf, "max_grad_norm", self.max_grad_norm,
                 "must be a finite number >= 0 (0 disables clipping)")
        _require(0 <= self.weight_decay < math.inf, "weight_decay", self.weight_decay, "must be a finite number >= 0")
        _require(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32) (numpy's seed range)")
        _require(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit",
                 self.save_total_limit, "must be None or >= 1")
        if self.loss_type in TRL_LOSS_TYPES:
            raise ConfigError(f"loss_type={self.loss_type!r} is TRL's name for an aggregation; here it is "
                              f"{TRL_LOSS_TYPES[self.loss_type]}")
        _choice("loss_type", self.loss_type, available_policy_losses())
        _choice("aggregation", self.aggregation, available_aggregations())
        _choice("scale_rewards", self.scale_rewards, SCALES)
        _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("optim", self.optim, OPTIMIZERS)
        _choice("param_dtype", self.param_dtype, PARAM_DTYPES)
        _choice("routing_replay", self.routing_replay, ROUTING_REPLAYS)
        if self.routing_replay == "r3" and self.rollout_engine == "vllm":
            raise ConfigError("routing_replay=r3 with rollout_engine=vllm: the vllm engines do not return the experts "
                              "they routed to yet; use routing_replay=r2 (the trainer's behaviour pass records them)")
        _require(0 <= self.router_aux_loss_coef < math.inf, "router_aux_loss_coef", self.router_aux_loss_coef,
                 "must be a finite number >= 0 (0: no load-balancing loss)")
        self._check_scaling()
        self._check_rollout_engine()
        self._check_moe()
        _choice("dataset_format", self.dataset_format, ("trl", "gsm8k", "math"))
        for reporter in self.report_to:
            _choice("report_to", reporter, REPORTERS)
            module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(reporter)
            if module and importlib.util.find_spec(module) is None:
                raise ConfigError(f"report_to={reporter!r} needs the {reporter} package: "
                                  f"pip install 'sapo-rl[{reporter}]'")
        try:
            check_settings(self.tau_pos, self.tau_neg, self.epsilon, self.epsilon_high, self.beta)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        functions = [f for f in self.reward_funcs if callable(f)]
        for i, fn in enumerate(functions):
            twin = next((g for g in functions[:i] if g.__name__ == fn.__name__ and g is not fn), None)
            if twin is not None:
                raise ConfigError(f"reward_funcs: {twin!r} and {fn!r} are both named {fn.__name__!r}; config.yaml "
                                  "keeps names only, so a resume could not tell them apart: rename one")
        if self.reward_weights is not None:
            _require(len(self.reward_weights) == len(self.reward_funcs), "reward_weights", self.reward_weights,
                     f"needs one weight per reward function ({len(self.reward_funcs)})")
            _require(all(math.isfinite(w) for w in self.reward_weights), "reward_weights", self.reward_weights,
                     "must be finite numbers")
        if not Path(self.model).exists():
            raise ConfigError(f"model={self.model!r}: no such local path. sapo-rl loads models from disk; "
                              "point it at a directory saved with save_pretrained (or name a shipped model: "
                              f"{', '.join(SHIPPED_MODELS)})")
        if not (Path(self.model) / "config.json").is_file():
            raise ConfigError(f"model={self.model!r} is not a model directory (no config.json in it); point it at a "
                              "directory saved with save_pretrained")
        _require(not Path(self.output_dir).exists() or Path(self.output_dir).is_dir(), "output_dir", self.output_dir,
                 "is a file, not a directory")
        try:
            self.prompt_template.format(question="")
        except (KeyError, IndexError, ValueError, AttributeError) as err:
            raise ConfigError(f"prompt_template={self.prompt_template!r} is not a valid template "
                              f"({type(err).__name__}: {err}): its only field is {{question}}, and literal braces "
                              f"are written {{{{ }}}}") from None
        import torch

        _require(self.dtype != "float16" or torch.cuda.is_available(), "dtype", self.dtype,
                 "needs a CUDA GPU (there is no float16 autocast on the CPU); use bfloat16 or float32")
        return self

    def _check_moe(self) -> None:
        """Replay or a balancing loss on a dense model: refused here, from its config.json, so that
        `sapo compare` finds it before any arm runs (the trainer checks the routers themselves)."""
        if self.routing_replay == "none" and not self.router_aux_loss_coef:
            return
        path = Path(str(self.model)) / "config.json"
        if not path.is_file():
            return
        import json

        try:
            model_config = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # the loader reports a broken config.json
        if isinstance(model_config, dict) and not _moe_fields(model_config):
            what = (f"routing_replay={self.routing_replay}" if self.routing_replay != "none"
                    else "router_aux_loss_coef > 0")
            kind = model_config.get("model_type", self.model)
            raise ConfigError(f"{what}: {kind} is not a mixture-of-experts model; set routing_replay=none and "
                              "router_aux_loss_coef=0, or use a MoE model (model=moe-tiny)")

    def _check_rollout_engine(self) -> None:
        _choice("rollout_engine", self.rollout_engine, ROLLOUT_ENGINES)
        _choice("rollout_dtype", self.rollout_dtype, PARAM_DTYPES)
        _choice("vllm_mode", self.vllm_mode, VLLM_MODES)
        _require(self.rollout_engine == "hf" or self.rollout_dtype == "float32", "rollout_dtype", self.rollout_dtype,
                 "applies to rollout_engine=hf only (vLLM runs in the dtype its server or LLM loads): leave it float32")
        _require(self.vllm_server_base_url.startswith(("http://", "https://")), "vllm_server_base_url",
                 self.vllm_server_base_url, "must be an http:// or https:// address, e.g. http://localhost:8000")
        _require(0 < self.vllm_server_timeout < math.inf, "vllm_server_timeout", self.vllm_server_timeout,
                 "must be a positive number of seconds")
        _require(0 < self.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization",
                 self.vllm_gpu_memory_utilization, "must be in (0, 1]")
        _require(self.vllm_tensor_parallel_size >= 1, "vllm_tensor_parallel_size", self.vllm_tensor_parallel_size,
                 "must be >= 1")
        _require(not (self.rollout_engine == "vllm" and self.vllm_mode == "colocate")
                 or self.vllm_tensor_parallel_size == 1, "vllm_tensor_parallel_size", self.vllm_tensor_parallel_size,
                 "above 1 with vllm_mode=colocate is not built yet (each process's vLLM holds the whole model); "
                 "use vllm_mode=server for a tensor-parallel vLLM")
        _require(not (self.rollout_engine == "vllm" and self.vllm_mode == "colocate" and self.fsdp), "vllm_mode",
                 self.vllm_mode, "with fsdp=true is not built yet (each process's vLLM would need the whole "
                 "model's weights at every sync); use vllm_mode=server")
        _choice("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, IS_MODES)
        high, low = self.vllm_importance_sampling_clip_max, self.vllm_importance_sampling_clip_min
        _require(high is not None and 0 < high < math.inf, "vllm_importance_sampling_clip_max", high,
                 "must be a positive number: an unbounded weight of a far off sequence would swamp the step")
        _require(low is None or 0 <= low < math.inf, "vllm_importance_sampling_clip_min", low,
                 "must be a number >= 0 (or null: no lower bound)")
        _require(low is None or high is None or low < high, "vllm_importance_sampling_clip_min", low,
                 f"must be below vllm_importance_sampling_clip_max={high}")
        _require(self.rollout_dtype == "float32" or not self.fsdp, "rollout_dtype", self.rollout_dtype,
                 "is not supported with fsdp=true yet (the copy would hold the whole model on every process); "
                 "use rollout_dtype=float32")

    def _check_scaling(self) -> None:
        longest = self.max_prompt_length + self.max_completion_length
        _require(self.max_tokens_per_micro_batch == 0 or self.max_tokens_per_micro_batch >= longest,
                 "max_tokens_per_micro_batch", self.max_tokens_per_micro_batch,
                 f"must hold the longest sample, max_prompt_length + max_completion_length = {longest} (or be 0: "
                 "micro_batch_size sequences per micro-batch)")
        if not self.fsdp:
            _require(self.param_dtype == "float32", "param_dtype", self.param_dtype,
                     "needs fsdp=true; without sharding, dtype=bfloat16 runs the forward passes in bfloat16")
            _require(not self.cpu_offload, "cpu_offload", self.cpu_offload,
                     "needs fsdp=true (it offloads the sharded parameters and optimizer state)")
            return
        _require(self.dtype in ("auto", "float32"), "dtype", self.dtype,
                 "(autocast) is replaced by param_dtype with fsdp=true: set param_dtype=bfloat16 and leave dtype=auto")
        import torch

        _require(not self.cpu_offload or torch.cuda.is_available(), "cpu_offload", self.cpu_offload,
                 "needs a CUDA GPU: without one the parameters are in host memory already; set cpu_offload=false")


def _require(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} {why}")


def _moe_fields(config: dict) -> bool:
    """Whether a model's config.json (or its text config) describes a mixture of experts."""
    names = ("num_experts", "num_local_experts", "n_routed_experts")
    parts = [config, config.get("text_config") or {}]
    return any(isinstance(c.get(n), int) and c.get(n) > 1 for c in parts for n in names)


def _choice(name: str, value: Any, choices: Any) -> None:
    choices = list(choices)
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name}={value!r} is not one of {choices}.{hint}")


def reward_name(fn: str | Callable) -> str:
    """What config.yaml keeps of a reward function: its spec, or a Python function's name."""
    return fn if isinstance(fn, str) else fn.__name__


def _named_function(name: str, fn: Callable) -> Callable:
    """A function given in place of a name must have one to be saved under (not a lambda)."""
    if getattr(fn, "__name__", "<lambda>") == "<lambda>":
        raise ConfigError(f"{name}: {fn!r} has no name to save in config.yaml; define it with def, or register "
                          "it with @sapo.rewards.register_reward('name') and give that name")
    return fn


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a loaded value against the field's type; ints become floats where floats are wanted."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{name} cannot be empty (null)")
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1 and callable(value) and not isinstance(value, type):  # str | Callable
            return _named_function(name, value)
        return _coerce(name, value, inner[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping such as {{digits: 3}}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, (str, int, float)):
            value = [value]  # reward_funcs=my.py:f or report_to=tensorboard on the command line
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, v, args[0]) for v in value]
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """The docstring under each field, read from the source (dataclasses keep no field docs)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs
