"""The `sapo` command. Subcommands are added as the features behind them land."""

from __future__ import annotations

import argparse
import sys


def _cmd_losses(args: argparse.Namespace) -> int:
    from . import available_aggregations, available_policy_losses
    from .algorithms import get_policy_loss

    print("Policy objectives (loss_type):")
    for name in available_policy_losses():
        doc = (get_policy_loss(name).__doc__ or "").strip().splitlines()
        print(f"  {name:<6} {doc[0] if doc else ''}")
    print("Aggregations (aggregation):")
    for name in available_aggregations():
        print(f"  {name}")
    return 0


def config_reference(markdown: bool = False) -> str:
    """Every TrainConfig field with its default and docstring (docs/training.md holds the markdown)."""
    from .config import TrainConfig, field_docs

    defaults = TrainConfig().to_dict()
    if markdown:
        rows = [f"| `{k}` | `{defaults[k]!r}` | {doc.replace('|', '/')} |" for k, doc in field_docs().items()]
        return "\n".join(["| field | default | meaning |", "|---|---|---|", *rows])
    return "\n".join(f"{k} = {defaults[k]!r}\n    {doc}" for k, doc in field_docs().items())


def _cmd_train(args: argparse.Namespace) -> int:
    from .errors import ConfigError, EngineError, RewardError

    if args.help_config:
        print(config_reference(markdown=args.markdown))
        return 0
    try:
        config = _load_config(args.args)
        from .training.trainer import Trainer

        Trainer(config).train()
    except (ConfigError, EngineError, RewardError) as err:
        print(f"sapo train: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch
    from rich.progress import Progress

    from .config import resolve_model
    from .data import load_rows, prepare_prompts
    from .engines import HFEngine, SamplingSettings
    from .errors import ConfigError
    from .model.loading import load_model, load_tokenizer
    from .rewards import RewardSettings, load_reward_function
    from .tasks import available_tasks, get_task
    from .training.evaluation import EvalSettings, evaluate

    args.model = resolve_model(args.model)  # a shipped model's name, e.g. moe-tiny
    try:
        if args.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {args.samples}")
        if args.max_num_seqs < 0:
            raise ConfigError(f"--max-num-seqs must be 0 (all at once) or positive, got {args.max_num_seqs}")
        if not args.temperature > 0:
            raise ConfigError(f"--temperature must be positive (greedy accuracy is reported as well), "
                              f"got {args.temperature}")
        if args.max_new_tokens < 1 or (args.problems is not None and args.problems < 1):
            raise ConfigError("--max-new-tokens and --problems must be positive")
        if args.out and not Path(args.out).resolve().parent.is_dir():
            raise ConfigError(f"--out {args.out}: the directory {Path(args.out).resolve().parent} does not exist")
        if not Path(args.model).is_dir():
            raise ConfigError(f"{args.model}: no such local model directory (sapo eval loads models from disk)")
        if not (Path(args.model) / "config.json").is_file():
            checkpoints = sorted(Path(args.model).glob("checkpoint-*"), key=lambda p: (len(p.name), p.name))
            hint = (f"; it looks like a training run: evaluate one of its checkpoints, e.g. {checkpoints[-1]}"
                    if checkpoints else "")
            raise ConfigError(f"{args.model} is not a model directory (no config.json){hint}")
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            raise ConfigError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: no CUDA device is available here")
        if args.task not in available_tasks():
            raise ConfigError(f"--task {args.task!r} is not a built-in task ({available_tasks()}); sapo eval "
                              "evaluates those. For your own data, train with eval_dataset=<file>")
        task = get_task(args.task)
        tokenizer = load_tokenizer(args.model)
        rows = load_rows(args.task, split="test", task_kwargs=_kwargs(args.task_kwargs),
                         field="--task")[: args.problems]
        prompts = prepare_prompts(rows, tokenizer, max_prompt_length=10**6, filter_overlong=False, name=args.task)
        model = load_model(args.model).to(device).eval()
    except (ConfigError, ValueError, OSError) as err:
        print(f"sapo eval: error: {err}", file=sys.stderr)
        return 2
    sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                max_num_seqs=args.max_num_seqs)
    settings = EvalSettings(samples=args.samples, greedy=True, sampling=sampling,
                            rewards=RewardSettings(skip_errors=True), seed=args.seed)
    engine = HFEngine(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, device=device)
    with Progress(disable=not sys.stderr.isatty()) as bar:
        job = bar.add_task(f"eval {args.task}", total=len(prompts))
        totals = evaluate(engine, tokenizer, prompts, [load_reward_function(task.reward)], settings,
                          on_batch=lambda n: bar.advance(job, n))
    metrics = totals.metrics()
    result = {"pass@1": metrics["pass@1"], "pass@k": metrics[f"pass@{args.samples}"], "k": args.samples,
              "greedy_accuracy": metrics["greedy_accuracy"], "samples": args.samples, "problems": totals.problems,
              "model": str(args.model), "task": args.task, "temperature": args.temperature, "seed": args.seed}
    _print_eval(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _print_eval(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['task']}: {result['problems']} held-out problems, {result['samples']} samples each")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("Pass@1 (mean over samples)", f"{result['pass@1']:.3f}")
    table.add_row(f"Pass@{result['k']}", f"{result['pass@k']:.3f}")
    table.add_row("greedy accuracy", f"{result['greedy_accuracy']:.3f}")
    Console().print(table)


def _kwargs(items: list[str] | None) -> dict:
    import yaml

    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def _cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import available_tasks, get_task

    for name in available_tasks():
        task = get_task(name)
        example = task.load("train", train_size=1, test_size=1)[0]
        print(f"{name}: {task.description}")
        print(f"  options (task_kwargs): {task.options}")
        print(f"  example: prompt {example['prompt']!r} -> {example[task.target]!r}  (reward: {task.reward})")
    return 0


def _cmd_warmstart(args: argparse.Namespace) -> int:
    from .warmstart import warmstart

    try:
        out = warmstart(args.out, task=args.task, task_kwargs=_kwargs(args.task_kwargs), steps=args.steps,
                        seed=args.seed, arch=args.arch)
    except ValueError as err:
        print(f"sapo warmstart: error: {err}", file=sys.stderr)
        return 2
    print(f"saved {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .errors import CheckpointError, ConfigError
    from .training.export import export_model

    try:
        out = export_model(args.checkpoint, args.out, dtype=args.dtype)
    except (ConfigError, CheckpointError) as err:
        print(f"sapo export: error: {err}", file=sys.stderr)
        return 2
    print(f"saved {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def _cmd_vllm_serve(args: argparse.Namespace) -> int:
    import os
    import shutil
    from pathlib import Path

    from .engines.vllm_command import SERVER_ENV, serve_command, shell_line

    if not (Path(args.model) / "config.json").is_file():
        print(f"sapo vllm-serve: error: {args.model!r} is not a model directory (no config.json): give the run's "
              "model (or a checkpoint-<step> to resume from)", file=sys.stderr)
        return 2
    argv = serve_command(args.model, host=args.host, port=args.port, max_model_len=args.max_model_len,
                         tensor_parallel_size=args.tensor_parallel_size,
                         gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype)
    if not args.run:
        print(shell_line(argv))
        print(f"# then train with: rollout_engine=vllm vllm_server_base_url=http://{args.host}:{args.port}",
              file=sys.stderr)
        return 0
    if shutil.which("vllm") is None:
        print("sapo vllm-serve: error: vllm is not installed here: pip install 'sapo-rl[vllm]' on the GPU machine "
              "(or run the printed command where vLLM is)", file=sys.stderr)
        return 2
    os.execvpe("vllm", argv, {**os.environ, **SERVER_ENV})
    return 0  # not reached


def _load_config(items: list[str], *, fixed_by: dict[str, str] | None = None):
    """An optional leading CONFIG.yaml, then key=value overrides. When neither names a `dataset`
    nor a `model` other than a shipped one (model=moe-tiny), they apply on top of the built-in
    demo setting (sapo.demo). `fixed_by` maps fields the command sets itself to the option that
    sets them: naming one is an error."""
    from .config import SHIPPED_MODELS, TrainConfig, read_yaml_mapping
    from .demo import demo_settings
    from .errors import ConfigError

    items = list(items)
    path = items.pop(0) if items and "=" not in items[0] else None
    loaded = read_yaml_mapping(path) if path is not None else {}
    overrides = {i.split("=", 1)[0] for i in items}
    clash = sorted(overrides & set(fixed_by or {}))
    if clash:
        raise ConfigError(f"{clash[0]} is set by {fixed_by[clash[0]]} for each run; remove {clash[0]}=...")
    dropped = sorted(set(loaded) & set(fixed_by or {}))  # e.g. a run's own config.yaml as the base
    if dropped:
        print(f"note: {', '.join(dropped)} from {path} replaced for each run (" +
              "; ".join(f"{k}: {fixed_by[k]}" for k in dropped) + ")", file=sys.stderr)
        loaded = {k: v for k, v in loaded.items() if k not in dropped}
    named = overrides | set(loaded)
    model = next((i.split("=", 1)[1] for i in reversed(items) if i.split("=", 1)[0] == "model"), loaded.get("model"))
    if str(model).strip().strip("'\"") in SHIPPED_MODELS:
        named = named - {"model"}  # a shipped model on the demo's task
    base = {} if named & {"model", "dataset"} else demo_settings()
    return TrainConfig.from_sources(None, items, base={**base, **loaded})


# What compare/sweep set for each run themselves.
RUN_FIELDS = {"seed": "--seeds", "output_dir": "--out (a directory per arm and seed)",
              "resume_from_checkpoint": "the command (a rerun continues each run from its latest checkpoint)"}


def _run_experiment(args: argparse.Namespace, runs_for, default_out: str) -> int:
    import shlex

    from .errors import ConfigError, EngineError, RewardError
    from .experiments.report import build_report
    from .experiments.runs import run_all

    try:
        base = _load_config(args.args, fixed_by=RUN_FIELDS).to_dict()
        runs = runs_for(args)
        overridden = sorted({k for run in runs for k in run.overrides} & {i.split("=", 1)[0] for i in args.args})
        if overridden:
            option = "--grid" if args.command == "sweep" else "--arms" if args.arms else "--loss-types"
            raise ConfigError(f"{', '.join(overridden)} is set for every run and varied by the {option} option: "
                              "give it in one place")
        dirs = run_all(base, runs, args.out or default_out)
        report = build_report(dirs, args.out or default_out, threshold=args.threshold, title=f"sapo {args.command}",
                              command="sapo " + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
                              log=lambda message: print(f"sapo {args.command}: {message}", file=sys.stderr))
    except (ConfigError, EngineError, RewardError) as err:
        print(f"sapo {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .experiments.runs import ARM_SPEC, arm_runs, compare_runs, parse_arms

    if args.arms is not None:
        # `--arms` takes every word after it: key=value overrides (and a CONFIG.yaml) given after
        # the arms are the command's, not arms.
        words = list(args.arms)
        args.arms = [w for w in words if ARM_SPEC.match(w)]
        rest = [w for w in words if not ARM_SPEC.match(w)]
        args.args = [w for w in rest if "=" not in w] + list(args.args) + [w for w in rest if "=" in w]

    def runs_for(a: argparse.Namespace):
        from .errors import ConfigError

        seeds = _csv(a.seeds, int, "--seeds")
        if a.arms is None:
            loss_types = "sapo,grpo,gspo" if a.loss_types is None else a.loss_types
            return compare_runs(_csv(loss_types, str, "--loss-types"), seeds)
        if a.loss_types is not None:
            raise ConfigError("--arms and --loss-types both name the arms: give one (e.g. --arms sapo:loss_type=sapo "
                              "grpo:loss_type=grpo)")
        return arm_runs(parse_arms(a.arms), seeds)

    return _run_experiment(args, runs_for, "outputs/compare")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .experiments.runs import parse_grid, sweep_runs

    return _run_experiment(args, lambda a: sweep_runs(parse_grid(a.grid), _csv(a.seeds, int, "--seeds")),
                           "outputs/sweep")


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .experiments.report import build_report

    dirs = []
    for root in map(Path, args.run_dirs):  # a run, or a compare/sweep directory holding runs
        dirs += ([p.parent for p in sorted(root.rglob("summary.json"))] if not (root / "summary.json").is_file()
                 else [root])
    try:
        report = build_report(dirs, args.out or args.run_dirs[0], threshold=args.threshold,
                              log=lambda message: print(f"sapo report: {message}", file=sys.stderr))
    except ValueError as err:
        print(f"sapo report: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .experiments.plots import plot_gates

    problem = None
    if not (0 < args.tau_pos < float("inf") and 0 < args.tau_neg < float("inf")):
        problem = "--tau-pos and --tau-neg must be positive"
    elif Path(args.out).suffix.lower() not in (".png", ".pdf", ".svg"):
        problem = f"--out {args.out}: give a .png, .pdf or .svg file"
    if problem:
        print(f"sapo plot: error: {problem}", file=sys.stderr)
        return 2
    print(f"wrote {plot_gates(args.out, tau_pos=args.tau_pos, tau_neg=args.tau_neg)}")
    return 0


def _csv(text: str, kind, option: str) -> list:
    """A comma-separated option's distinct values, in order; none, or one that is not a `kind`,
    is a ConfigError naming the option."""
    from .errors import ConfigError

    try:
        values = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated {kind.__name__} values") from None
    if not values:
        raise ConfigError(f"{option} is empty")
    if len(set(values)) < len(values):
        raise ConfigError(f"{option} {text!r} repeats a value")
    return values


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sapo",
        description="RL post-training of language models with SAPO (soft adaptive policy optimization), GRPO and GSPO.",
    )
    parser.add_argument("--version", action="version", version=f"sapo-rl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    losses = sub.add_parser("losses", help="list the registered policy objectives and aggregations")
    losses.set_defaults(func=_cmd_losses)
    train = sub.add_parser("train", help="train a model with SAPO / GRPO / GSPO",
                           description="sapo train [CONFIG.yaml] [key=value ...]: fields of the YAML file, "
                           "overridden by key=value pairs. --help-config lists every field. When neither names a "
                           "dataset or a model (other than a shipped one: model=arithmetic-tiny or model=moe-tiny), "
                           "they apply on top of the built-in demo (SAPO on the arithmetic task from the shipped "
                           "model); `sapo train` alone runs the demo, `sapo train model=moe-tiny` runs it on the "
                           "shipped Mixture-of-Experts model.")
    train.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
    train.add_argument("--help-config", action="store_true",
                       help="list every config field with its default and meaning")
    train.add_argument("--markdown", action="store_true", help="with --help-config: print a markdown table")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="Pass@1, Pass@k and greedy accuracy of a model on a built-in task")
    ev.add_argument("model", help="model directory (or a shipped model: arithmetic-tiny, moe-tiny)")
    ev.add_argument("--task", default="arithmetic")
    ev.add_argument("--samples", type=int, default=8, help="samples per problem (k of Pass@k)")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--problems", type=int, default=None, help="only the first N held-out problems")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--max-num-seqs", type=int, default=0,
                    help="most sequences decoded at once, rounded down to whole problems (0: a batch of 16 problems)")
    ev.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    ev.add_argument("--task-kwargs", nargs="*", metavar="key=value", help="task options, e.g. digits=3")
    ev.add_argument("--out", help="write the results as JSON here")
    ev.set_defaults(func=_cmd_eval)

    export = sub.add_parser("export", help="write a checkpoint (sharded or not) as a model directory",
                            description="sapo export CHECKPOINT --out DIR: safetensors weights, config, generation "
                            "config, tokenizer and chat template, as save_pretrained writes them; a sharded (fsdp) "
                            "checkpoint's shards are gathered in this one process.")
    export.add_argument("checkpoint", help="a checkpoint-<step> directory")
    export.add_argument("--out", required=True, help="a new or empty directory")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="cast the weights (default: float32, as trained)")
    export.set_defaults(func=_cmd_export)

    serve = sub.add_parser("vllm-serve", help="print (or run) the `vllm serve` command for rollout_engine=vllm",
                           description="sapo vllm-serve MODEL: the `vllm serve` command, with the flags the "
                           "trainer's vLLM client needs (dev-mode weight-update routes with the disk backend, "
                           "processed log-probabilities, no generation_config defaults). Prints it; --run runs it.")
    serve.add_argument("model", help="the run's model directory (the trainer checks the server serves it)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only; anyone "
                       "who can reach the server can replace its weights)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="longest sequence: at least max_prompt_length + max_completion_length (default: the "
                       "model's)")
    serve.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the server splits the model over")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="share of each GPU's memory vLLM takes (default: 0.9, a GPU of its own)")
    serve.add_argument("--dtype", default="auto", help="weights' dtype on the server (default: auto, the model's)")
    serve.add_argument("--run", action="store_true", help="run the command instead of printing it")
    serve.set_defaults(func=_cmd_vllm_serve)

    tasks = sub.add_parser("tasks", help="list the built-in tasks with an example each")
    tasks.set_defaults(func=_cmd_tasks)

    ws = sub.add_parser("warmstart", help="regenerate a shipped model: supervised warm start on a task",
                        description="sapo warmstart --out DIR: a tiny model trained from scratch by supervised "
                        "fine-tuning on a task's train split. --arch llama made arithmetic-tiny, --arch qwen3_moe "
                        "made moe-tiny (docs/demo.md).")
    ws.add_argument("--arch", choices=["llama", "qwen3_moe"], default="llama",
                    help="llama: dense (default); qwen3_moe: a Qwen3-MoE, top-2 of 4 experts per layer")
    ws.add_argument("--task", default="arithmetic")
    ws.add_argument("--out", required=True)
    ws.add_argument("--steps", type=int, default=None, help="SFT steps (default: the arch's, see docs/demo.md)")
    ws.add_argument("--seed", type=int, default=0)
    ws.add_argument("--task-kwargs", nargs="*", metavar="key=value")
    ws.set_defaults(func=_cmd_warmstart)

    for name, help_text in (("compare", "train each loss type (or named arm) for each seed, then write a report"),
                            ("sweep", "train each point of a grid of config values for each seed, then a report")):
        cmd = sub.add_parser(name, help=help_text, description=f"sapo {name} [CONFIG.yaml] [options] [key=value ...]. "
                             "Without CONFIG.yaml: the built-in demo setting. Finished runs are skipped on a rerun.")
        cmd.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
        if name == "compare":
            cmd.add_argument("--loss-types", default=None, help="comma-separated (default: sapo,grpo,gspo)")
            cmd.add_argument("--arms", nargs="+", metavar="NAME:SPEC",
                             help="named arms instead of --loss-types, each NAME:key=value[,key=value...] or "
                             "NAME:file.yaml of overrides, e.g. --arms sapo:loss_type=sapo "
                             "grpo_r2:examples/grpo_r2.yaml gspo:loss_type=gspo")
        else:
            cmd.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                             help="a config field and its values; repeat for a product grid")
        cmd.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
        cmd.add_argument("--out", help=f"directory of the runs and the report (default: outputs/{name})")
        cmd.add_argument("--threshold", type=float, default=0.4, help="Pass@1 level for 'steps to threshold'")
        cmd.set_defaults(func=_cmd_compare if name == "compare" else _cmd_sweep)

    rep = sub.add_parser("report", help="rebuild the report from finished runs")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", help="where to write it (default: the first RUN_DIR)")
    rep.add_argument("--threshold", type=float, default=0.4)
    rep.set_defaults(func=_cmd_report)

    plot = sub.add_parser("plot", help="figures: `sapo plot gates --out FILE.png`")
    plot.add_argument("what", choices=["gates"])
    plot.add_argument("--out", required=True)
    plot.add_argument("--tau-pos", type=float, default=1.0)
    plot.add_argument("--tau-neg", type=float, default=1.05)
    plot.set_defaults(func=_cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (`sapo compare --seeds 0,1 max_steps=50`).
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "args")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.args = list(args.args) + extra
    args.argv = argv
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
