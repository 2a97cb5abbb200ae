"""The report of a comparison or sweep: report.md, report.json and figures, rebuilt from the
runs' own files (config.yaml, metrics.jsonl, summary.json, logratios.jsonl)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..training.diagnostics import LOG10_VAR_BINS, LOG10_VAR_RANGE, LOG_RATIO_BINS, LOG_RATIO_RANGE, VAR_THRESHOLD
from ..training.identity import CONTINUABLE
from ..training.summary import read_metrics
from .runs import EVALUATION

CURVES = [  # (metric, panel title)
    ("reward", "training reward"),
    ("eval/pass@1", "held-out Pass@1"),
    ("entropy", "entropy (nats / token)"),
    ("completions/mean_length", "response length (tokens)"),
    ("gated_frac", "tokens gated (SAPO w < 0.5; GRPO/GSPO clipped)"),
    ("grad_norm", "gradient norm"),
    ("offpolicy/log_ratio_std", "std of off-policy log-ratios"),
    ("sapo/gate_weight_mean", "SAPO mean gate weight"),
]
VOLATILE = ("output_dir", "seed", "resume_from_checkpoint")


def _grouping_key(run: RunData) -> str:
    """What makes two runs the same experiment: the arm's name and every field but the seed and
    those a continued run may change (checkpointing, logging, memory knobs; evaluation and length
    do count). A sweep over one of those knobs still has one arm per value, by name."""
    ignored = set(VOLATILE) | (CONTINUABLE - EVALUATION - {"max_steps"})
    return yaml.safe_dump({"arm": run.arm, **{k: v for k, v in run.config.items() if k not in ignored}},
                          sort_keys=True)


@dataclass
class RunData:
    directory: Path
    arm: str
    seed: int
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    log_ratio_hist: list[int] = field(default_factory=list)
    seq_var_hist: list[int] = field(default_factory=list)

    def series(self, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in self.rows if isinstance(r.get(key), (int, float))}


class SkippedRun(Exception):
    """A directory that does not hold a finished run; the message says why."""


def load_run(directory: str | Path) -> RunData:
    """A finished run: summary.json for its config's max_steps, config.yaml and metrics.jsonl.
    Raises SkippedRun naming what is missing or unfinished."""
    d = Path(directory)
    try:
        summary = json.loads((d / "summary.json").read_text())
        config = yaml.safe_load((d / "config.yaml").read_text())
        rows = read_metrics(d / "metrics.jsonl")
    except FileNotFoundError as err:
        raise SkippedRun(f"{d}: no {Path(err.filename).name}") from None
    except (ValueError, yaml.YAMLError) as err:  # json.JSONDecodeError is a ValueError
        raise SkippedRun(f"{d}: unreadable summary.json or config.yaml ({err})") from None
    if not isinstance(summary, dict) or not isinstance(config, dict) or "max_steps" not in config:
        raise SkippedRun(f"{d}: summary.json or config.yaml is not a run's")
    if summary.get("steps") != config["max_steps"]:
        raise SkippedRun(f"{d}: unfinished (summary.json is for {summary.get('steps')} steps, max_steps is "
                         f"{config['max_steps']})")
    arm_file = d / "arm.json"
    arm = (json.loads(arm_file.read_text()) if arm_file.is_file()
           else {"arm": config["loss_type"], "seed": config["seed"]})
    run = RunData(d, arm["arm"], int(arm["seed"]), config, rows, summary)
    if (d / "logratios.jsonl").is_file():
        lines = read_metrics(d / "logratios.jsonl")
        run.log_ratio_hist = [sum(x) for x in zip(*(line["log_ratio_hist"] for line in lines))] if lines else []
        run.seq_var_hist = [sum(x) for x in zip(*(line["seq_var_hist"] for line in lines))] if lines else []
    return run


def group_arms(runs: list[RunData]) -> dict[str, list[RunData]]:
    """Runs with the same configuration but for the seed form an arm. Its name is the one given by
    compare/sweep (arm.json) or the loss type; runs whose configs differ never share an arm."""
    groups: dict[str, list[RunData]] = {}
    labels: dict[str, str] = {}
    for run in runs:
        key = _grouping_key(run)
        if key not in labels:
            taken = sum(1 for label in labels.values() if label.split(" #")[0] == run.arm)
            labels[key] = run.arm if taken == 0 else f"{run.arm} #{taken + 1}"
        groups.setdefault(labels[key], []).append(run)
    return groups


def collapsed(run: RunData) -> bool:
    """A run collapsed if a loss or gradient norm was non-finite (logged as null), or if its final
    held-out Pass@1 fell below half of its best, the starting evaluation included."""
    if any(r.get(k, 0.0) is None for r in run.rows for k in ("loss", "grad_norm")):
        return True
    evals = [v for _, v in sorted(run.series("eval/pass@1").items())]
    return bool(evals) and evals[-1] < 0.5 * max(evals)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def arm_table(runs: list[RunData], threshold: float) -> dict[str, Any]:
    finals, bests, reached, walls = [], [], [], []
    for run in runs:
        evals = run.series("eval/pass@1")
        if evals:
            finals.append(evals[max(evals)])
            bests.append(max(v for s, v in evals.items() if s > 0) if any(s > 0 for s in evals) else evals[max(evals)])
            hit = [s for s, v in sorted(evals.items()) if v >= threshold]
            if hit:
                reached.append(hit[0])
        if isinstance(run.summary.get("wall_seconds"), (int, float)):
            walls.append(run.summary["wall_seconds"])
    final_mean, final_std = _mean_std(finals)
    best_mean, best_std = _mean_std(bests)
    return {
        "seeds": [r.seed for r in runs], "final_pass@1_mean": final_mean, "final_pass@1_std": final_std,
        "best_pass@1_mean": best_mean, "best_pass@1_std": best_std, "threshold": threshold,
        "runs_reaching_threshold": len(reached), "steps_to_threshold_mean": _mean_std(reached)[0],
        "collapsed_runs": sum(collapsed(r) for r in runs), "wall_seconds_mean": _mean_std(walls)[0],
        "start_pass@1_mean": _mean_std([r.series("eval/pass@1").get(0) for r in runs
                                         if r.series("eval/pass@1").get(0) is not None])[0],
    }


def build_report(run_dirs: list[str | Path], out_dir: str | Path, *, threshold: float = 0.4,
                 title: str = "sapo-rl comparison", command: str | None = None, log=print) -> Path:
    """report.md, report.json and figures in out_dir from the finished runs among run_dirs; `log`
    is told of every directory left out and why."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for directory in dict.fromkeys(Path(d).resolve() for d in run_dirs):  # each run once
        try:
            runs.append(load_run(directory))
        except SkippedRun as why:
            log(f"left out {why}")
    if not runs:
        raise ValueError("no finished run (summary.json for its max_steps, config.yaml, metrics.jsonl) among the "
                         "given directories")
    arms = group_arms(runs)
    for arm, members in arms.items():
        # Two directories with one configuration and seed are one experiment run twice: count it once.
        kept: dict[int, RunData] = {}
        for run in members:
            if run.seed in kept:
                log(f"left out {run.directory}: arm {arm!r} seed {run.seed} is already {kept[run.seed].directory}")
            else:
                kept[run.seed] = run
        arms[arm] = list(kept.values())
    table = {arm: arm_table(rs, threshold) for arm, rs in arms.items()}
    (out_dir / "report.json").write_text(json.dumps(table, indent=2, allow_nan=False) + "\n")
    curves = plot_curves(arms, out_dir / "curves.png")
    ratios = plot_log_ratios(arms, out_dir / "logratios.png")
    (out_dir / "report.md").write_text(_markdown(title, command, arms, table, curves, ratios, threshold))
    return out_dir / "report.md"


