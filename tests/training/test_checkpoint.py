import pytest
import yaml

import sapo
from sapo.errors import CheckpointError
from sapo.training.checkpoint import list_checkpoints
from sapo.training.identity import run_differences


def test_a_crash_while_saving_leaves_the_last_checkpoint_intact(base_config, monkeypatch):
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 1}))
    trainer.train()
    out = trainer.logger.dir
    good = (out / "checkpoint-1" / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trainer.tokenizer, "save_pretrained", boom)
    with pytest.raises(CheckpointError, match="checkpoint-1: disk full; checkpoint-1 is intact"):
        trainer.save(1)  # overwrite attempt of the same step
    with pytest.raises(CheckpointError, match="checkpoint-2: disk full; checkpoint-1 is intact"):
        trainer.save(2)
    assert list_checkpoints(out) == [out / "checkpoint-1"]
    assert not [p.name for p in out.iterdir() if "tmp" in p.name]  # the temporary directory is removed
    assert (out / "checkpoint-1" / "model.safetensors").read_bytes() == good
    resumed = sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 2, "resume_from_checkpoint": "latest"}))
    assert resumed.start_step == 1


def test_save_total_limit_keeps_the_newest(base_config):
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 3, "save_steps": 1, "save_total_limit": 2}))
    trainer.train()
    assert [p.name for p in list_checkpoints(trainer.logger.dir)] == ["checkpoint-2", "checkpoint-3"]


def test_resume_from_a_path_that_is_not_a_checkpoint(base_config, tmp_path):
    with pytest.raises(sapo.ConfigError, match="is not a checkpoint directory"):
        sapo.Trainer(sapo.TrainConfig(**{**base_config, "resume_from_checkpoint": str(tmp_path)}))


def test_resume_survives_a_metrics_line_cut_short_by_a_crash(base_config):
    import json

    sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 1})).train()
    out = sapo.TrainConfig(**base_config).output_dir
    with open(f"{out}/metrics.jsonl", "a") as f:
        f.write('{"step": 2, "rew')
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 2, "resume_from_checkpoint": "latest"}))
    trainer.train()
    steps = [json.loads(line)["step"] for line in open(f"{out}/metrics.jsonl")]
    assert steps == [1, 2]


def test_a_start_that_would_mix_two_runs_is_refused(base_config):
    sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 2, "save_steps": 1})).train()
    # A fresh run into the same directory: "latest" would later resume the old run's checkpoint.
    with pytest.raises(sapo.ConfigError, match=r"already holds checkpoints of an earlier run \(checkpoint-1, "
                                               r"checkpoint-2\).*resume_from_checkpoint=latest"):
        sapo.Trainer(sapo.TrainConfig(**{**base_config, "loss_type": "grpo"}))
    # Resuming with settings that make it another run.
    with pytest.raises(sapo.ConfigError, match=r"other settings \(learning_rate: 0.01 -> 0.001; loss_type: 'sapo' -> "
                                               r"'grpo'\).*model="):
        sapo.Trainer(sapo.TrainConfig(**{**base_config, "learning_rate": 1e-3, "loss_type": "grpo",
                                         "resume_from_checkpoint": "latest", "max_steps": 4}))
    with pytest.raises(sapo.ConfigError, match="checkpoint-2 is at step 2, beyond max_steps=1"):
        sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 1, "resume_from_checkpoint": "latest"}))
    # Rewinding to checkpoint-1 while checkpoint-2 stays: a crash would leave "latest" on the abandoned step.
    with pytest.raises(sapo.ConfigError, match=r"checkpoint-1 is at step 1, but output_dir also holds later "
                                               r"checkpoints of the run it would rewind \(checkpoint-2\); delete"):
        sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 2,
                                         "resume_from_checkpoint": base_config["output_dir"] + "/checkpoint-1"}))
    # Length, checkpointing and memory batching may change when a run is continued.
    resumed = sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 3, "save_total_limit": 1,
                                               "micro_batch_size": 2, "resume_from_checkpoint": "latest"}))
    assert resumed.start_step == 2


def test_what_a_resume_may_change_depends_on_what_it_does(base_config, tmp_path):
    sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 1})).train()
    same = dict(resume_from_checkpoint="latest", max_steps=2)
    # Knobs the objective ignores, and weights written out at their default, are the same run.
    resumed = sapo.Trainer(sapo.TrainConfig(**{**base_config, **same, "epsilon": 0.3, "reward_weights": [1.0]}))
    assert resumed.start_step == 1
    # A linear schedule spans max_steps: another length is another run.
    linear = {**base_config, "lr_scheduler": "linear", "output_dir": str(tmp_path / "linear")}
    sapo.Trainer(sapo.TrainConfig(**{**linear, "max_steps": 1})).train()
    with pytest.raises(sapo.ConfigError, match=r"other settings \(max_steps: 1 -> 2\)"):
        sapo.Trainer(sapo.TrainConfig(**{**linear, **same}))
    # A checkpoint of one run resumed into the directory of another.
    with pytest.raises(sapo.ConfigError, match="already holds checkpoints of an earlier run"):
        sapo.Trainer(sapo.TrainConfig(**{**linear, "max_steps": 1,
                                         "resume_from_checkpoint": base_config["output_dir"] + "/checkpoint-1"}))


def test_resume_from_another_working_directory_or_a_moved_project(base_config, workdir, tmp_path, monkeypatch):
    """Files are the same if named alike (a moved project) or if they resolve to the same path
    from the directory each run started in (config.yaml keeps them as given)."""
    monkeypatch.chdir(workdir)
    relative = {**base_config, "dataset": "data.jsonl", "reward_funcs": ["rewards.py:first_char_parity"],
                "max_steps": 1, "output_dir": str(tmp_path / "run")}
    sapo.Trainer(sapo.TrainConfig(**relative)).train()
    saved = yaml.safe_load((tmp_path / "run" / "checkpoint-1" / "config.yaml").read_text())
    assert saved["dataset"] == "data.jsonl" and saved["reward_funcs"] == ["rewards.py:first_char_parity"]
    monkeypatch.chdir(tmp_path)
    absolute = {**relative, "dataset": str(workdir / "data.jsonl"),
                "reward_funcs": [f"{workdir / 'rewards.py'}:first_char_parity"]}
    resumed = sapo.Trainer(sapo.TrainConfig(**{**absolute, "max_steps": 2, "resume_from_checkpoint": "latest"}))
    assert resumed.start_step == 1
    # Another file of the same name elsewhere is another run.
    (tmp_path / "data.jsonl").write_text((workdir / "data.jsonl").read_text())
    with pytest.raises(sapo.ConfigError, match=r"other settings \(dataset: 'data.jsonl' -> '/"):
        sapo.Trainer(sapo.TrainConfig(**{**absolute, "dataset": str(tmp_path / "data.jsonl"), "max_steps": 2,
                                         "resume_from_checkpoint": "latest"}))


def test_a_moved_project_is_the_same_run(base_config, tmp_path):
    """The same relative spellings are the same files, wherever the project now lies."""
    here = sapo.TrainConfig(**{**base_config, "dataset": "data.jsonl", "reward_funcs": ["rewards.py:f"]})
    assert run_differences(here, here, other_cwd=str(tmp_path / "old" / "place")) == []
