"""The end of a run: summary.json, a plot of reward and held-out Pass@1 against step, and a
short table on the terminal. Everything is read back from metrics.jsonl, so a resumed run
summarises the whole run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..model.loading import DCP_METADATA


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def summarize(output_dir: str | Path, *, wall_seconds: float, checkpoint: str | None) -> dict[str, Any]:
    """Write summary.json and training.png in output_dir; return the summary."""
    output_dir = Path(output_dir)
    rows = read_metrics(output_dir / "metrics.jsonl")
    evals = [r for r in rows if "eval/pass@1" in r]
    summary: dict[str, Any] = {"steps": max((r["step"] for r in rows), default=0),
                               "wall_seconds": round(wall_seconds, 1)}
    if evals:
        before, after = evals[0], evals[-1]
        k_key = next((k for k in after if k.startswith("eval/pass@") and k != "eval/pass@1"), None)
        for name, key in (("pass@1", "eval/pass@1"), ("pass@k", k_key), ("greedy_accuracy", "eval/greedy_accuracy")):
            if key and key in after:
                summary[f"{name}_before"] = before.get(key) if before["step"] == 0 else None
                summary[f"{name}_after"] = after[key]
        summary["k"] = int(k_key.split("@")[1]) if k_key else None
        summary["eval_step_before"], summary["eval_step_after"] = before["step"], after["step"]
    summary["final_train_reward"] = next((r["reward"] for r in reversed(rows) if r.get("reward") is not None), None)
    summary["checkpoint"] = checkpoint
    summary["plot"] = str(plot_training(rows, output_dir / "training.png"))
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def plot_training(rows: list[dict[str, Any]], out_png: str | Path) -> Path:
    """Training reward and held-out Pass@1 (and greedy accuracy) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    train = [r for r in rows if r.get("reward") is not None]
    left.plot([r["step"] for r in train], [r["reward"] for r in train], lw=1)
    left.set(title="training reward (mean over the rollout batch)", xlabel="step", ylabel="reward")
    evals = [r for r in rows if "eval/pass@1" in r]
    right.plot([r["step"] for r in evals], [r["eval/pass@1"] for r in evals], marker="o", label="Pass@1")
    if evals and "eval/greedy_accuracy" in evals[0]:
        right.plot([r["step"] for r in evals], [r["eval/greedy_accuracy"] for r in evals], marker="s",
                   label="greedy accuracy")
    right.set(title="held-out evaluation", xlabel="step", ylabel="accuracy", ylim=(0, 1))
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    table = Table(title="sapo-rl run summary")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    k = summary.get("k")
    for name, label in (("pass@1", "held-out Pass@1"), ("pass@k", f"held-out Pass@{k}"),
                        ("greedy_accuracy", "held-out greedy accuracy")):
        if f"{name}_after" in summary:
            before = summary.get(f"{name}_before")
            table.add_row(label, "-" if before is None else f"{before:.3f}", f"{summary[f'{name}_after']:.3f}")
    table.add_row("steps", "", str(summary["steps"]))
    table.add_row("wall seconds", "", f"{summary['wall_seconds']:.0f}")
    (console or Console()).print(table)
    if summary.get("checkpoint"):
        checkpoint = summary["checkpoint"]
        where = (f"sharded model saved in {checkpoint} (`sapo export {checkpoint} --out DIR` writes a model directory)"
                 if (Path(checkpoint) / DCP_METADATA).is_file() else f"model saved in {checkpoint}")
        (console or Console()).print(f"{where}; summary.json and training.png beside it")