def _fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _fmt_seeds(mean: float | None, std: float | None, seeds: int) -> str:
    return _fmt(mean, std if seeds > 1 else None)


def _markdown(title, command, arms, table, curves, ratios, threshold) -> str:
    lines = [f"# {title}", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [f"{sum(len(v) for v in arms.values())} runs, {len(arms)} arms. Held-out Pass@1 is the mean correctness "
              "of `eval_num_generations` samples per held-out problem, evaluated every `eval_steps`.", "",
              f"| arm | seeds | Pass@1 at start | final Pass@1 | best Pass@1 | steps to Pass@1 >= {threshold:g} "
              "(runs reaching it) | collapsed runs | wall s / run |",
              "|---|---|---|---|---|---|---|---|"]
    for arm, row in table.items():
        steps = "-" if row["steps_to_threshold_mean"] is None else f"{row['steps_to_threshold_mean']:.0f}"
        lines.append(f"| {arm} | {len(row['seeds'])} | {_fmt(row['start_pass@1_mean'])} | "
                     f"{_fmt_seeds(row['final_pass@1_mean'], row['final_pass@1_std'], len(row['seeds']))} | "
                     f"{_fmt_seeds(row['best_pass@1_mean'], row['best_pass@1_std'], len(row['seeds']))} | {steps} "
                     f"({row['runs_reaching_threshold']}/{len(row['seeds'])}) | {row['collapsed_runs']} | "
                     f"{'-' if row['wall_seconds_mean'] is None else format(row['wall_seconds_mean'], '.0f')} |")
    lines += ["", "Mean ± sample standard deviation (n - 1) over seeds. Best Pass@1 is the best evaluation after "
              "the start. A run *collapsed* if a loss or gradient norm was non-finite, or its final held-out Pass@1 "
              "fell below half of its best (the starting evaluation included).", "",
              f"![curves]({curves.name})", "",
              "Curves: mean over seeds, band from the lowest to the highest seed.", "",
              f"![off-policy log-ratios]({ratios.name})", "",
              "Token log-ratios l = log pi_theta - log pi_old on the minibatches after the first of each rollout "
              "batch (where the gate acts), summed over the run and its seeds, and the variance of l within each "
              f"sequence (the paper reports it mostly below {VAR_THRESHOLD}).", "", "## Configurations", ""]
    for arm, rs in arms.items():
        config = {k: v for k, v in rs[0].config.items() if k not in VOLATILE}
        lines += [f"### {arm}", "", f"seeds {sorted(r.seed for r in rs)}; runs in "
                  f"{', '.join(f'`{r.directory}`' for r in rs)}", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _band(ax, runs: list[RunData], key: str, label: str, color) -> bool:
    series = [r.series(key) for r in runs]
    steps = sorted(set().union(*series))
    points = [(s, [x[s] for x in series if s in x]) for s in steps]
    points = [(s, v) for s, v in points if v]
    if not points:
        return False
    xs = [s for s, _ in points]
    ax.plot(xs, [statistics.fmean(v) for _, v in points], color=color, lw=1.3, label=label)
    ax.fill_between(xs, [min(v) for _, v in points], [max(v) for _, v in points], color=color, alpha=0.2, lw=0)
    return True


def plot_curves(arms: dict[str, list[RunData]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, panel) in zip(axes.flat, CURVES):
        drawn = [_band(ax, rs, key, arm, colors[i % len(colors)]) for i, (arm, rs) in enumerate(arms.items())]
        ax.set(title=panel, xlabel="step")
        ax.grid(alpha=0.3)
        if any(drawn):
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_log_ratios(arms: dict[str, list[RunData]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    l_edges = np.linspace(-LOG_RATIO_RANGE, LOG_RATIO_RANGE, LOG_RATIO_BINS + 1)
    v_edges = np.linspace(*LOG10_VAR_RANGE, LOG10_VAR_BINS + 1)
    for i, (arm, rs) in enumerate(arms.items()):
        color = colors[i % len(colors)]
        for hist_name, ax, edges in (("log_ratio_hist", left, l_edges), ("seq_var_hist", right, v_edges)):
            hists = [getattr(r, hist_name) for r in rs if getattr(r, hist_name)]
            if not hists:
                continue
            total = np.sum(hists, axis=0).astype(float)
            ax.stairs(total / max(total.sum(), 1), edges, color=color, label=arm)
    left.set(title="off-policy token log-ratio l (outliers in the end bins)", xlabel="l = log r",
             ylabel="fraction of tokens", yscale="log")
    right.axvline(np.log10(VAR_THRESHOLD), color="gray", ls="--", lw=1, label=f"var = {VAR_THRESHOLD}")
    right.set(title="within-sequence variance of l", xlabel="log10 var(l)", ylabel="fraction of sequences")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        if not ax.patches:  # no histogram: runs without an off-policy minibatch
            ax.text(0.5, 0.5, "no off-policy minibatch\n(num_minibatches = num_iterations = 1)", ha="center",
                    va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
