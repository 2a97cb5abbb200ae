"""sapo-rl against TRL's GRPOTrainer(loss_type="sapo") on the built-in demo, or on a realistic setting.

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

The realistic setting (speed only, no evaluation):

    python benchmarks/vs_trl.py --setting realistic --completion-length 64,128,256

A random Qwen2 built from a config (25.3 M parameters: hidden 384, 6 layers, 6 heads of 64, 2 KV
heads, MLP 1536, vocabulary 32,000, tied embeddings) and a word-level tokenizer built here, saved
once to OUTPUT_DIR/model (nothing is downloaded). 8 prompts of 64 random tokens (OUTPUT_DIR/
prompts.jsonl; the dataset is exactly one step's prompts, so both frameworks sample the same 8 every
step) x G = 8 completions of exactly C tokens: the tokenizer's EOS is id 32,000, outside the model's
logits, so neither framework can end a completion early. 4 optimizer steps per rollout step of one
forward/backward over 16 sequences each (sapo-rl num_minibatches=4, micro_batch_size=16; TRL
steps_per_generation=4, per_device_train_batch_size=16), lr 1e-6, AdamW, max_grad_norm 1, SAPO
loss, temperature 1, reward: the fraction of even token ids (cheap, not constant). For each C,
each framework runs --warmup-steps (1) untimed steps, then --steps (3) timed ones, in a fresh
process; a C=256 step takes roughly a minute on a 2-core CPU. Prints per framework and C the seconds
per step and their split (rollout, reward, update, other), the model FLOPs utilisation of the
rollout and of the update (2 x params x tokens, 6 x for the update, tokens = 8 x 64 + 64 x C: each
prompt once and each completion token once; over the best float32 2048 x 2048 matmul rate measured
in the same process, printed too), and per C the ratios sapo-rl / TRL of steps per second and of
rollout and update speed; writes OUTPUT_DIR/results.json (OUTPUT_DIR: outputs/vs_trl_realistic).
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


def trl_trainer(cfg, out: Path):
    """TRL's GRPOTrainer on cfg's model, prompts and reward, with timers around its phases: returns the
    trainer, the tokenizer, the timings (`record`: one duration per call of each phase, and the start and
    end of every optimizer step), the mean reward of each generation batch and the torch thread count."""
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
        raise SystemExit("vs_trl: expected plain-text prompts")
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
        raise SystemExit("vs_trl: expected a single reward function")
    columns = [k for k in prompts.rows[0] if k != "prompt"]
    train_rewards: list[float] = []
    record: dict[str, list] = {k: [] for k in ("rollout_total", "generate", "reward", "step_begin", "step_end",
                                               "completion_lengths")}

    def reward(prompts, completions, completion_ids=None, **kwargs):
        # sapo-rl calls its rewards with the dataset columns only; TRL also passes trainer_state and loggers.
        values = named[0].fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
                             **{k: kwargs[k] for k in columns})
        valid = [v for v in values if v is not None]
        train_rewards.append(sum(valid) / len(valid) if valid else float("nan"))
        if completion_ids is not None:
            record["completion_lengths"].extend(len(ids) for ids in completion_ids)
        return values

    reward.__name__ = named[0].name

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                record[name].append(time.perf_counter() - t0)
        return wrapper

    class StepTimer(TrainerCallback):  # an optimizer step: forward/backward (+ rollout every few), clip, step
        def on_step_begin(self, args, state, control, **kwargs):
            record["step_begin"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            record["step_end"].append(time.perf_counter())

    model = disable_dropout(load_model(cfg.model))
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=trl_config(cfg, out), train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    # Timers around TRL's own phases (instance attributes, so TRL's code runs unchanged).
    trainer._generate_and_score_completions = timed("rollout_total", trainer._generate_and_score_completions)
    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    return trainer, tokenizer, record, train_rewards, threads


def trl_checks(trainer) -> dict:
    """What TRL actually ran with: the optimizer, its settings, checkpointing and the batch layout."""
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    group = optimizer.param_groups[0]
    return {"optimizer": type(optimizer).__name__, "final_lr": trainer.lr_scheduler.get_last_lr()[0],
            **{k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "fused", "foreach") if k in group},
            "activation_checkpointing": bool(getattr(trainer.args, "activation_checkpointing",
                                                     trainer.args.gradient_checkpointing)),
            "generation_batch_size": trainer.args.generation_batch_size,
            "steps_per_generation": trainer.args.steps_per_generation}


def run_trl(cfg, out: Path) -> dict:
    trainer, tokenizer, record, train_rewards, threads = trl_trainer(cfg, out)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started

    checks = trl_checks(trainer)
    final = out / "final"
    trainer.model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    phases = {k: sum(record[k]) for k in ("rollout_total", "generate", "reward")}
    phases["steps_total"] = sum(e - b for b, e in zip(record["step_begin"], record["step_end"]))
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


# ---------------------------------------------------------------------------------- realistic setting
# A random Qwen2 of 25.3 M parameters with a 32k vocabulary (benchmarks/rollout.py's layout, larger),
# 8 prompts of 64 tokens per step, G = 8 completions of exactly C tokens each.
REALISTIC_MODEL = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                       num_key_value_heads=2, vocab_size=32_000, max_position_embeddings=2048)
REALISTIC = dict(prompts_per_step=8, prompt_length=64, num_generations=8, num_minibatches=4, learning_rate=1e-6)
PAD, UNK = "<pad>", "<unk>"
EOS = "<eos>"  # id vocab_size: outside the model's logits, so no completion ever ends before C tokens


def build_realistic_inputs(root: Path, seed: int = 0) -> tuple[Path, Path, int]:
    """Save the random model, its tokenizer and the prompts under root (model/, prompts.jsonl);
    returns their paths and the model's parameter count.

    The tokenizer is a word-level one built here (nothing downloaded): ids 0..V-1 are <pad>,
    <unk> and the words w2..w31999, one per model logit; <eos> is id V, which the model cannot
    sample, so both frameworks generate exactly max_completion_length tokens. A prompt is 64
    random words joined by spaces: it tokenises back to exactly those 64 ids in both frameworks."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    V = REALISTIC_MODEL["vocab_size"]
    vocab = {PAD: 0, UNK: 1, **{f"w{i}": i for i in range(2, V)}, EOS: V}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                        padding_side="left")
    # EOS only in the tokenizer (both frameworks take it from there; TRL adds the model's own, here none):
    # transformers warns about a model config whose eos_token_id is outside the vocabulary.
    config = Qwen2Config(**REALISTIC_MODEL, tie_word_embeddings=True, pad_token_id=0, eos_token_id=None,
                         bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    model_dir = root / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)

    generator = torch.Generator().manual_seed(seed)
    P, n = REALISTIC["prompt_length"], REALISTIC["prompts_per_step"]
    ids = torch.randint(2, V, (n, P), generator=generator).tolist()
    texts = [" ".join(f"w{i}" for i in row) for row in ids]
    if tokenizer(texts, add_special_tokens=False)["input_ids"] != ids:
        raise SystemExit("vs_trl: the realistic prompts do not tokenise back to their ids")
    prompts_file = root / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return model_dir, prompts_file, sum(p.numel() for p in model.parameters())


