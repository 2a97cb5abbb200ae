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
