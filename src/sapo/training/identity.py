"""Run identity: which settings make two configs different training runs, and the start-up
check that refuses to mix two runs in one output directory (a fresh run over another's
checkpoints or logs, a resume with other settings, a rewind over later checkpoints)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data import FILE_FORMATS
from ..errors import ConfigError
from .checkpoint import MANIFEST, checkpoint_step, list_checkpoints
from .sharded_checkpoint import is_sharded_checkpoint

# Settings a built-in objective ignores.
UNUSED_BY = {"sapo": frozenset({"epsilon", "epsilon_high"}), "grpo": frozenset({"tau_pos", "tau_neg"}),
             "gspo": frozenset({"tau_pos", "tau_neg"})}
# Fields a continued run may change without becoming a different run (see run_differences).
CONTINUABLE = frozenset({
    "max_steps", "eval_dataset", "eval_steps", "eval_num_generations", "eval_greedy", "save_steps", "save_total_limit",
    "resume_from_checkpoint", "output_dir", "report_to", "log_completions", "micro_batch_size", "logprob_chunk_size",
    "padding_free", "max_num_seqs", "skip_reward_errors", "allow_unsandboxed_code", "max_nonfinite_steps",
    "gradient_checkpointing", "max_tokens_per_micro_batch", "cpu_offload", "vllm_server_base_url",
    "vllm_server_timeout", "vllm_gpu_memory_utilization", "vllm_enable_sleep_mode", "vllm_tensor_parallel_size",
})
# What a run appends to in its output_dir (training/tracking.py): a fresh run never takes over another's.
RUN_LOGS = ("metrics.jsonl", "completions.jsonl", "logratios.jsonl")


def run_differences(config: TrainConfig, other: TrainConfig, *, may_change: frozenset[str] | None = None,
                    other_cwd: str | None = None) -> list[str]:
    """The settings that make `other` (a run started in `other_cwd`, default the current
    directory) a different training run from `config`, as "field: other's value -> this value".
    A setting differs only if both its spelling and its effect differ: local files are the same
    if named alike (a moved project) or if they resolve to the same path (named from another
    directory); the objective's unused knobs and default reward weights do not count.
    `may_change` (default CONTINUABLE) are the fields a continued run may change; `max_steps`
    only where the learning rate schedule does not depend on it."""
    may_change = CONTINUABLE if may_change is None else may_change
    if config.lr_scheduler != "constant":
        may_change = may_change - {"max_steps"}
    if config.loss_type == other.loss_type:  # the knobs of other objectives do not matter
        may_change = may_change | UNUSED_BY.get(config.loss_type, frozenset())
    given, their_given = config.to_dict(), other.to_dict()
    mine, theirs = _effective(given, os.getcwd()), _effective(their_given, other_cwd or os.getcwd())
    return [f"{k}: {their_given[k]!r} -> {given[k]!r}" for k in mine
            if k not in may_change and mine[k] != theirs[k] and given[k] != their_given[k]]


def describe_differences(differences: list[str]) -> str:
    """The first few differences, for an error message."""
    return "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")


def _effective(given: dict[str, Any], cwd: str) -> dict[str, Any]:
    """Values by their effect: local files as absolute paths seen from `cwd`, the default reward
    weights written out."""
    def local(path: str) -> str:
        return str((Path(cwd) / path).resolve())  # an absolute path stays itself

    def reward(spec: str) -> str:
        module, sep, name = spec.rpartition(":")
        return f"{local(module)}:{name}" if sep and module.endswith(".py") else spec

    values = dict(given)
    values["model"] = local(values["model"]) if values["model"] else values["model"]
    for key in ("dataset", "eval_dataset"):  # a built-in task's name is not a path
        if values[key] and Path(values[key]).suffix in FILE_FORMATS:
            values[key] = local(values[key])
    values["reward_funcs"] = [reward(r) for r in values["reward_funcs"]]
    if values["reward_weights"] is None:
        values["reward_weights"] = [1.0] * len(values["reward_funcs"])
    return values


def check_start(config: TrainConfig, resume_path: Path | None, skipped: list[Path] = ()) -> None:
    """Refuse a start that would mix two runs: a fresh run (or a resume from elsewhere) into an
    output_dir that holds another run's checkpoints (a later "latest", or the rotation of
    checkpoints, would pick those up) or logs (they are never deleted), a resume with settings
    that make it a different run, or one from beyond max_steps. `skipped`: corrupt later
    checkpoints that latest_valid passed over (no resume can pick them, and saving their steps
    again replaces them)."""
    found = list_checkpoints(config.output_dir)
    ours = resume_path is not None and resume_path.resolve().parent == Path(config.output_dir).resolve()
    if found and not ours:
        raise ConfigError(f"output_dir={config.output_dir!r} already holds checkpoints of an earlier run "
                          f"({', '.join(p.name for p in found[-3:])}); continue it with "
                          "resume_from_checkpoint=latest, or start over in another output_dir (or delete them)")
    logs = [name for name in RUN_LOGS if (Path(config.output_dir) / name).is_file()]
    if logs and not ours:
        raise ConfigError(f"output_dir={config.output_dir!r} holds {', '.join(logs)} of an earlier run that left no "
                          "checkpoint to resume from; sapo-rl does not delete them: move them away, or use another "
                          "output_dir")
    if resume_path is None:
        return
    sharded = is_sharded_checkpoint(resume_path)
    if sharded and not config.fsdp:
        raise ConfigError(f"resume_from_checkpoint: {resume_path} holds sharded (fsdp=true) state; resume it with "
                          f"fsdp=true, or `sapo export {resume_path} --out DIR` and start a new run with model=DIR")
    if config.fsdp and not sharded:
        raise ConfigError(f"resume_from_checkpoint: {resume_path} was saved without fsdp; resume it with fsdp=false, "
                          f"or start a new sharded run from its weights with model={str(resume_path)!r}")
    saved = TrainConfig.load_saved(resume_path / "config.yaml")
    started_in = json.loads((resume_path / "trainer_state.json").read_text()).get("working_directory")
    differences = run_differences(config, saved, other_cwd=started_in) if saved is not None else []
    if differences:
        raise ConfigError(f"resume_from_checkpoint: {resume_path} belongs to a run with other settings "
                          f"({describe_differences(differences)}); resume with its settings, or start a new run "
                          f"from its weights with model={str(resume_path)!r}")
    step = checkpoint_step(resume_path)
    later = [p.name for p in found if checkpoint_step(p) > step and p not in skipped]
    if later:  # a crash before the rewound run overwrites them would make "latest" resume the abandoned steps
        raise ConfigError(f"resume_from_checkpoint: {resume_path.name} is at step {step}, but output_dir also "
                          f"holds later checkpoints of the run it would rewind ({', '.join(later[:3])}"
                          f"{', ...' if len(later) > 3 else ''}); delete them to continue from step {step}, "
                          "or resume from the latest")
    if step > config.max_steps:
        raise ConfigError(f"resume_from_checkpoint: {resume_path.name} is at step {step}, beyond max_steps="
                          f"{config.max_steps}; raise max_steps, or use an earlier checkpoint")


def output_dir_state(output_dir: str | Path) -> tuple:
    """What check_start read of output_dir: its checkpoints (each with its manifest's time of
    change) and run logs. A run compares it again once it holds the lock."""
    root = Path(output_dir)
    checkpoints = []
    for path in list_checkpoints(root):
        manifest = path / MANIFEST
        checkpoints.append((path.name, manifest.stat().st_mtime_ns if manifest.is_file() else None))
    return tuple(checkpoints), tuple(name for name in RUN_LOGS if (root / name).is_file())
