"""sapo-rl against TRL's GRPOTrainer(loss_type="sapo") on the built-in demo.

    pip install trl          # this script installs nothing itself
    python benchmarks/vs_trl.py --steps 100 --seeds 0,1,2

Both frameworks train the shipped tiny model on the `arithmetic` task with the demo's settings
(`sapo.demo.demo_settings()`): the same prompts per step, G, max completion length, sampling
temperature, learning rate, optimizer, gradient clipping, SAPO temperatures, advantage scaling and
loss aggregation, and the same number of rollout steps. One sapo-rl step (one rollout of
prompts_per_step * G completions, then num_minibatches optimizer steps) is TRL's
steps_per_generation = num_minibatches optimizer steps on one generation batch, so `--steps S`
runs TRL for S * num_minibatches optimizer steps.

Each framework trains in a fresh Python process (no shared global state, no warm caches) on the
CPU (CUDA is hidden from both), with the default torch thread count. Timings are the wall clock of
the training call alone: model loading, data preparation and evaluation are outside it. Both final
models are then scored by the same code, sapo's held-out evaluation (what `sapo eval` runs: the 200
test problems, 8 samples each at the training temperature, the same seeds), next to the shipped
model's starting score.

Prints seconds per rollout step, where that time goes, held-out Pass@1 before and after (per seed
and mean +- std over seeds), and the ratio of steps per second sapo-rl / TRL; writes everything to
OUTPUT_DIR/results.json. OUTPUT_DIR/seed<k>/{sapo,trl} are replaced on every run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

FRAMEWORKS = ("sapo", "trl")


def demo_config(steps: int, seed: int, output_dir: Path):
    """The demo's TrainConfig with the run length and seed of this benchmark, and no evaluation
    during training (both final models are evaluated afterwards, outside the timed call)."""
    from sapo.config import TrainConfig
    from sapo.demo import demo_settings

    settings = demo_settings()
    settings.update(max_steps=steps, seed=seed, eval_dataset=None, save_steps=0, save_total_limit=1,
                    output_dir=str(output_dir))
    return TrainConfig.from_dict(settings).validate()


# ---------------------------------------------------------------------------------- sapo-rl
def run_sapo(cfg, out: Path) -> dict:
    import torch

    from sapo.training.trainer import Trainer

    threads = torch.get_num_threads()
    trainer = Trainer(cfg)
    started = time.perf_counter()
    history = trainer.train()
    wall = time.perf_counter() - started
    steps = [h for h in history if h["step"] > 0]
    phases = {name: sum(h[f"time/{name}"] for h in steps) for name in ("rollout", "reward", "update")}
    phases["other"] = wall - sum(phases.values())
    return {"wall_seconds": wall, "steps": cfg.max_steps, "optimizer_steps": cfg.max_steps * cfg.num_minibatches *
            cfg.num_iterations, "phases": phases, "train_rewards": [h["reward"] for h in steps],
            "model_dir": str(out / f"checkpoint-{cfg.max_steps}"), "torch_threads": threads}


# ---------------------------------------------------------------------------------- TRL
# as sapo.training.trainer
TRL_SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def trl_config(cfg, out: Path):
    """GRPOConfig with sapo's demo hyperparameters under TRL's names."""
    import dataclasses

    import torch
    from trl import GRPOConfig

    if cfg.optim != "adamw":
        raise SystemExit(f"vs_trl: optim={cfg.optim!r} has no TRL counterpart here")
    if cfg.aggregation != "seq-mean-token-mean":
        # TRL's sapo loss always averages tokens within a sequence, then sequences (its "grpo" normalisation).
        raise SystemExit(f"vs_trl: TRL's sapo loss has no aggregation={cfg.aggregation!r}")
    rollout = cfg.prompts_per_step * cfg.num_generations
    adamw = inspect.signature(torch.optim.AdamW).parameters  # sapo builds torch.optim.AdamW with its defaults
    beta1, beta2 = adamw["betas"].default
    # TRL turns activation checkpointing on by default; sapo-rl has none. transformers 5.x renamed the option.
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return GRPOConfig(
        output_dir=str(out),
        seed=cfg.seed,
        # batch: one generation batch of prompts_per_step * G completions, split into num_minibatches optimizer
        # steps of one forward/backward each (the loss of a minibatch is then normalised over the minibatch).
        num_generations=cfg.num_generations,
        per_device_train_batch_size=rollout // cfg.num_minibatches,
        steps_per_generation=cfg.num_minibatches,
        gradient_accumulation_steps=1,
        num_iterations=cfg.num_iterations,
        max_steps=cfg.max_steps * cfg.num_minibatches * cfg.num_iterations,
        # sampling
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        repetition_penalty=1.0,
        use_vllm=False,
        # objective
        loss_type=cfg.loss_type,
        sapo_temperature_pos=cfg.tau_pos,
        sapo_temperature_neg=cfg.tau_neg,
        importance_sampling_level="token",
        beta=cfg.beta,
        scale_rewards=cfg.scale_rewards,
        mask_truncated_completions=cfg.mask_truncated_completions,
        disable_dropout=True,  # sapo-rl always disables dropout (the tiny model has none anyway)
        # optimizer
        optim="adamw_torch_fused",  # torch.optim.AdamW(fused=True), as sapo-rl builds it on CPU and CUDA
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=TRL_SCHEDULERS[cfg.lr_scheduler],
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        adam_beta1=beta1,
        adam_beta2=beta2,
        adam_epsilon=adamw["eps"].default,
        max_grad_norm=cfg.max_grad_norm,
        # runtime: float32 on the CPU like sapo-rl there, no checkpointing of activations, nothing saved,
        # evaluated or logged during training
        use_cpu=True,
        bf16=False,
        fp16=False,
        **{checkpointing: False},
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # the reward needs the `answer` column
    )


def run_trl(cfg, out: Path) -> dict:
    import datasets
    import torch
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOTrainer

    from sapo import rewards as reward_lib
    from sapo.data import load_rows, prepare_prompts
    from sapo.model.loading import disable_dropout, load_model, load_tokenizer

    threads = torch.get_num_threads()
    tokenizer = load_tokenizer(cfg.model)
    rows = load_rows(cfg.dataset, split="train", task_kwargs=cfg.task_kwargs)
    prompts = prepare_prompts(rows, tokenizer, max_prompt_length=cfg.max_prompt_length,
                              filter_overlong=cfg.filter_overlong_prompts, name=cfg.dataset)
    if prompts.conversational:
        raise SystemExit("vs_trl: expected the plain-text prompts of a built-in task")
    # TRL tokenises plain-text prompts with processing_class(text=prompts): it must see the token ids sapo-rl sees.
    trl_ids = tokenizer(text=[r["prompt"] for r in prompts.rows])["input_ids"]
    mismatched = [i for i, (a, b) in enumerate(zip(trl_ids, prompts.prompt_ids)) if a != b]
    if mismatched:
        i = mismatched[0]
        raise SystemExit(f"vs_trl: TRL would tokenise {len(mismatched)} prompts differently, e.g. "
                         f"{prompts.rows[i]['prompt']!r}: {trl_ids[i]} vs sapo-rl's {prompts.prompt_ids[i]}")
    dataset = datasets.Dataset.from_list(prompts.rows)

    named = [reward_lib.load_reward_function(spec) for spec in cfg.reward_funcs]
    if len(named) != 1 or cfg.reward_weights not in (None, [1.0]):
        raise SystemExit("vs_trl: expected the demo's single reward function")
    columns = [k for k in prompts.rows[0] if k != "prompt"]
    train_rewards: list[float] = []

    def reward(prompts, completions, completion_ids=None, **kwargs):
        # sapo-rl calls its rewards with the dataset columns only; TRL also passes trainer_state and loggers.
        values = named[0].fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
                             **{k: kwargs[k] for k in columns})
        valid = [v for v in values if v is not None]
        train_rewards.append(sum(valid) / len(valid) if valid else float("nan"))
        return values

    reward.__name__ = named[0].name

    phases = dict.fromkeys(("rollout_total", "generate", "reward", "steps_total"), 0.0)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - t0
        return wrapper

    class StepTimer(TrainerCallback):  # an optimizer step: forward/backward (+ rollout every few), clip, step
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            phases["steps_total"] += time.perf_counter() - self.t0

    model = disable_dropout(load_model(cfg.model))
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=trl_config(cfg, out), train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    # Timers around TRL's own phases (instance attributes, so TRL's code runs unchanged).
    trainer._generate_and_score_completions = timed("rollout_total", trainer._generate_and_score_completions)
    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)

    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started

    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    group = optimizer.param_groups[0]
    checks = {"optimizer": type(optimizer).__name__, "final_lr": trainer.lr_scheduler.get_last_lr()[0],
              **{k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "fused", "foreach") if k in group},
              "activation_checkpointing": bool(getattr(trainer.args, "activation_checkpointing",
                                                       trainer.args.gradient_checkpointing)),
              "generation_batch_size": trainer.args.generation_batch_size,
              "steps_per_generation": trainer.args.steps_per_generation}
    final = out / "final"
    trainer.model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    split = {
        "rollout": phases["rollout_total"] - phases["reward"],  # generation, old log-probs, advantages
        "reward": phases["reward"],
        "update": phases["steps_total"] - phases["rollout_total"],  # forward/backward, clipping, optimizer
        "other": wall - phases["steps_total"],  # data loading and the Trainer loop around the steps
        "generate": phases["generate"],  # model.generate and decoding, part of "rollout"
    }
    return {"wall_seconds": wall, "steps": cfg.max_steps, "optimizer_steps": trainer.state.global_step,
            "phases": split, "train_rewards": train_rewards, "model_dir": str(final), "torch_threads": threads,
            "checks": checks}


# ---------------------------------------------------------------------------------- evaluation
def held_out(model_dir: str, cfg, seed: int) -> dict:
    """sapo eval's path: Pass@1, Pass@k and greedy accuracy on the task's test split."""
    import torch

    from sapo.data import load_rows, prepare_prompts
    from sapo.engines import HFEngine, SamplingSettings
    from sapo.model.loading import load_model, load_tokenizer
    from sapo.rewards import RewardSettings, load_reward_function
    from sapo.tasks import get_task
    from sapo.training.evaluation import EvalSettings, evaluate

    task = get_task(cfg.eval_dataset or cfg.dataset)
    tokenizer = load_tokenizer(model_dir)
    rows = load_rows(task.name, split="test", task_kwargs=cfg.task_kwargs)
    prompts = prepare_prompts(rows, tokenizer, max_prompt_length=10**6, filter_overlong=False, name=task.name)
    model = load_model(model_dir).eval()
    samples = cfg.eval_num_generations
    engine = HFEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      device=torch.device("cpu"))
    sampling = SamplingSettings(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p)
    settings = EvalSettings(samples=samples, greedy=True, sampling=sampling, rewards=RewardSettings(skip_errors=True),
                            seed=seed)
    totals = evaluate(engine, tokenizer, prompts, [load_reward_function(task.reward)], settings)
    metrics = totals.metrics()
    return {"pass@1": metrics["pass@1"], f"pass@{samples}": metrics[f"pass@{samples}"],
            "greedy_accuracy": metrics["greedy_accuracy"], "problems": totals.problems, "samples": samples}


# ---------------------------------------------------------------------------------- driver
def worker(args: argparse.Namespace) -> int:
    quiet_transformers()
    out = Path(args.output_dir) / args.worker
    cfg = demo_config(args.steps, args.seed, out)
    result = (run_sapo if args.worker == "sapo" else run_trl)(cfg, out)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars


def mean_last(values: list[float], n: int = 10) -> float:
    tail = [v for v in values[-n:] if v == v]
    return sum(tail) / len(tail) if tail else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="rollout steps (sapo-rl's max_steps; TRL runs "
                        "num_minibatches optimizer steps per rollout step)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds; each runs both frameworks")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out sampling (sapo eval's --seed)")
    parser.add_argument("--output-dir", default="outputs/vs_trl")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")

    try:
        import trl  # noqa: F401
    except ImportError:
        print("vs_trl: TRL is not installed; pip install trl to run this benchmark")
        return 2
    try:
        import sapo  # noqa: F401
    except ImportError:
        print("vs_trl: sapo-rl is not installed; pip install -e . from the repository root first")
        return 2
    if args.worker:
        args.seed = seeds[0]
        return worker(args)

    root = Path(args.output_dir)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # both on the CPU
    runs: dict[str, list[dict]] = {name: [] for name in FRAMEWORKS}
    for seed in seeds:
        run_root = root / f"seed{seed}"
        for name in FRAMEWORKS:
            shutil.rmtree(run_root / name, ignore_errors=True)
            (run_root / name).mkdir(parents=True)
            log = run_root / f"{name}.log"
            print(f"seed {seed}: training with {'sapo-rl' if name == 'sapo' else 'TRL'} for {args.steps} steps "
                  f"(log: {log}) ...", flush=True)
            with log.open("w") as f:
                done = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                                       "--seeds", str(seed), "--output-dir", str(run_root)],
                                      stdout=f, stderr=subprocess.STDOUT, env=env)
            if done.returncode != 0:
                print(f"vs_trl: the {name} run failed (exit {done.returncode}); the end of {log}:")
                print("".join(log.read_text().splitlines(keepends=True)[-30:]), end="")
                return 1
            result = json.loads((run_root / name / "result.json").read_text())
            runs[name].append({"seed": seed, **result})

    quiet_transformers()
    cfg = demo_config(args.steps, seeds[0], root)
    print("evaluating on the held-out problems ...", flush=True)
    start = held_out(cfg.model, cfg, args.eval_seed)
    for name in FRAMEWORKS:
        for r in runs[name]:
            r["eval"] = held_out(r["model_dir"], cfg, args.eval_seed)
            r["seconds_per_step"] = r["wall_seconds"] / args.steps

    import torch
    import transformers

    labels = {"sapo": f"sapo-rl {_version('sapo-rl')}", "trl": f"TRL {trl.__version__} (loss_type=sapo)"}
    width = max(len(v) for v in labels.values())
    rollout = cfg.prompts_per_step * cfg.num_generations
    print(f"\n{args.steps} steps of {cfg.prompts_per_step} prompts x G={cfg.num_generations} = {rollout} completions "
          f"(max {cfg.max_completion_length} tokens), {cfg.num_minibatches} optimizer steps each, lr "
          f"{cfg.learning_rate:g}, seeds {args.seeds}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {runs['sapo'][0]['torch_threads']} torch threads, CPU")
    print(f"held-out {cfg.eval_dataset or cfg.dataset}: {start['problems']} problems x {start['samples']} samples, "
          f"eval seed {args.eval_seed}; Pass@1 of the starting model {start['pass@1']:.3f}\n")
    print(f"{'framework':<{width}}  {'seed':>4}  {'s/step':>7}  {'final Pass@1':>12}  {'train reward (last 10)':>22}")
    for name in FRAMEWORKS:
        for r in runs[name]:
            print(f"{labels[name]:<{width}}  {r['seed']:>4}  {r['seconds_per_step']:>7.3f}  "
                  f"{r['eval']['pass@1']:>12.3f}  {mean_last(r['train_rewards']):>22.3f}")
    summary_rows = {}
    print(f"\n{'framework':<{width}}  {'mean s/step':>11}  {'final Pass@1 mean +- std':>24}")
    for name in FRAMEWORKS:
        step_s = statistics.mean([r["seconds_per_step"] for r in runs[name]])
        passes = [r["eval"]["pass@1"] for r in runs[name]]
        mean, std = statistics.mean(passes), statistics.stdev(passes) if len(passes) > 1 else 0.0
        summary_rows[name] = {"seconds_per_step": step_s, "pass@1_mean": mean, "pass@1_std": std}
        print(f"{labels[name]:<{width}}  {step_s:>11.3f}  {mean:>15.3f} +- {std:.3f}")
    ratio = summary_rows["trl"]["seconds_per_step"] / summary_rows["sapo"]["seconds_per_step"]
    print(f"\nsapo-rl steps per second / TRL steps per second = {ratio:.2f}\n")
    print("seconds per step by phase, mean over seeds (rollout: generation and behaviour log-probs; update: "
          "forward/backward and optimizer steps)")
    print(f"{'framework':<{width}}  {'rollout':>8}  {'reward':>7}  {'update':>7}  {'other':>7}")
    for name in FRAMEWORKS:
        phase = {k: statistics.mean([r["phases"][k] for r in runs[name]]) / args.steps
                 for k in ("rollout", "reward", "update", "other")}
        print(f"{labels[name]:<{width}}  " + "  ".join(f"{phase[k]:>{w}.3f}" for k, w in
                                                    (("rollout", 8), ("reward", 7), ("update", 7), ("other", 7))))
    generate_s = statistics.mean([r["phases"]["generate"] for r in runs["trl"]]) / args.steps
    print(f"(TRL's rollout includes {generate_s:.3f} s/step in model.generate and decoding)")

    summary = {"steps": args.steps, "seeds": seeds, "eval_seed": args.eval_seed, "start_eval": start,
               "ratio_sapo_over_trl_steps_per_second": ratio, "summary": summary_rows,
               "versions": {"sapo-rl": _version("sapo-rl"), "trl": trl.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__},
               "runs": runs}
    (root / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {root / 'results.json'}")
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
