"""The training loop. One step reads top to bottom: rollout, reward, advantage, policy update,
log, evaluate, checkpoint. Each phase lives in its own module; this file wires them."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from transformers import TrainerState, get_scheduler

from . import evaluation
from . import rewards as reward_lib
from .advantages import group_advantages
from .checkpoint import (OutputDirLock, check_start, load_training_state, print_note, resolve_resume,
                         save_checkpoint)
from .config import ConfigError, TrainConfig
from .diagnostics import OffPolicyStats
from .data import PromptSet, gsm8k_rows, load_rows, math_rows, prepare_prompts, prompts_for_step
from .models import (check_sequence_lengths, disable_dropout, frozen_copy, load_model, load_tokenizer,
                     mixed_precision)
from .rollout import Rollout, batched_logprobs, decode, generate, group_seeds
from .summary import print_summary, summarize
from .tracking import RunLogger, progress_bar
from .update import NonFiniteSteps, NonFiniteUpdateError, parameters_finite, policy_update

_OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
_SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class StepRewards:
    total: torch.Tensor  # (N,) combined reward, NaN where none applies
    per_func: torch.Tensor  # (N, F)
    errors: int
    completions: list
    extra: dict
    logged_columns: dict = field(default_factory=dict)  # log_extra columns, one value per sample


class Trainer:
    def __init__(self, config: TrainConfig, accelerator: Accelerator | None = None) -> None:
        self.config = config.validate()
        self.working_directory = os.getcwd()  # what the config's relative paths are relative to
        # Without a GPU, Accelerator() treats every launched process as a lone one; cpu=True makes a
        # multi-process launch use torch.distributed with gloo.
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(),
                                              mixed_precision=mixed_precision(config.dtype))
        if self.acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            raise ConfigError(f"distributed type {self.acc.distributed_type} is not supported yet: sapo-rl trains with "
                              "DDP (accelerate launch --multi_gpu); DeepSpeed and FSDP are not wired in")
        world = self.acc.num_processes
        if config.prompts_per_step % world:
            raise ConfigError(f"prompts_per_step={config.prompts_per_step} must be a multiple of the number of "
                              f"processes ({world})")
        self.local_prompts = config.prompts_per_step // world
        if (self.local_prompts * config.num_generations) % config.num_minibatches:
            raise ConfigError(f"num_minibatches={config.num_minibatches} must divide each process's share of the "
                              f"rollout batch ({self.local_prompts} prompts x {config.num_generations} generations)")
        set_seed(config.seed)

        # Before anything is written into output_dir or its checkpoints are read (another run may
        # be rotating them). Only the main process writes there; the other processes' RNG files go
        # into the main process's temporary checkpoint directory, under its lock. The logger's
        # close() at the end of train() releases it, and the kernel does when the process dies.
        lock = OutputDirLock(config.output_dir) if self.acc.is_main_process else None
        try:
            self.resume_path, skipped = resolve_resume(config.resume_from_checkpoint, config.output_dir,
                                                       num_processes=world,
                                                       log=print_note if self.acc.is_main_process else None)
            check_start(config, self.resume_path, skipped)
            self.tokenizer = load_tokenizer(config.model)
            self.rewards = [reward_lib.load_reward_function(spec) for spec in config.reward_funcs]
            self.reward_weights = config.reward_weights or [1.0] * len(self.rewards)
            for reward in self.rewards:  # e.g. the code sandbox: fail now, not at the first rollout
                if callable(getattr(reward.fn, "prepare", None)):
                    reward.fn.prepare(allow_unsandboxed=config.allow_unsandboxed_code)
            self.train_set = self._prompts(config.dataset, "train")
            self.eval_set = self._prompts(config.eval_dataset, "test") if config.eval_dataset else None

            model = disable_dropout(load_model(self.resume_path or config.model))
            check_sequence_lengths(model.config, config.max_prompt_length, config.max_completion_length)
            self.ref_model = frozen_copy(load_model(config.model)).to(self.acc.device) if config.beta > 0 else None
            # The fused AdamW kernel (CPU and CUDA) does one pass over the parameters instead of one per operation.
            fused = dict(fused=True) if config.optim == "adamw" and self.acc.device.type in ("cpu", "cuda") else {}
            optimizer = _OPTIMIZERS[config.optim](model.parameters(), lr=config.learning_rate,
                                                  weight_decay=config.weight_decay, **fused)
            updates_per_step = config.num_minibatches * config.num_iterations
            self.scheduler = get_scheduler(_SCHEDULERS[config.lr_scheduler], optimizer, num_warmup_steps=config.warmup_steps,
                                           num_training_steps=config.max_steps * updates_per_step)
            self.model, self.optimizer = self.acc.prepare(model, optimizer)

            self.start_step, self.wall_seconds_before, self._started = 0, 0.0, time.perf_counter()
            if self.resume_path is not None:
                state = load_training_state(self.resume_path, self.acc, self.optimizer, self.scheduler)
                self.start_step = state["step"]
                self.wall_seconds_before = state.get("wall_seconds", 0.0)
            self.logger = RunLogger(config.output_dir, config.report_to, config.to_dict(), enabled=self.acc.is_main_process,
                                    resume_step=self.start_step if self.resume_path else None, lock=lock)
            if self.acc.is_main_process:
                try:
                    Path(config.output_dir, "config.yaml").write_text(config.to_yaml())
                except OSError as err:
                    raise ConfigError(f"could not write {Path(config.output_dir, 'config.yaml')}: "
                                      f"{err.strerror or err}") from None
        except BaseException:  # a Trainer that failed to start (kept alive by its traceback) holds nothing
            if lock is not None:
                lock.release()
            raise

    def _prompts(self, spec: str, split: str) -> PromptSet:
        cfg = self.config
        if cfg.dataset_format == "trl":
            rows = load_rows(spec, split=split, task_kwargs=cfg.task_kwargs,
                             field="dataset" if split == "train" else "eval_dataset")
        else:
            rows = {"gsm8k": gsm8k_rows, "math": math_rows}[cfg.dataset_format](spec, cfg.prompt_template)
        prompts = prepare_prompts(rows, self.tokenizer, max_prompt_length=self.config.max_prompt_length,
                                  filter_overlong=self.config.filter_overlong_prompts, name=spec)
        columns = [k for k in prompts.rows[0] if k != "prompt"]
        for reward in self.rewards:
            reward_lib.check_signature(reward, columns)
        return prompts

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict[str, float]]:
        """Run the loop; the logs are closed and output_dir's lock released however it ends."""
        exit_code = 1
        try:
            history = self._train()
            exit_code = 0
            return history
        finally:
            self.logger.close(exit_code)

    def _train(self) -> list[dict[str, float]]:
        cfg, history = self.config, []
        started = time.perf_counter()
        if self.eval_set is not None and self.start_step == 0:  # the starting point, for before/after
            before = self.evaluate()
            self.logger.log(0, before)
            history.append({"step": 0, **before})
        self._started = started
        self.nonfinite = NonFiniteSteps(cfg.max_nonfinite_steps)  # a streak of skipped steps spans rollout steps
        with progress_bar(self.acc.is_main_process) as bar:
            task = bar.add_task("train", total=cfg.max_steps, completed=self.start_step, status="")
            for step in range(self.start_step, cfg.max_steps):
                t0 = time.perf_counter()
                # 1. Rollout: G samples for each of this process's prompts.
                first = self.acc.process_index * self.local_prompts
                rows = prompts_for_step(step, cfg.prompts_per_step, len(self.train_set), cfg.seed)
                rows = rows[first:first + self.local_prompts]
                rollout = self._rollout(self.train_set, rows, group_seeds(cfg.seed, step, range(first, first + len(rows))))
                t1 = time.perf_counter()

                # 2. Reward.
                scored = self._score(self.train_set, rollout, step)
                # 3. Advantage, group by group (a process holds whole groups).
                advantages = self._advantages(scored.total).to(self.acc.device)
                t2 = time.perf_counter()

                # 4. Policy update.
                off_policy = OffPolicyStats(self.acc.device)
                metrics = policy_update(self.model, self.optimizer, self.scheduler, self.acc, rollout, advantages, cfg,
                                        step=step, first_position=first, off_policy=off_policy,
                                        nonfinite=self.nonfinite)
                metrics.update(off_policy.reduce(self.acc).metrics())
                t3 = time.perf_counter()

                # 5. Log.
                metrics.update(self._rollout_metrics(rollout, scored))
                metrics.update({"time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2,
                                "tokens_per_second": metrics.pop("_tokens") / (t3 - t0)})
                # 6. Evaluate.
                done = step + 1
                stop = self.nonfinite.stop  # then the parameters may be NaN: no evaluation, no checkpoint
                if self.eval_set is not None and not stop and ((cfg.eval_steps and done % cfg.eval_steps == 0)
                                                               or done == cfg.max_steps):
                    metrics.update(self.evaluate(done))
                self.logger.log(done, metrics)
                self.logger.log_completions(done, self._completion_samples(rollout, scored, advantages))
                self.logger.log_off_policy(done, off_policy)
                history.append({"step": done, **metrics})
                bar.update(task, completed=done, status=self._status(metrics))
                if stop:  # after the step's metrics are written, so that metrics.jsonl shows the skipped steps
                    raise NonFiniteUpdateError(stop)
                # 7. Checkpoint.
                if (cfg.save_steps and done % cfg.save_steps == 0) or done == cfg.max_steps:
                    self.save(done)
        if self.acc.is_main_process:
            last = Path(cfg.output_dir) / f"checkpoint-{cfg.max_steps}"
            wall = self.wall_seconds_before + time.perf_counter() - started
            self.summary = summarize(cfg.output_dir, wall_seconds=wall, checkpoint=str(last))
            print_summary(self.summary)
        return history

    # ------------------------------------------------------------------ phases
    def _rollout(self, prompts: PromptSet, rows: list[int], seeds: list[int]) -> Rollout:
        cfg = self.config
        policy = self.acc.unwrap_model(self.model)
        with self.acc.autocast():
            rollout = generate(policy, [prompts.prompt_ids[r] for r in rows], rows, group_size=cfg.num_generations,
                               max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                               eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                               seeds=seeds, device=self.acc.device, max_sequences=cfg.max_num_seqs)
            # The behaviour policy's log-probabilities; with one minibatch and one pass the policy
            # cannot move before the update, which then uses its own (detached) ones instead.
            if cfg.num_minibatches > 1 or cfg.num_iterations > 1:
                rollout.old_logprobs = rollout.sampling_logprobs if cfg.use_rollout_logprobs else None
                if rollout.old_logprobs is None:  # asked for, or a model the shared sampler cannot serve
                    rollout.old_logprobs = batched_logprobs(policy, rollout, cfg.temperature, cfg.micro_batch_size,
                                                            cfg.logprob_chunk_size, cfg.padding_free)
            if self.ref_model is not None:
                rollout.ref_logprobs = batched_logprobs(self.ref_model, rollout, cfg.temperature,
                                                        cfg.micro_batch_size, cfg.logprob_chunk_size, cfg.padding_free)
        return rollout

    def _score(self, prompts: PromptSet, rollout: Rollout, step: int) -> StepRewards:
        completions, ids = decode(self.tokenizer, rollout, prompts.conversational)
        context = reward_lib.RewardContext(TrainerState(global_step=step, max_steps=self.config.max_steps))
        scores = reward_lib.score(self.rewards, self.reward_weights, [prompts.rows[r]["prompt"] for r in rollout.row_indices],
                                  completions, ids, prompts.columns(rollout.row_indices),
                                  skip_errors=self.config.skip_reward_errors, context=context)
        extra = {**scores.extra, **self._mean_over_processes(context.metrics)}
        return StepRewards(scores.total, scores.per_func, scores.errors, completions, extra, dict(context.columns))

    def _mean_over_processes(self, logged: dict[str, list[float]]) -> dict[str, float]:
        """The mean of what reward functions logged with log_metric, over all processes' calls."""
        parts = gather_object([dict(logged)]) if self.acc.num_processes > 1 else [logged]
        merged: dict[str, list[float]] = {}
        for part in parts:
            for name, values in part.items():
                merged.setdefault(name, []).extend(values)
        # Under rewards/, so that no reward function can overwrite a metric of the trainer's.
        return {f"rewards/{name}": sum(values) / len(values) for name, values in merged.items() if values}

    def _advantages(self, total: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.scale_rewards != "batch" or self.acc.num_processes == 1:
            return group_advantages(total, cfg.num_generations, scale=cfg.scale_rewards)
        # "batch" divides by the std of the global batch: compute on the gathered rewards, keep ours.
        everything = self.acc.gather(total.to(self.acc.device)).cpu()
        local = group_advantages(everything, cfg.num_generations, scale="batch")
        n = total.shape[0]
        return local[self.acc.process_index * n:(self.acc.process_index + 1) * n]

    def _rollout_metrics(self, rollout: Rollout, scored: StepRewards) -> dict[str, float]:
        gather = lambda t: self.acc.gather(t.to(self.acc.device)).cpu()  # noqa: E731
        total = gather(scored.total)
        per_func = gather(scored.per_func)
        lengths = gather(rollout.completion_mask.sum(-1).double())
        truncated = gather(rollout.truncated.double())
        G = self.config.num_generations
        groups = total.view(-1, G)
        zero_std = [(g[~g.isnan()].numel() < 2) or bool((g[~g.isnan()] == g[~g.isnan()][0]).all()) for g in groups]
        valid = total[~total.isnan()]
        metrics = {
            "reward": float(valid.mean()) if valid.numel() else math.nan,
            "reward_std": float(valid.std()) if valid.numel() > 1 else 0.0,
            "frac_reward_zero_std": sum(zero_std) / len(zero_std),
            "completions/mean_length": float(lengths.mean()),
            "completions/clipped_ratio": float(truncated.mean()),
            "rewards/errors": float(self.acc.reduce(torch.tensor(float(scored.errors), device=self.acc.device), "sum")),
            "_tokens": float(lengths.sum()),
        }
        metrics.update(scored.extra)
        for j, reward in enumerate(self.rewards):
            column = per_func[:, j]
            column = column[~column.isnan()]
            metrics[f"rewards/{reward.name}/mean"] = float(column.mean()) if column.numel() else math.nan
        return metrics

    def _completion_samples(self, rollout: Rollout, scored: StepRewards, advantages: torch.Tensor) -> list[dict]:
        k = min(self.config.log_completions, len(rollout))
        rows = []
        for i in range(k):
            rows.append({"prompt": self.train_set.rows[rollout.row_indices[i]]["prompt"],
                         "completion": scored.completions[i], "reward": _clean(float(scored.total[i])),
                         "advantage": float(advantages[i]), "truncated": bool(rollout.truncated[i]),
                         # columns from the reward functions' log_extra, where they gave one value per sample
                         **{k: v[i] for k, v in scored.logged_columns.items() if len(v) == len(rollout)}})
        return rows

    def _status(self, metrics: dict[str, float]) -> str:
        gate = next((f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith(f"{self.config.loss_type}/")), "")
        return f"reward={metrics.get('reward', math.nan):.3f} {gate}"

    def evaluate(self, step: int = 0) -> dict[str, float]:
        """Pass@1, Pass@k and greedy accuracy on eval_dataset (see evaluation.py), over all processes,
        after `step` rollout steps."""
        cfg = self.config
        with self.acc.autocast():
            totals = evaluation.evaluate(
                self.acc.unwrap_model(self.model), self.tokenizer, self.eval_set, self.rewards, self.reward_weights,
                samples=cfg.eval_num_generations, temperature=cfg.temperature, top_p=cfg.top_p,
                max_new_tokens=cfg.max_completion_length, seed=cfg.seed, device=self.acc.device,
                indices=list(range(self.acc.process_index, len(self.eval_set), self.acc.num_processes)),
                greedy=cfg.eval_greedy, max_sequences=cfg.max_num_seqs,
                trainer_state=TrainerState(global_step=step, max_steps=cfg.max_steps),
            )
        summed = self.acc.reduce(totals.as_tensor().to(self.acc.device), "sum").cpu()
        metrics = evaluation.EvalTotals.from_tensor(summed, cfg.eval_num_generations).metrics()
        if not cfg.eval_greedy:
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
                                              "wall_seconds": self.wall_seconds_before + time.perf_counter() - self._started},
                               save_total_limit=self.config.save_total_limit)


def _clean(x: float) -> float | None:
    return None if math.isnan(x) else x


def train(config: TrainConfig) -> list[dict[str, float]]:
    """Run a training job; returns the logged metrics of every step."""
    return Trainer(config).train()
