"""`sapo compare` and `sapo sweep`: the same training for several arms (loss types, or any grid
of config values) and seeds, each run in its own directory, then one report (report.py).

Run again, the command skips a finished run (its summary.json is for max_steps), continues a
run to a larger max_steps (constant learning rate), resumes an unfinished one from its latest
checkpoint, and refuses, before any run starts, a directory that holds a run with other
settings or the logs of a run that stopped before its first checkpoint.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import ConfigError
from ..training.checkpoint import checkpoint_step, list_checkpoints
from ..training.identity import CONTINUABLE, RUN_LOGS, describe_differences, run_differences


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
        if key in ("seed", "output_dir", "resume_from_checkpoint"):
            raise ConfigError(f"--grid {key}: the command sets {key} for each run itself"
                              f"{' (give the seeds with --seeds)' if key == 'seed' else ''}")
        parsed = [_scalar(yaml.safe_load(v)) for v in values.split(",")]
        repeated = [v for i, v in enumerate(parsed) if v in parsed[:i]]  # 1 and 1.0 are one value
        if repeated:
            raise ConfigError(f"--grid {item!r} lists {repeated[0]!r} twice; each value is one arm")
        grid[key] = parsed
    return grid


def _scalar(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    return value


EVALUATION = frozenset({"eval_dataset", "eval_steps", "eval_num_generations", "eval_greedy"})


def run_all(base: dict[str, Any], runs: list[Run], out_dir: str | Path, *, log=print) -> list[Path]:
    """Train every run not finished yet; return all run directories."""
    root = Path(out_dir)
    # Check every arm's config, and what its directory already holds, before the first (long) run.
    configs, owners = [], {}
    for run in runs:
        directory = run.directory(root)
        if directory in owners:
            raise ConfigError(f"arms {owners[directory].arm!r} and {run.arm!r} (seed {run.seed}) would share the "
                              f"directory {directory}; name the arms apart")
        owners[directory] = run
        values = {**base, **run.overrides, "seed": run.seed, "output_dir": str(directory),
                  "resume_from_checkpoint": "latest"}
        config = TrainConfig.from_dict(values).validate()
        checkpoints = list_checkpoints(directory)
        started = checkpoints or (directory / "summary.json").is_file()
        logs = [name for name in RUN_LOGS if (directory / name).is_file()]
        if logs and not started:  # the trainer would refuse it, after the arms before it have run
            raise ConfigError(f"{directory} holds {', '.join(logs)} of a run that stopped before its first checkpoint; "
                              "move them away (or delete the directory) to run it again; with save_steps > 0 an "
                              "interrupted run resumes")
        saved = TrainConfig.load_saved(directory / "config.yaml") if started else None
        # The report shows each run's evaluations: those settings must match too.
        differences = run_differences(config, saved, may_change=CONTINUABLE - EVALUATION) if saved else []
        if differences:
            raise ConfigError(f"{directory} holds a run with other settings ({describe_differences(differences)}); "
                              "use another --out, or delete it")
        if checkpoints and checkpoint_step(checkpoints[-1]) > config.max_steps:
            raise ConfigError(f"{directory} holds a run of more than max_steps={config.max_steps} steps "
                              f"({checkpoints[-1].name}); use another --out, or delete it")
        configs.append((run, config))
    from ..training.trainer import Trainer

    for i, (run, config) in enumerate(configs):
        directory = run.directory(root)
        summary = directory / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("steps") == config.max_steps:
            log(f"[{i + 1}/{len(runs)}] {run.arm} seed {run.seed}: finished, skipped")
            continue
        log(f"[{i + 1}/{len(runs)}] {run.arm} seed {run.seed} -> {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "arm.json").write_text(json.dumps({"arm": run.arm, "seed": run.seed, "overrides": run.overrides}))
        Trainer(config).train()
    return [run.directory(root) for run in runs]
