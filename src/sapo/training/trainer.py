"""The training loop. One step reads top to bottom in seven phases, each in a module of its own:
1. rollout (rollout.py), 2. reward and 3. advantage (reward.py), 4. policy update (update.py),
5. evaluate (evaluation.py), 6. log (tracking.py), 7. checkpoint (checkpoint.py). This file sets
the run up and wires the phases; settings.py hands each phase its view of the config."""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from transformers import TrainerState, get_scheduler

from ..config import TrainConfig
from ..data import PromptSet, gsm8k_rows, load_rows, math_rows, prepare_prompts, prompts_for_step
from ..engines.factory import EngineContext, build_engine
from ..errors import CheckpointError, ConfigError, EngineError, NonFiniteUpdateError
from ..model.loading import (
    check_sequence_lengths,
    disable_dropout,
    frozen_copy,
    load_model,
    load_tokenizer,
    mixed_precision,
)
from ..model.logprobs import settle_padding_free
from ..model.routing import MoERouting, check_routing_support, find_routers
from ..model.sharding import enable_gradient_checkpointing, load_sharded
from ..rewards import check_signature, load_reward_function
from . import evaluation
from .checkpoint import load_training_state, print_note, resolve_resume, restore_rng_state, save_checkpoint
from .identity import check_start, output_dir_state
from .output_dir import check_output_dir_usable, lock_output_dir
from .reward import advantages, reward_metrics, score_rollout
from .rollout import Rollout, batched_logprobs, behaviour_logprobs, sample
from .settings import RunSettings
from .summary import print_summary, summarize
from .tracking import RunLogger, progress_bar
from .update import NonFiniteSteps, PolicyState, parameters_finite, policy_update

_OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
_SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


