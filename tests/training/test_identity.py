"""Setting a run up reads only; `train()` takes the output directory, refuses another run's logs
rather than deleting them, and notices an output directory that changed in between."""

import json
from pathlib import Path

import pytest

import sapo
from sapo.errors import CheckpointError, ConfigError
from sapo.experiments.runs import compare_runs, run_all
from sapo.rewards import REWARDS


def test_setting_a_run_up_writes_nothing(base_config, tmp_path):
    out = Path(base_config["output_dir"])

    def reward_defined_here(prompts, completions, **kwargs):
        return [float(len(c) % 2) for c in completions]

    config = sapo.TrainConfig(**{**base_config, "reward_funcs": [reward_defined_here]})
    assert "reward_defined_here" not in REWARDS
    trainer = sapo.Trainer(config)
    assert not out.exists() and trainer.logger is None
    assert trainer.rewards[0].fn is reward_defined_here and "reward_defined_here" not in REWARDS
    trainer.train()
    assert (out / "config.yaml").is_file() and (out / "checkpoint-2").is_dir()
    with pytest.raises(ConfigError, match="this Trainer has run already"):
        trainer.train()


@pytest.mark.parametrize("resume", [None, "latest"])
def test_a_fresh_run_refuses_the_logs_of_a_run_that_left_no_checkpoint(base_config, resume):
    out = Path(base_config["output_dir"])
    out.mkdir(parents=True)
    earlier = '{"step": 1, "reward": 0.5}\n'
    (out / "metrics.jsonl").write_text(earlier)
    with pytest.raises(ConfigError, match=r"holds metrics.jsonl of an earlier run that left no checkpoint to resume "
                                          r"from; sapo-rl does not delete them"):
        sapo.Trainer(sapo.TrainConfig(**{**base_config, "resume_from_checkpoint": resume}))
    assert (out / "metrics.jsonl").read_text() == earlier


def test_an_output_dir_that_changes_after_set_up_is_refused_at_train(base_config):
    trainer = sapo.Trainer(sapo.TrainConfig(**base_config))
    sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 1})).train()  # another run, in between
    with pytest.raises(CheckpointError, match=r"changed since this Trainer was set up"):
        trainer.train()
    assert [p.name for p in Path(base_config["output_dir"]).glob("checkpoint-*")] == ["checkpoint-1"]
    sapo.Trainer(sapo.TrainConfig(**{**base_config, "resume_from_checkpoint": "latest"})).train()  # lock released


def test_compare_refuses_an_arm_that_stopped_before_its_first_checkpoint_before_any_run(base_config, tmp_path):
    base = {k: v for k, v in base_config.items() if k not in ("seed", "output_dir")}
    runs = compare_runs(["sapo", "grpo"], [0])
    stopped = runs[1].directory(tmp_path / "cmp")
    stopped.mkdir(parents=True)
    (stopped / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    with pytest.raises(ConfigError, match=r"of a run that stopped before its first checkpoint; move them away"):
        run_all(base, runs, tmp_path / "cmp")
    assert not runs[0].directory(tmp_path / "cmp").exists()  # nothing ran


def test_two_reward_functions_of_one_name_are_refused(base_config):
    def twin(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    first = twin

    def twin(prompts, completions, **kwargs):  # noqa: F811 - the point of the test
        return [1.0] * len(completions)

    with pytest.raises(ConfigError, match=r"are both named 'twin'; config.yaml keeps names only"):
        sapo.TrainConfig(**{**base_config, "reward_funcs": [first, twin]}).validate()
    sapo.TrainConfig(**{**base_config, "reward_funcs": [twin, twin]}).validate()  # the same one twice is fine


def test_a_checkpoint_resumes_only_as_it_was_saved_sharded_or_not(base_config):
    from sapo.training.identity import check_start

    sapo.Trainer(sapo.TrainConfig(**base_config)).train()
    checkpoint = Path(base_config["output_dir"]) / "checkpoint-2"
    with pytest.raises(ConfigError, match=r"was saved without fsdp; resume it with fsdp=false, or start a new sharded "
                                          r"run from its weights with model="):
        check_start(sapo.TrainConfig(**base_config, fsdp=True), checkpoint)
    (checkpoint / "dcp").mkdir()
    (checkpoint / "dcp" / ".metadata").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"holds sharded \(fsdp=true\) state; resume it with fsdp=true, or `sapo "
                                          r"export .* --out DIR` and start a new run with model=DIR"):
        check_start(sapo.TrainConfig(**base_config), checkpoint)
