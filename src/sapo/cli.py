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
        config = TrainConfig.from_sources(path, items)
        from .trainer import Trainer

        Trainer(config).train()
    except (ConfigError, RewardError) as err:
        print(f"sapo train: error: {err}", file=sys.stderr)
        return 2
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
                           "overridden by key=value pairs. --help-config lists every field.")
    train.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value")
    train.add_argument("--help-config", action="store_true", help="list every config field with its default and meaning")
    train.add_argument("--markdown", action="store_true", help="with --help-config: print a markdown table")
    train.set_defaults(func=_cmd_train)
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
