"""`sapo compare` and `sapo sweep`: the same training for several arms (loss types, or any grid
of config values) and seeds, each run in its own directory, then one report (report.py).

A finished run (one with summary.json) is skipped when the command is run again; an unfinished
one resumes from its latest checkpoint.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Run:
    arm: str  # e.g. "sapo" or "tau_neg=1.05"
    seed: int
    overrides: dict[str, Any]

    def directory(self, root: Path) -> Path:
        return root / self.arm.replace("/", "_") / f"seed{self.seed}"


def compare_runs(loss_types: list[str], seeds: list[int]) -> list[Run]:
    return [Run(lt, s, {"loss_type": lt}) for lt in loss_types for s in seeds]


def sweep_runs(grid: dict[str, list[Any]], seeds: list[int]) -> list[Run]:
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        overrides = dict(zip(keys, values))
        arm = ",".join(f"{k}={v}" for k, v in overrides.items())
        runs.extend(Run(arm, s, overrides) for s in seeds)
    return runs


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """["tau_neg=0.95,1.0,1.05", "learning_rate=1e-4,3e-4"] -> {"tau_neg": [0.95, 1.0, 1.05], ...}."""
    import yaml

    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid {item!r} is not key=v1,v2,... (e.g. tau_neg=0.95,1.0,1.05)")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; list all its values in one --grid {key}=v1,v2,...")
        grid[key] = [_scalar(yaml.safe_load(v)) for v in values.split(",")]
    return grid


def _scalar(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    return value


def run_all(base: dict[str, Any], runs: list[Run], out_dir: str | Path, *, log=print) -> list[Path]:
    """Train every run not finished yet; return all run directories."""
    root = Path(out_dir)
    # Check every arm's config before the first (long) run starts.
    configs = []
    for run in runs:
        values = {**base, **run.overrides, "seed": run.seed, "output_dir": str(run.directory(root)),
                  "resume_from_checkpoint": "latest"}
        config = TrainConfig.from_dict(values).validate()
        saved = TrainConfig.load_saved(run.directory(root) / "config.yaml")
        if saved is not None and config.run_differences(saved):
            raise ConfigError(f"{run.directory(root)} holds a run with other settings "
                              f"({'; '.join(config.run_differences(saved)[:4])}); use another --out, or delete it")
        configs.append((run, config, saved))
    from .trainer import Trainer

    for i, (run, config, saved) in enumerate(configs):
        directory = run.directory(root)
        if (directory / "summary.json").is_file() and saved is not None and saved.max_steps == config.max_steps:
            log(f"[{i + 1}/{len(runs)}] {run.arm} seed {run.seed}: finished, skipped")
            continue
        log(f"[{i + 1}/{len(runs)}] {run.arm} seed {run.seed} -> {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "arm.json").write_text(json.dumps({"arm": run.arm, "seed": run.seed, "overrides": run.overrides}))
        Trainer(config).train()
    return [run.directory(root) for run in runs]
