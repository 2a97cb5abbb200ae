"""Checkpoints that resume exactly, written atomically: a crash mid-save leaves the previous
checkpoint intact (everything goes to a temporary directory that is renamed at the end)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, TrainConfig, describe_differences

_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(spec: str | None, output_dir: str | Path) -> Path | None:
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume_from_checkpoint={spec!r} is not a checkpoint directory (no trainer_state.json); "
                          "use 'latest' or a checkpoint-<step> directory")
    return path


def check_start(config: TrainConfig, resume_path: Path | None) -> None:
    """Refuse a start that would mix two runs: a fresh run (or a resume from elsewhere) into an
    output_dir that holds another run's checkpoints (a later "latest", or the rotation of
    checkpoints, would pick those up), a resume with settings that make it a different run, or
    one from beyond max_steps."""
    found = list_checkpoints(config.output_dir)
    ours = resume_path is not None and resume_path.resolve().parent == Path(config.output_dir).resolve()
    if found and not ours:
        raise ConfigError(f"output_dir={config.output_dir!r} already holds checkpoints of an earlier run "
                          f"({', '.join(p.name for p in found[-3:])}); continue it with "
                          "resume_from_checkpoint=latest, or start over in another output_dir (or delete them)")
    if resume_path is None:
        return
    saved = TrainConfig.load_saved(resume_path / "config.yaml")
    started_in = json.loads((resume_path / "trainer_state.json").read_text()).get("working_directory")
    differences = config.run_differences(saved, other_cwd=started_in) if saved is not None else []
    if differences:
        raise ConfigError(f"resume_from_checkpoint: {resume_path} belongs to a run with other settings "
                          f"({describe_differences(differences)}); resume with its settings, or start a new run "
                          f"from its weights with model={str(resume_path)!r}")
    step = checkpoint_step(resume_path)
    later = [p.name for p in found if checkpoint_step(p) > step]
    if later:  # a crash before the rewound run overwrites them would make "latest" resume the abandoned steps
        raise ConfigError(f"resume_from_checkpoint: {resume_path.name} is at step {step}, but output_dir also "
                          f"holds later checkpoints of the run it would rewind ({', '.join(later[:3])}"
                          f"{', ...' if len(later) > 3 else ''}); delete them to continue from step {step}, "
                          "or resume from the latest")
    if step > config.max_steps:
        raise ConfigError(f"resume_from_checkpoint: {resume_path.name} is at step {step}, beyond max_steps="
                          f"{config.max_steps}; raise max_steps, or use an earlier checkpoint")


def checkpoint_step(path: Path) -> int:
    return json.loads((path / "trainer_state.json").read_text())["step"]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, output_dir: str | Path, step: int, *, model, tokenizer, optimizer, scheduler,
                    config_yaml: str, trainer_state: dict[str, Any], save_total_limit: int | None) -> Path:
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a rerun of the same step: replace it only once the new one is complete
            old = root / f".old-checkpoint-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        if save_total_limit:
            # Oldest steps first (a resume never leaves later steps behind); the one just written stays.
            others = [p for p in list_checkpoints(root) if p != final]
            for stale in others[:max(len(others) - (save_total_limit - 1), 0)]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(path: Path, accelerator, optimizer, scheduler) -> dict[str, Any]:
    """Restore optimizer, scheduler and this process's RNG; return trainer_state.json."""
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=accelerator.device, weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())
