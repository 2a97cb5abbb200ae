"""`sapo compare` and `sapo sweep`: the same training for several arms (loss types, named sets of
config overrides, or any grid of config values) and seeds, each run in its own directory, then
one report (report.py).

Run again, the command skips a finished run (its summary.json is for max_steps), continues a
run to a larger max_steps (constant learning rate), resumes an unfinished one from its latest
checkpoint, and refuses, before any run starts, a directory that holds a run with other
settings or the logs of a run that stopped before its first checkpoint.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig, read_yaml_mapping
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


def arm_runs(arms: dict[str, dict[str, Any]], seeds: list[int]) -> list[Run]:
    """Each named arm (parse_arms) for each seed."""
    return [Run(name, s, dict(overrides)) for name, overrides in arms.items() for s in seeds]


ARM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
ARM_SPEC = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*:")  # what `--arms` takes and a key=value override is not
OVERRIDE_KEY = re.compile(r"\s*[A-Za-z_]\w*\s*=")
RUN_OWN = {"seed": "give the seeds with --seeds", "output_dir": "the runs go to <--out>/<arm>/seed<k>",
           "resume_from_checkpoint": "a rerun continues each run from its latest checkpoint"}


def parse_arms(specs: list[str]) -> dict[str, dict[str, Any]]:
    """`--arms` values -> {name: overrides}: "NAME:key=value[,key=value...]" (values are YAML, as
    in `key=value` overrides) or "NAME:path.yaml" (a file of `field: value`); "NAME:" is the base
    setting unchanged. ["sapo:loss_type=sapo", "grpo_r2:examples/grpo_r2.yaml"] ->
    {"sapo": {"loss_type": "sapo"}, "grpo_r2": {"loss_type": "grpo", ...}}. Every problem is a
    one-line ConfigError naming the arm."""
    import yaml

    arms: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, sep, body = spec.partition(":")
        if not sep or not ARM_NAME.fullmatch(name):
            raise ConfigError(f"--arms {spec!r} is not NAME:key=value[,key=value...] or NAME:file.yaml (NAME: letters, "
                              "digits, _ . + -), e.g. sapo:loss_type=sapo or grpo_r2:examples/grpo_r2.yaml")
        if name in arms:
            raise ConfigError(f"--arms {name}: the name is given twice; name each arm once")
        if OVERRIDE_KEY.match(body):
            overrides: dict[str, Any] = {}
            # Split at the commas that start the next key=, so that a value may hold commas ([a, b]).
            for item in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", body):
                key, _, raw = (x.strip() for x in item.partition("="))
                if key in overrides:
                    raise ConfigError(f"--arms {name}: {key} is given twice; keep one")
                try:
                    overrides[key] = yaml.safe_load(raw) if raw else None
                except yaml.YAMLError:
                    raise ConfigError(f"--arms {name}: {key}={raw}: the value is not valid YAML; quote it or fix "
                                      "the brackets") from None
        elif body.strip():
            try:
                overrides = read_yaml_mapping(body.strip())
            except ConfigError as err:
                raise ConfigError(f"--arms {name}: {err} (give NAME:key=value[,...] or NAME:file.yaml)") from None
        else:
            overrides = {}
        own = [k for k in overrides if k in RUN_OWN]
        if own:
            raise ConfigError(f"--arms {name}: {own[0]} is set by the command for each run ({RUN_OWN[own[0]]}); "
                              f"remove it from the arm")
        try:
            TrainConfig.from_dict(overrides)  # the field names and types, as for a config file
        except ConfigError as err:
            raise ConfigError(f"--arms {name}: {err}") from None
        arms[name] = overrides
    if not arms:
        raise ConfigError("--arms is empty: give NAME:key=value[,...] or NAME:file.yaml for each arm")
    return arms


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


def _valid(values: dict[str, Any]) -> bool:
    try:
        TrainConfig.from_dict(values).validate()
    except ConfigError:
        return False
    return True


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
        own = {"seed": run.seed, "output_dir": str(directory), "resume_from_checkpoint": "latest"}
        try:
            config = TrainConfig.from_dict({**base, **run.overrides, **own}).validate()
        except ConfigError as err:
            if not run.overrides or not _valid({**base, **own}):
                raise  # the base setting's own problem
            raise ConfigError(f"arm {run.arm!r}: {err}") from None
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
