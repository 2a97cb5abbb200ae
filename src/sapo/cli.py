"""The `sapo` command. Subcommands are added as the features behind them land."""

from __future__ import annotations

import argparse
import sys


def _cmd_losses(args: argparse.Namespace) -> int:
    from . import available_aggregations, available_policy_losses
    from .losses import get_policy_loss

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
    from .config import ConfigError, TrainConfig
    from .rewards import RewardError

    if args.help_config:
        print(config_reference(markdown=args.markdown))
        return 0
    items = list(args.args)
    path = items.pop(0) if items and "=" not in items[0] else None
    try:
        if path is None and not any(i.split("=", 1)[0] in ("model", "dataset") for i in items):
            # Neither a config file nor a model or dataset: the built-in demo, key=value on top.
            from .demo import demo_config

            config = demo_config(items)
        else:
            config = TrainConfig.from_sources(path, items)
        from .trainer import Trainer

        Trainer(config).train()
    except (ConfigError, RewardError) as err:
        print(f"sapo train: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    import torch
    from rich.progress import Progress

    from . import evaluation
    from .config import ConfigError
    from .data import load_rows, prepare_prompts
    from .models import load_model, load_tokenizer
    from .rewards import load_reward_function
    from .tasks import get_task

    try:
        task = get_task(args.task)
        tokenizer = load_tokenizer(args.model)
        rows = load_rows(args.task, split="test", task_kwargs=_kwargs(args.task_kwargs))[: args.problems]
        prompts = prepare_prompts(rows, tokenizer, max_prompt_length=10**6, filter_overlong=False, name=args.task)
    except (ConfigError, ValueError, OSError) as err:
        print(f"sapo eval: error: {err}", file=sys.stderr)
        return 2
    model = load_model(args.model).eval()
    with Progress(disable=not sys.stderr.isatty()) as bar:
        job = bar.add_task(f"eval {args.task}", total=len(prompts))
        totals = evaluation.evaluate(model, tokenizer, prompts, [load_reward_function(task.reward)], [1.0],
                                     samples=args.samples, temperature=args.temperature, top_p=1.0,
                                     max_new_tokens=args.max_new_tokens, seed=args.seed, device=torch.device("cpu"),
                                     on_batch=lambda n: bar.advance(job, n))
    metrics = totals.metrics()
    result = {"pass@1": metrics["pass@1"], "pass@k": metrics[f"pass@{args.samples}"], "k": args.samples,
              "greedy_accuracy": metrics["greedy_accuracy"], "samples": args.samples, "problems": totals.problems,
              "model": str(args.model), "task": args.task, "temperature": args.temperature, "seed": args.seed}
    _print_eval(result)
    if args.out:
        from pathlib import Path

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

    out = warmstart(args.out, task=args.task, task_kwargs=_kwargs(args.task_kwargs), steps=args.steps, seed=args.seed)
    print(f"saved {out}")
    return 0


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
                           "overridden by key=value pairs. --help-config lists every field. With neither a "
                           "CONFIG nor model=/dataset=, it runs the built-in demo (SAPO on the arithmetic task "
                           "from the shipped model), with any key=value on top.")
    train.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
    train.add_argument("--help-config", action="store_true", help="list every config field with its default and meaning")
    train.add_argument("--markdown", action="store_true", help="with --help-config: print a markdown table")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="Pass@1, Pass@k and greedy accuracy of a model on a built-in task")
    ev.add_argument("model", help="model directory")
    ev.add_argument("--task", default="arithmetic")
    ev.add_argument("--samples", type=int, default=8, help="samples per problem (k of Pass@k)")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--problems", type=int, default=None, help="only the first N held-out problems")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--task-kwargs", nargs="*", metavar="key=value", help="task options, e.g. digits=3")
    ev.add_argument("--out", help="write the results as JSON here")
    ev.set_defaults(func=_cmd_eval)

    tasks = sub.add_parser("tasks", help="list the built-in tasks with an example each")
    tasks.set_defaults(func=_cmd_tasks)

    ws = sub.add_parser("warmstart", help="regenerate the shipped model: supervised warm start on a task")
    ws.add_argument("--task", default="arithmetic")
    ws.add_argument("--out", required=True)
    ws.add_argument("--steps", type=int, default=1300)
    ws.add_argument("--seed", type=int, default=0)
    ws.add_argument("--task-kwargs", nargs="*", metavar="key=value")
    ws.set_defaults(func=_cmd_warmstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