def token_parity(prompts, completions, completion_ids=None, **kwargs):
    """A cheap reward: the fraction of even token ids in a completion (not constant, so the
    advantages and gradients are not zero)."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def realistic_config(model_dir: Path, prompts_file: Path, completion_length: int, steps: int, seed: int,
                     output_dir: Path):
    """sapo-rl's TrainConfig of the realistic setting (`trl_config` maps it to TRL's names). The
    dataset holds exactly prompts_per_step prompts, so every step of both frameworks samples the
    same 8 prompts. One micro-batch per minibatch (16 sequences), as TRL's one forward/backward per
    optimizer step; sapo-rl's other settings are its defaults (rollout log-probs as pi_old,
    padding-free rows, chunked log-probs)."""
    from sapo.config import TrainConfig

    rollout = REALISTIC["prompts_per_step"] * REALISTIC["num_generations"]
    return TrainConfig.from_dict(dict(
        model=str(model_dir), dataset=str(prompts_file), reward_funcs=[token_parity], eval_dataset=None,
        num_generations=REALISTIC["num_generations"], prompts_per_step=REALISTIC["prompts_per_step"],
        num_minibatches=REALISTIC["num_minibatches"], micro_batch_size=rollout // REALISTIC["num_minibatches"],
        max_prompt_length=REALISTIC["prompt_length"], max_completion_length=completion_length, temperature=1.0,
        top_p=1.0, learning_rate=REALISTIC["learning_rate"], max_grad_norm=1.0, loss_type="sapo", max_steps=steps,
        save_steps=0, save_total_limit=1, output_dir=str(output_dir), seed=seed,
    )).validate()


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This process's float32 matmul throughput: the best of `repeats` (n x n) @ (n x n) products."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def run_sapo_realistic(cfg, out: Path, warmup: int) -> dict:
    """Trains warmup + measured steps; times the measured ones: from the start of the first measured
    step's rollout to the end of the last step (before its checkpoint is written)."""
    import torch

    from sapo.training.trainer import Trainer

    peak = matmul_peak_gflops()
    threads = torch.get_num_threads()
    trainer = Trainer(cfg)
    starts, saves = [], []
    rollout, save = trainer._rollout, trainer.save

    def timed_rollout(*args, **kwargs):
        starts.append(time.perf_counter())
        return rollout(*args, **kwargs)

    def timed_save(*args, **kwargs):
        saves.append(time.perf_counter())
        return save(*args, **kwargs)

    trainer._rollout, trainer.save = timed_rollout, timed_save
    history = trainer.train()
    measured = [h for h in history if h["step"] > warmup]
    window = saves[-1] - starts[warmup]
    phases = {name: sum(h[f"time/{name}"] for h in measured) for name in ("rollout", "reward", "update")}
    phases["other"] = window - sum(phases.values())
    lengths = [h["completions/mean_length"] for h in history if h["step"] > 0]
    clipped = [h["completions/clipped_ratio"] for h in history if h["step"] > 0]
    return {"measured_seconds": window, "measured_steps": len(measured), "phases": phases,
            "peak_gflops": peak, "torch_threads": threads,
            "completion_length": {"mean_per_step": lengths, "truncated_fraction_per_step": clipped},
            "train_rewards": [h["reward"] for h in measured]}


