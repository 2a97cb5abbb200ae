"""The built-in demo: SAPO on the `arithmetic` task from the shipped tiny model. `sapo train`
without a config file starts from these settings (key=value overrides still apply)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from .config import TrainConfig


def shipped_model_path(name: str = "arithmetic-tiny") -> Path:
    """Directory of a model that ships inside the package (`sapo warmstart` regenerates it)."""
    return Path(str(files("sapo") / "assets" / name))


def demo_settings() -> dict[str, Any]:
    """Chosen so that on 2 CPU cores the run takes a few minutes and held-out Pass@1 (8 samples
    per problem, 200 problems) rises by more than 20 points; docs/demo.md has the numbers."""
    return dict(
        model=str(shipped_model_path()), dataset="arithmetic", eval_dataset="arithmetic", reward_funcs=["arithmetic"],
        num_generations=8, prompts_per_step=16, num_minibatches=4, micro_batch_size=64, max_prompt_length=16,
        max_completion_length=6, temperature=1.0, learning_rate=1e-4, max_grad_norm=1.0, loss_type="sapo",
        max_steps=500, eval_steps=50, eval_num_generations=8, save_steps=0, save_total_limit=1,
        output_dir="outputs/demo", seed=0,
    )


def demo_config(overrides: list[str] | None = None) -> TrainConfig:
    """The demo settings with `key=value` overrides on top."""
    return TrainConfig.from_sources(None, overrides, base=demo_settings())