class Trainer:
    """Sets a run up, reading only: the config is validated, the checkpoint to resume from is
    found and verified, the tokenizer, reward functions, data and model are loaded. `train()`
    then takes output_dir's lock, seeds, writes config.yaml and the logs, and runs the loop."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator | None = None) -> None:
        self.config = config.validate()
        self.settings = RunSettings.from_config(config)
        self.working_directory = os.getcwd()  # what the config's relative paths are relative to
        # Without a GPU, Accelerator() treats every launched process as a lone one; cpu=True makes a
        # multi-process launch use torch.distributed with gloo.
        # With fsdp the forward passes run in param_dtype (FSDP's mixed precision), not under autocast.
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(),
                                              mixed_precision="no" if config.fsdp else mixed_precision(config.dtype))
        if self.acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            raise ConfigError(f"distributed type {self.acc.distributed_type} is not supported: launch without "
                              "accelerate's FSDP or DeepSpeed plugin (torchrun, or accelerate launch --multi_gpu) and "
                              "set fsdp=true to shard the model with sapo-rl's own FSDP2")
        world = self.acc.num_processes
        if config.fsdp and world < 2:
            raise ConfigError("fsdp=true needs 2 or more processes: launch with torchrun --nproc_per_node N -m sapo "
                              "train ... (or accelerate launch), or set fsdp=false on one process")
        if config.prompts_per_step % world:
            raise ConfigError(f"prompts_per_step={config.prompts_per_step} must be a multiple of the number of "
                              f"processes ({world})")
        self.local_prompts = config.prompts_per_step // world
        if (self.local_prompts * config.num_generations) % config.num_minibatches:
            raise ConfigError(f"num_minibatches={config.num_minibatches} must divide each process's share of the "
                              f"rollout batch ({self.local_prompts} prompts x {config.num_generations} generations)")

        # Fail before loading anything; train() takes the lock. What is read here is compared
        # again under the lock: the state first, so that a change while reading shows.
        self._on_main(lambda: check_output_dir_usable(config.output_dir))
        checked_state = output_dir_state(config.output_dir)
        # The main process reads and checks every file of the checkpoint (shards included) once.
        self.resume_path, skipped = self._on_main(lambda: resolve_resume(
            config.resume_from_checkpoint, config.output_dir, num_processes=world, log=print_note), share=True)
        check_start(config, self.resume_path, skipped)
        self._checked = (checked_state, skipped)
        self.tokenizer = load_tokenizer(config.model)
        self.rewards = [load_reward_function(spec) for spec in config.reward_funcs]
        for reward in self.rewards:  # e.g. the code sandbox: fail now, not at the first rollout
            if callable(getattr(reward.fn, "prepare", None)):
                reward.fn.prepare(allow_unsandboxed=config.allow_unsandboxed_code)
        self.train_set = self._prompts(config.dataset, "train")
        self.eval_set = self._prompts(config.eval_dataset, "test") if config.eval_dataset else None

        # Weights a checkpoint lacks (a newly added head) are drawn from the run's seed, without
        # moving the global RNG (train() seeds it).
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(config.seed)
            model, ref_model = self._load_models()
        self.ref_model = ref_model
        # The fused AdamW kernel (CPU and CUDA) does one pass over the parameters instead of one per operation.
        fused = dict(fused=True) if config.optim == "adamw" and self.acc.device.type in ("cpu", "cuda") else {}
        optimizer = _OPTIMIZERS[config.optim](model.parameters(), lr=config.learning_rate,
                                              weight_decay=config.weight_decay, **fused)
        updates_per_step = config.num_minibatches * config.num_iterations
        scheduler = get_scheduler(_SCHEDULERS[config.lr_scheduler], optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=config.max_steps * updates_per_step)
        if not config.fsdp:  # a sharded model is FSDP's already: accelerate would wrap it in DDP
            model, optimizer = self.acc.prepare(model, optimizer)
        acc = self.acc
        policy = acc.unwrap_model(model)
        check_routing_support(policy, config.routing_replay, config.router_aux_loss_coef)
        self.state = PolicyState(model, optimizer, scheduler, acc, MoERouting(policy) if find_routers(policy) else None)
        self.engine = build_engine(self.settings.engine, EngineContext(
            model=acc.unwrap_model(model), tokenizer=self.tokenizer, device=acc.device,
            sync_root=Path(config.output_dir), lockstep=config.fsdp, process_index=acc.process_index,
            local_process_index=acc.local_process_index, num_processes=acc.num_processes, on_main=self._on_main))
        if config.vllm_importance_sampling_correction and config.rollout_engine == "hf" \
                and config.rollout_dtype == "float32":
            warnings.warn("vllm_importance_sampling_correction=true with rollout_engine=hf and rollout_dtype=float32: "
                          "the engine is the training forward, so there is nothing to correct (the weights are 1 up to "
                          "rounding)", stacklevel=2)

        self.start_step, self.wall_seconds_before, self._started = 0, 0.0, time.perf_counter()
        if self.resume_path is not None:
            trainer_state = load_training_state(self.resume_path, self.acc, optimizer, scheduler,
                                                sharded_model=model if config.fsdp else None)
            self.start_step = trainer_state["step"]
            self.wall_seconds_before = trainer_state.get("wall_seconds", 0.0)
        if config.fsdp:  # decided now, on every process alike: a check later would add forward passes on some
            for module in (model, ref_model):
                if module is not None:
                    settle_padding_free(module, self.settings.rollout.forward, self.acc.device)
        self.logger: RunLogger | None = None

    def _load_models(self):
        """The policy (from the checkpoint to resume, if any) and the reference model (beta > 0).
        Sharded: only the main process reads the weights, and a sharded checkpoint's are read
        with the optimizer state (load_training_state)."""
        cfg, settings, device = self.config, self.settings.model, self.acc.device
        if cfg.fsdp:
            model = load_sharded(cfg.model, settings, device)
            ref_model = load_sharded(cfg.model, settings, device, trainable=False) if cfg.beta > 0 else None
        else:
            model = disable_dropout(load_model(self.resume_path or cfg.model))
            if settings.gradient_checkpointing:
                enable_gradient_checkpointing(model)
            ref_model = frozen_copy(load_model(cfg.model)).to(device) if cfg.beta > 0 else None
        check_sequence_lengths(model.config, cfg.max_prompt_length, cfg.max_completion_length)
        return model, ref_model

    @property
    def model(self):
        return self.state.model

    @property
    def optimizer(self):
        return self.state.optimizer

    @property
    def scheduler(self):
        return self.state.scheduler

    def _prompts(self, spec: str, split: str) -> PromptSet:
        cfg = self.config
        if cfg.dataset_format == "trl":
            rows = load_rows(spec, split=split, task_kwargs=cfg.task_kwargs,
                             field="dataset" if split == "train" else "eval_dataset")
        else:
            rows = {"gsm8k": gsm8k_rows, "math": math_rows}[cfg.dataset_format](spec, cfg.prompt_template)
        prompts = prepare_prompts(rows, self.tokenizer, max_prompt_length=cfg.max_prompt_length,
                                  filter_overlong=cfg.filter_overlong_prompts, name=spec)
        columns = [k for k in prompts.rows[0] if k != "prompt"]
        for reward in self.rewards:
            check_signature(reward, columns)
        return prompts

    def _on_main(self, action, *, share: bool = False):
        """`action()` on the main process; a ConfigError (or EngineError) it raises is raised on
        every process, which would otherwise wait for the main one at the next collective. The
        result stays on the main process (None elsewhere) unless `share`."""
        result, failure = None, None
        if self.acc.is_main_process:
            try:
                result = action()
            except (ConfigError, EngineError) as err:
                failure = err
        if self.acc.num_processes > 1:
            failure, shared = broadcast_object_list([failure, result if share else None])
            result = shared if share else result
        if failure is not None:
            raise failure
        return result

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, float]]:
        """Run the loop; the logs are closed and output_dir's lock released however it ends."""
        if self.logger is not None:
            raise ConfigError("this Trainer has run already; continue the run with a new one "
                              "(resume_from_checkpoint=latest)")
        self.logger = self._open_run()
        exit_code = 1
        try:
            history = self._train()
            exit_code = 0
            return history
        finally:
            close = getattr(self.engine, "close", None)
            if close is not None:
                close()
            self.logger.close(exit_code)

    def _open_run(self) -> RunLogger:
        """Lock output_dir (the main process writes there; the other processes' RNG files go into
        its temporary checkpoint directories, under its lock), check that it still holds what
        the constructor read, write config.yaml, seed, and open the logs."""
        cfg = self.config
        lock = self._on_main(self._lock_and_write_config)
        try:
            set_seed(cfg.seed)
            if self.resume_path is not None:
                restore_rng_state(self.resume_path, self.acc)
            return RunLogger(cfg.output_dir, cfg.report_to, cfg.to_dict(), enabled=self.acc.is_main_process,
                             resume_step=self.start_step if self.resume_path else None, lock=lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def _lock_and_write_config(self):
        cfg = self.config
        lock = lock_output_dir(cfg.output_dir)
        try:
            if output_dir_state(cfg.output_dir) != self._checked[0]:
                raise CheckpointError(f"output_dir={cfg.output_dir!r} changed since this Trainer was set up (another "
                                      "run wrote there?); set it up again")
            check_start(cfg, self.resume_path, self._checked[1])
            path = Path(cfg.output_dir, "config.yaml")
            try:
                path.write_text(cfg.to_yaml())
            except OSError as err:
                raise ConfigError(f"could not write {path}: {err.strerror or err}") from None
        except BaseException:
            lock.release()
            raise
        return lock

    def _connect_engine(self) -> None:
        """An inference server's start-up checks (that it serves this run's model), once."""
        connect = getattr(self.engine, "connect", None)
        if connect is not None:
            connect(self.acc.unwrap_model(self.model), fresh=self.resume_path is None)

    def _train(self) -> list[dict[str, float]]:
        cfg, settings, history = self.config, self.settings, []
        self._connect_engine()
        self._started = time.perf_counter()
        if self.eval_set is not None and self.start_step == 0:  # the starting point, for before/after
            before = self.evaluate()
            self.logger.log(0, before)
            history.append({"step": 0, **before})
        nonfinite = NonFiniteSteps(cfg.max_nonfinite_steps)  # a streak of skipped steps spans rollout steps
        with progress_bar(self.acc.is_main_process) as bar:
            task = bar.add_task("train", total=cfg.max_steps, completed=self.start_step, status="")
            for step in range(self.start_step, cfg.max_steps):
                t0 = time.perf_counter()
                # 1. Rollout: G samples of each of this process's prompts.
                first = self.acc.process_index * self.local_prompts
                rows = prompts_for_step(step, cfg.prompts_per_step, len(self.train_set), cfg.seed)
                rollout = self._rollout(rows[first:first + self.local_prompts], step, first)
                t1 = time.perf_counter()

                # 2. Reward.
                state = TrainerState(global_step=step, max_steps=cfg.max_steps)  # what TRL hands reward functions
                completions, rewards = score_rollout(rollout, self.train_set, self.tokenizer, self.rewards,
                                                     settings.rewards, state)
                # 3. Advantage, group by group (a process holds whole groups).
                advantages_B = advantages(rewards.total, settings.advantage, self.acc).to(self.acc.device)
                t2 = time.perf_counter()

                # 4. Policy update.
                update = policy_update(self.state, rollout, advantages_B, settings.update, nonfinite)
                t3 = time.perf_counter()

                # 5. Evaluate (not after a non-finite stop: then the parameters may be NaN).
                done = step + 1
                due = (cfg.eval_steps and done % cfg.eval_steps == 0) or done == cfg.max_steps
                evaluated = self.evaluate(done) if self.eval_set is not None and due and not nonfinite.stop else {}

                # 6. Log.
                rollout_metrics, tokens = reward_metrics(self.acc, rollout, rewards, self.rewards,
                                                         settings.advantage.group_size)
                metrics = {**update.metrics, **rollout_metrics, "time/rollout": t1 - t0, "time/reward": t2 - t1,
                           "time/update": t3 - t2, "tokens_per_second": tokens / (t3 - t0), **evaluated}
                self.logger.log(done, metrics)
                self.logger.log_completions(done, self._completion_samples(rollout, completions, rewards, advantages_B))
                self.logger.log_off_policy(done, update.off_policy)
                history.append({"step": done, **metrics})
                bar.update(task, completed=done, status=self._status(metrics))
                # after the step's metrics are written, so that metrics.jsonl shows the skipped steps
                if nonfinite.stop:
                    raise NonFiniteUpdateError(nonfinite.stop)

                # 7. Checkpoint.
                if (cfg.save_steps and done % cfg.save_steps == 0) or done == cfg.max_steps:
                    self.save(done)
        if self.acc.is_main_process:
            last = Path(cfg.output_dir) / f"checkpoint-{cfg.max_steps}"
            wall = self.wall_seconds_before + time.perf_counter() - self._started
            self.summary = summarize(cfg.output_dir, wall_seconds=wall, checkpoint=str(last))
            print_summary(self.summary)
        return history

    # ------------------------------------------------------------------ phases
    def _rollout(self, rows: list[int], step: int, first: int) -> Rollout:
        """The engine's samples, with pi_old and the reference's log-probabilities where needed."""
        policy = self.acc.unwrap_model(self.model)
        self.engine.sync(policy, version=self.state.optimizer_steps)
        with self.acc.autocast():
            rollout = sample(self.engine, self.train_set, rows, self.settings.rollout, step=step, first_position=first)
            rollout.old_logprobs, rollout.routing = behaviour_logprobs(policy, rollout, self.settings.rollout,
                                                                       self.state.routing)
            if self.config.routing_replay == "r3" and rollout.routing is None:
                raise ConfigError("routing_replay=r3: the rollout engine reported no routed experts (the hf engine's "
                                  "fallback to model.generate records none; the vllm engines return none yet); use "
                                  "routing_replay=r2")
            if self.ref_model is not None:
                rollout.ref_logprobs = batched_logprobs(self.ref_model, rollout, self.settings.rollout.forward)
        return rollout

    def _completion_samples(self, rollout: Rollout, completions: list, rewards,
                            advantages_B: torch.Tensor) -> list[dict]:
        rows = []
        for i in range(min(self.config.log_completions, len(rollout))):
            rows.append({"prompt": self.train_set.rows[rollout.row_indices[i]]["prompt"],
                         "completion": completions[i], "reward": _clean(float(rewards.total[i])),
                         "advantage": float(advantages_B[i]), "truncated": bool(rollout.truncated[i]),
                         # columns from the reward functions' log_extra, where they gave one value per sample
                         **{k: v[i] for k, v in rewards.columns.items() if len(v) == len(rollout)}})
        return rows

    def _status(self, metrics: dict[str, float]) -> str:
        gate = next((f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith(f"{self.config.loss_type}/")), "")
        return f"reward={metrics.get('reward', math.nan):.3f} {gate}"

    def evaluate(self, step: int = 0) -> dict[str, float]:
        """Pass@1, Pass@k and greedy accuracy on eval_dataset (see evaluation.py), over all processes,
        after `step` rollout steps."""
        settings, acc = self.settings.evaluation, self.acc
        self._connect_engine()
        self.engine.sync(acc.unwrap_model(self.model), version=self.state.optimizer_steps)
        with acc.autocast():
            totals = evaluation.evaluate(self.engine, self.tokenizer, self.eval_set, self.rewards, settings,
                                         indices=list(range(acc.process_index, len(self.eval_set), acc.num_processes)),
                                         trainer_state=TrainerState(global_step=step, max_steps=self.config.max_steps),
                                         pad_to=math.ceil(len(self.eval_set) / acc.num_processes) if self.config.fsdp
                                         else 0)
        summed = acc.reduce(totals.as_tensor().to(acc.device), "sum").cpu()
        metrics = evaluation.EvalTotals.from_tensor(summed, settings.samples).metrics()
        if not settings.greedy:
            metrics.pop("greedy_accuracy")
        metrics["reward"] = metrics.pop("mean_reward")
        return {f"eval/{k}": v for k, v in metrics.items()}

    def save(self, step: int) -> Path:
        if not parameters_finite(self.acc, self.model):  # the loop stops before this; a direct call may not
            raise NonFiniteUpdateError(f"checkpoint-{step} was not written: the parameters are NaN or infinite "
                                       "(or too large for a finite norm). "
                                       "The previous checkpoints are left as they were; resume from the latest "
                                       "with a lower learning_rate, or clip with max_grad_norm > 0")
        return save_checkpoint(self.acc, self.config.output_dir, step, model=self.model, tokenizer=self.tokenizer,
                               optimizer=self.optimizer, scheduler=self.scheduler, config_yaml=self.config.to_yaml(),
                               trainer_state={"prompts_consumed": step * self.config.prompts_per_step,
                                              "working_directory": self.working_directory,
                                              "wall_seconds": (self.wall_seconds_before + time.perf_counter()
                                                               - self._started)},
                               save_total_limit=self.config.save_total_limit, sharded=self.config.fsdp)


def _clean(x: float) -> float | None:
    return None if math.isnan(x) else x


def train(config: TrainConfig) -> list[dict[str, float]]:
    """Run a training job; returns the logged metrics of every step."""
    return Trainer(config).train()