def run_trl_realistic(cfg, out: Path, warmup: int) -> dict:
    """Trains (warmup + measured) * num_minibatches optimizer steps; times the measured ones: from the
    end of the last warm-up optimizer step to the end of the last one (nothing is saved)."""
    peak = matmul_peak_gflops()
    trainer, _, record, train_rewards, threads = trl_trainer(cfg, out)
    started = time.perf_counter()
    trainer.train()
    per_rollout = cfg.num_minibatches * cfg.num_iterations  # optimizer steps per rollout step
    if len(record["rollout_total"]) != cfg.max_steps or len(record["step_end"]) != cfg.max_steps * per_rollout:
        raise SystemExit(f"vs_trl: expected {cfg.max_steps} generations and {cfg.max_steps * per_rollout} optimizer "
                         f"steps from TRL, got {len(record['rollout_total'])} and {len(record['step_end'])}")
    first = warmup * per_rollout
    window = record["step_end"][-1] - (record["step_end"][first - 1] if first else started)
    rollout_total, generate, reward = (sum(record[k][warmup:]) for k in ("rollout_total", "generate", "reward"))
    steps_total = sum(e - b for b, e in zip(record["step_begin"][first:], record["step_end"][first:]))
    phases = {"rollout": rollout_total - reward,  # generation, old log-probs (a forward pass), advantages
              "reward": reward,
              "update": steps_total - rollout_total,  # forward/backward, clipping, optimizer
              "other": window - steps_total,  # data loading and the Trainer loop around the steps
              "generate": generate}  # model.generate and decoding, part of "rollout"
    lengths = record["completion_lengths"]
    return {"measured_seconds": window, "measured_steps": cfg.max_steps - warmup, "phases": phases,
            "peak_gflops": peak, "torch_threads": threads,
            "completion_length": {"min": min(lengths), "max": max(lengths), "count": len(lengths)},
            "train_rewards": train_rewards[warmup:],
            "checks": {**trl_checks(trainer), "eos_token_ids": list(trainer.eos_token_ids)}}


# ---------------------------------------------------------------------------------- driver
def worker(args: argparse.Namespace) -> int:
    quiet_transformers()
    out = Path(args.output_dir) / args.worker
    if args.setting == "realistic":
        cfg = realistic_config(Path(args.model_dir), Path(args.prompts_file), int(args.completion_length),
                               args.warmup_steps + args.steps, args.seed, out)
        result = (run_sapo_realistic if args.worker == "sapo" else run_trl_realistic)(cfg, out, args.warmup_steps)
    else:
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
    parser.add_argument("--setting", choices=("demo", "realistic"), default="demo",
                        help="demo: the built-in demo, timed and evaluated; realistic: a 25M-parameter random "
                        "Qwen2 with completions of exactly --completion-length tokens, timed only")
    parser.add_argument("--steps", type=int, default=None, help="rollout steps (sapo-rl's max_steps; TRL runs "
                        "num_minibatches optimizer steps per rollout step); default 100 (demo), or 3 measured "
                        "steps after --warmup-steps (realistic)")
    parser.add_argument("--completion-length", default="64,128,256",
                        help="realistic: comma-separated completion lengths C, one pair of runs each")
    parser.add_argument("--warmup-steps", type=int, default=1,
                        help="realistic: untimed rollout steps before the measured ones")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds; each runs both frameworks "
                        "(realistic: one seed)")
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out sampling (sapo eval's --seed)")
    parser.add_argument("--output-dir", default=None, help="default outputs/vs_trl (demo), "
                        "outputs/vs_trl_realistic (realistic)")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    realistic = args.setting == "realistic"
    if args.steps is None:
        args.steps = 3 if realistic else 100
    if args.output_dir is None:
        args.output_dir = "outputs/vs_trl_realistic" if realistic else "outputs/vs_trl"
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if realistic:
        if len(seeds) != 1:
            parser.error("--setting realistic takes one seed")
        try:
            lengths = [int(x) for x in args.completion_length.split(",")]
        except ValueError:
            parser.error(f"--completion-length must be comma-separated integers, got {args.completion_length!r}")
        if any(c < 1 for c in lengths):
            parser.error("--completion-length values must be at least 1")

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
    if realistic:
        return main_realistic(args, seeds[0], lengths)

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


def main_realistic(args: argparse.Namespace, seed: int, lengths: list[int]) -> int:
    """Both frameworks for each completion length C, one fresh process each; prints the timings."""
    import torch
    import transformers
    import trl

    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    quiet_transformers()
    model_dir, prompts_file, params = build_realistic_inputs(root)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # both on the CPU
    Q, P, G = REALISTIC["prompts_per_step"], REALISTIC["prompt_length"], REALISTIC["num_generations"]
    B = Q * G
    runs: dict[int, dict[str, dict]] = {}
    for C in lengths:
        run_root = root / f"C{C}"
        runs[C] = {}
        for name in FRAMEWORKS:
            shutil.rmtree(run_root / name, ignore_errors=True)
            (run_root / name).mkdir(parents=True)
            log = run_root / f"{name}.log"
            print(f"C={C}: {'sapo-rl' if name == 'sapo' else 'TRL'}, {args.warmup_steps} warm-up + {args.steps} "
                  f"measured steps (log: {log}) ...", flush=True)
            with log.open("w") as f:
                done = subprocess.run([sys.executable, __file__, "--worker", name, "--setting", "realistic",
                                       "--completion-length", str(C), "--steps", str(args.steps),
                                       "--warmup-steps", str(args.warmup_steps), "--seeds", str(seed),
                                       "--output-dir", str(run_root), "--model-dir", str(model_dir),
                                       "--prompts-file", str(prompts_file)],
                                      stdout=f, stderr=subprocess.STDOUT, env=env)
            if done.returncode != 0:
                print(f"vs_trl: the {name} run failed (exit {done.returncode}); the end of {log}:")
                print("".join(log.read_text().splitlines(keepends=True)[-30:]), end="")
                return 1
            r = json.loads((run_root / name / "result.json").read_text())
            steps = r["measured_steps"]
            per_step = {k: v / steps for k, v in r["phases"].items()}
            # The tokens a step must compute: each prompt once (a group shares it), each completion token once.
            # Work an implementation repeats (G prefills per prompt, a separate pi_old forward) is not counted.
            tokens = Q * P + B * C
            rollout_flops, update_flops = 2 * params * tokens, 6 * params * tokens
            peak = r["peak_gflops"] * 1e9
            r.update(seconds_per_step=r["measured_seconds"] / steps, phases_per_step=per_step,
                     model_flops_per_step={"rollout": rollout_flops, "update": update_flops, "tokens": tokens},
                     mfu={"rollout": rollout_flops / per_step["rollout"] / peak,
                          "update": update_flops / per_step["update"] / peak})
            runs[C][name] = r

    labels = {"sapo": f"sapo-rl {_version('sapo-rl')}", "trl": f"TRL {trl.__version__} (loss_type=sapo)"}
    width = max(len(v) for v in labels.values())
    cfg = realistic_config(model_dir, prompts_file, lengths[0], 1, seed, root / "unused")
    first = runs[lengths[0]]["sapo"]
    print(f"\nrandom Qwen2, {params / 1e6:.1f} M parameters (hidden {REALISTIC_MODEL['hidden_size']}, "
          f"{REALISTIC_MODEL['num_hidden_layers']} layers, vocabulary {REALISTIC_MODEL['vocab_size']}, tied "
          f"embeddings); {Q} prompts of {P} tokens x G={G} = {B} completions of exactly C tokens per step, "
          f"{cfg.num_minibatches} optimizer steps each, lr {cfg.learning_rate:g}, AdamW, max_grad_norm "
          f"{cfg.max_grad_norm:g}; {args.steps} measured steps after {args.warmup_steps} warm-up, seed {seed}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {first['torch_threads']} torch "
          f"threads, CPU")
    print("MFU: model FLOPs per step / seconds of the phase / the process's float32 peak (best 2048 x 2048 "
          "matmul); model FLOPs = 2 x params x tokens for the rollout, 6 x that for the update, tokens = "
          "prompts x P + completions x C (each prompt once, each completion token once; no attention term)\n")
    head = (f"{'C':>4}  {'framework':<{width}}  {'s/step':>7}  {'rollout':>7}  {'reward':>6}  {'update':>7}  "
            f"{'other':>6}  {'MFU roll':>8}  {'MFU upd':>7}  {'peak GFLOP/s':>12}")
    print(head)
    summary = {}
    for C in lengths:
        for name in FRAMEWORKS:
            r = runs[C][name]
            ph = r["phases_per_step"]
            print(f"{C:>4}  {labels[name]:<{width}}  {r['seconds_per_step']:>7.2f}  {ph['rollout']:>7.2f}  "
                  f"{ph['reward']:>6.3f}  {ph['update']:>7.2f}  {ph['other']:>6.2f}  {r['mfu']['rollout']:>8.1%}  "
                  f"{r['mfu']['update']:>7.1%}  {r['peak_gflops']:>12.1f}")
        s, t = runs[C]["sapo"], runs[C]["trl"]
        ps, pt = s["phases_per_step"], t["phases_per_step"]
        summary[C] = {"steps_per_second_ratio_sapo_over_trl": t["seconds_per_step"] / s["seconds_per_step"],
                      "rollout_speedup_sapo_over_trl": pt["rollout"] / ps["rollout"],
                      "update_speedup_sapo_over_trl": pt["update"] / ps["update"]}
    print("\n(seconds per step by phase; rollout: sampling and pi_old (TRL: model.generate, then a forward pass "
          "for the old log-probs; sapo-rl: the sampler's own log-probs) and advantages; update: forward/backward "
          "and optimizer steps; other: the loops around them)")
    for C in lengths:
        generate = runs[C]["trl"]["phases_per_step"]["generate"]
        print(f"C={C}: TRL's rollout includes {generate:.2f} s/step in model.generate and decoding")
    print(f"\n{'C':>4}  {'steps/s sapo-rl / TRL':>21}  {'rollout s TRL / sapo-rl':>23}  {'update s TRL / sapo-rl':>22}")
    for C in lengths:
        x = summary[C]
        print(f"{C:>4}  {x['steps_per_second_ratio_sapo_over_trl']:>21.2f}  "
              f"{x['rollout_speedup_sapo_over_trl']:>23.2f}  {x['update_speedup_sapo_over_trl']:>22.2f}")
    bad = [f"C={C} {name}" for C in lengths for name in FRAMEWORKS if not _all_length(runs[C][name], C)]
    if bad:
        print(f"\nWARNING: completions not all exactly C tokens in: {', '.join(bad)}")

    results = {"setting": "realistic", "steps": args.steps, "warmup_steps": args.warmup_steps, "seed": seed,
               "completion_lengths": lengths, "params": params, "model": REALISTIC_MODEL, "rollout": REALISTIC,
               "summary": {str(C): v for C, v in summary.items()},
               "versions": {"sapo-rl": _version("sapo-rl"), "trl": trl.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__},
               "runs": {str(C): v for C, v in runs.items()}}
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {root / 'results.json'}")
    return 0


def _all_length(run: dict, C: int) -> bool:
    """Whether every completion of the run (warm-up included) had exactly C tokens."""
    lengths = run["completion_length"]
    if "min" in lengths:  # TRL: the lengths its reward function saw
        return lengths["min"] == lengths["max"] == C
    return (all(m == C for m in lengths["mean_per_step"])
            and all(f == 1.0 for f in lengths["truncated_fraction_per_step"]))


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
