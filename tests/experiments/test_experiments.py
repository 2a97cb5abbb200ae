"""sapo compare / sweep / report / plot gates."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

import sapo
import sapo.experiments.runs
from sapo.experiments.plots import gate_curves
from sapo.experiments.report import RunData, build_report, collapsed
from sapo.experiments.runs import compare_runs, parse_grid, run_all, sweep_runs


@pytest.fixture
def tiny_base(base_config, workdir):
    return {**base_config, "eval_dataset": str(workdir / "data.jsonl"), "eval_steps": 1, "eval_num_generations": 2,
            "max_steps": 2, "max_prompt_length": 16}


def test_compare_writes_a_report_whose_numbers_are_the_runs_own(tiny_base, tmp_path):
    runs = compare_runs(["sapo", "grpo"], [0])
    dirs = run_all(tiny_base, runs, tmp_path, log=lambda *_: None)
    report = build_report(dirs, tmp_path)
    for name in ("report.md", "report.json", "curves.png", "logratios.png"):
        assert (tmp_path / name).is_file()
    table = json.loads((tmp_path / "report.json").read_text())
    assert list(table) == ["sapo", "grpo"]
    for arm in ("sapo", "grpo"):
        lines = [json.loads(x) for x in (tmp_path / arm / "seed0" / "metrics.jsonl").read_text().splitlines()]
        evals = {x["step"]: x["eval/pass@1"] for x in lines if "eval/pass@1" in x}
        assert sorted(evals) == [0, 1, 2]
        assert table[arm]["final_pass@1_mean"] == evals[2]
        assert table[arm]["best_pass@1_mean"] == max(evals[1], evals[2])
        assert table[arm]["start_pass@1_mean"] == evals[0]
        assert f"{evals[2]:.3f}" in report.read_text()
        assert yaml.safe_load((tmp_path / arm / "seed0" / "config.yaml").read_text())["loss_type"] == arm
    assert "loss_type: grpo" in report.read_text() and "### sapo" in report.read_text()


def test_rerunning_skips_finished_runs(tiny_base, tmp_path):
    runs = compare_runs(["sapo"], [0])
    run_all(tiny_base, runs, tmp_path, log=lambda *_: None)
    metrics = tmp_path / "sapo" / "seed0" / "metrics.jsonl"
    before = metrics.read_text()
    said = []
    run_all(tiny_base, runs, tmp_path, log=said.append)
    assert said == ["[1/1] sapo seed 0: finished, skipped"]
    assert metrics.read_text() == before
    # Other settings in the same directory: refused before anything runs, not reported as these.
    with pytest.raises(sapo.ConfigError, match=r"holds a run with other settings \(learning_rate: 0.01 -> 0.02\)"):
        run_all({**tiny_base, "learning_rate": 2e-2}, runs, tmp_path, log=said.append)
    # A longer run continues the finished one.
    run_all({**tiny_base, "max_steps": 3}, runs, tmp_path, log=said.append)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [0, 1, 2, 3] and json.loads((metrics.parent / "summary.json").read_text())["steps"] == 3
    # A shorter run than the one on disk, or other evaluation settings: refused up front.
    for changed, message in (({"max_steps": 2}, "more than max_steps=2"), ({"eval_num_generations": 4},
                                                                          "eval_num_generations: 2 -> 4")):
        with pytest.raises(sapo.ConfigError, match=message):
            run_all({**tiny_base, **changed}, runs, tmp_path, log=said.append)


def test_sweep_grid_and_the_report_command(tiny_base, tmp_path):
    grid = parse_grid(["tau_neg=0.95,1.5", "learning_rate=1e-3"])
    assert grid == {"tau_neg": [0.95, 1.5], "learning_rate": [1e-3]}
    runs = sweep_runs(grid, [0, 1])
    assert [(r.arm, r.seed) for r in runs][:2] == [("tau_neg=0.95,learning_rate=0.001", 0),
                                                   ("tau_neg=0.95,learning_rate=0.001", 1)]
    dirs = run_all({**tiny_base, "max_steps": 1}, runs[:2], tmp_path, log=lambda *_: None)
    assert yaml.safe_load((dirs[1] / "config.yaml").read_text())["tau_neg"] == 0.95
    first = build_report(dirs, tmp_path)
    table = (tmp_path / "report.json").read_text()
    (tmp_path / "report.json").unlink()
    result = subprocess.run([sys.executable, "-m", "sapo", "report", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report.json").read_text() == table and first.is_file()


def fake_run(directory, seed, evals, *, wall=10.0, steps=40, **config):
    """A finished run's files: Pass@1 evaluations {step: value}."""
    directory.mkdir(parents=True)
    config = {"loss_type": "sapo", "learning_rate": 1e-4, "seed": seed, "max_steps": steps,
              "output_dir": str(directory), **config}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": s, "eval/pass@1": v, "loss": 0.1, "grad_norm": 1.0} for s, v in sorted(evals.items())]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "summary.json").write_text(json.dumps({"steps": steps, "wall_seconds": wall}))
    return directory


def test_report_statistics_over_seeds_and_the_runs_it_leaves_out(tmp_path):
    a = fake_run(tmp_path / "a", 0, {0: 0.2, 20: 0.5, 40: 0.48}, wall=10.0)
    # Same experiment, another seed; its checkpointing differs, which a continued run may change.
    b = fake_run(tmp_path / "b", 1, {0: 0.2, 20: 0.3, 40: 0.6}, wall=20.0, save_steps=7)
    twin = fake_run(tmp_path / "twin", 1, {0: 0.2, 20: 0.9, 40: 0.9})  # seed 1 again: one experiment run twice
    unfinished = fake_run(tmp_path / "unfinished", 2, {0: 0.2}, steps=40)
    (unfinished / "summary.json").write_text(json.dumps({"steps": 20, "wall_seconds": 5.0}))
    no_metrics = fake_run(tmp_path / "no_metrics", 3, {0: 0.2})
    (no_metrics / "metrics.jsonl").unlink()
    said = []
    build_report([a, b, a, tmp_path / "b" / ".." / "b", twin, unfinished, no_metrics], tmp_path / "out",
                 threshold=0.45, log=said.append)
    table = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(table) == ["sapo"]
    row = table["sapo"]
    assert row["seeds"] == [0, 1]
    assert row["final_pass@1_mean"] == pytest.approx(0.54) and row["final_pass@1_std"] == pytest.approx(0.06 * 2 ** 0.5)
    assert row["best_pass@1_mean"] == pytest.approx(0.55)  # after the start: 0.5 and 0.6
    # first hits: 20 (not 40) and 40
    assert row["steps_to_threshold_mean"] == 30 and row["runs_reaching_threshold"] == 2
    assert row["start_pass@1_mean"] == pytest.approx(0.2) and row["wall_seconds_mean"] == 15.0
    assert len(said) == 3
    assert any(m.endswith(f"twin: arm 'sapo' seed 1 is already {b}") for m in said), said
    assert any("unfinished: unfinished (summary.json is for 20 steps, max_steps is 40)" in m for m in said)
    assert any(m.endswith("no_metrics: no metrics.jsonl") for m in said)
    assert "sample standard deviation (n - 1)" in (tmp_path / "out" / "report.md").read_text()


def test_experiment_settings_that_the_commands_own_are_refused(tiny_base, tmp_path):
    with pytest.raises(sapo.ConfigError, match=r"--grid 'tau_neg=1,1.0' lists 1.0 twice"):
        parse_grid(["tau_neg=1,1.0"])
    with pytest.raises(sapo.ConfigError, match=r"--grid seed: the command sets seed for each run itself"):
        parse_grid(["seed=1,2"])
    with pytest.raises(sapo.ConfigError, match=r"arms 'a/b' and 'a_b' \(seed 0\) would share the directory"):
        run_all(tiny_base, [sapo.experiments.runs.Run("a/b", 0, {}), sapo.experiments.runs.Run("a_b", 0, {})], tmp_path)
    for override, option in (("seed=5", "--seeds"), (f"output_dir={tmp_path}", "--out")):
        result = subprocess.run([sys.executable, "-m", "sapo", "compare", "--loss-types", "sapo", "--seeds", "0",
                                 override, "--out", str(tmp_path / "c")], capture_output=True, text=True)
        assert result.returncode == 2 and f"is set by {option}" in result.stderr, result.stderr


def test_collapse_definition():
    def run(evals, loss=0.1):
        rows = [{"step": s, "eval/pass@1": v, "loss": loss, "grad_norm": 1.0} for s, v in evals.items()]
        return RunData(None, "a", 0, {}, rows, {})

    assert not collapsed(run({0: 0.2, 10: 0.5, 20: 0.45}))
    assert collapsed(run({0: 0.2, 10: 0.5, 20: 0.2}))
    assert collapsed(run({0: 0.2, 10: 0.3}, loss=None))
    assert collapsed(run({0: 0.3, 10: 0.0, 20: 0.0}))  # fell from the start and stayed down
    assert collapsed(run({0: 0.5, 20: 0.1}))  # evaluated only at the start and the end


def test_runs_with_different_configs_never_share_an_arm():
    def run(lr, seed):
        return RunData(None, "sapo", seed, {"loss_type": "sapo", "learning_rate": lr, "seed": seed, "output_dir": "x"},
                       [], {})

    from sapo.experiments.report import group_arms

    arms = group_arms([run(1e-4, 0), run(1e-2, 0), run(1e-4, 1)])
    assert {k: [r.seed for r in v] for k, v in arms.items()} == {"sapo": [0, 1], "sapo #2": [0]}
    # A sweep over a knob a continued run may change keeps its arms apart by name.
    small, large = run(1e-4, 0), run(1e-4, 0)
    small.arm, small.config["micro_batch_size"] = "micro_batch_size=8", 8
    large.arm, large.config["micro_batch_size"] = "micro_batch_size=64", 64
    assert list(group_arms([small, large])) == ["micro_batch_size=8", "micro_batch_size=64"]


def test_plot_gates_uses_the_librarys_gate_functions(tmp_path, monkeypatch):
    import sapo.experiments.plots

    calls = []
    real = sapo.experiments.plots.soft_gate
    monkeypatch.setattr(sapo.experiments.plots, "soft_gate", lambda r, tau: calls.append(tau) or real(r, tau))
    out = sapo.experiments.plots.plot_gates(tmp_path / "gates.png", tau_pos=1.0, tau_neg=2.0)
    assert out.stat().st_size > 20_000 and sorted(set(calls)) == [1.0, 2.0]

    r = torch.linspace(0.05, 3.0, 200, dtype=torch.float64)
    curves = gate_curves(r, tau_pos=1.0, tau_neg=2.0)
    sapo_neg = curves["SAPO A<0 (tau=2)"]
    torch.testing.assert_close(sapo_neg["value"], sapo.soft_gate(r, 2.0))
    torch.testing.assert_close(sapo_neg["weight"], sapo.soft_gate_weight(r, 2.0))
    grpo_pos = curves["GRPO A>0 (eps=0.2)"]
    torch.testing.assert_close(grpo_pos["weight"], (r < 1.2).double())
    result = subprocess.run([sys.executable, "-m", "sapo", "plot", "gates", "--out", str(tmp_path / "g2.png")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and (tmp_path / "g2.png").is_file()


def test_a_runs_own_config_can_be_the_base_of_a_comparison(tiny_base, tmp_path, capsys):
    from sapo.cli import RUN_FIELDS, _load_config

    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({**tiny_base, "seed": 7, "output_dir": "old", "resume_from_checkpoint": "latest"}))
    config = _load_config([str(saved), "max_steps=3"], fixed_by=RUN_FIELDS)
    assert (config.seed, config.resume_from_checkpoint, config.max_steps) == (0, None, 3)
    assert "note: output_dir, resume_from_checkpoint, seed from" in capsys.readouterr().err


def test_arms_are_named_sets_of_overrides_from_key_values_or_a_yaml_file(tmp_path):
    from sapo.experiments.runs import arm_runs, parse_arms

    (tmp_path / "r2.yaml").write_text("loss_type: grpo\nepsilon_high: 0.27\n")
    arms = parse_arms(["sapo:loss_type=sapo", f"grpo_r2:{tmp_path / 'r2.yaml'}", "base:",
                       "wide:loss_type=grpo, epsilon=0.3,reward_funcs=[arithmetic, exact_match]"])
    assert arms == {"sapo": {"loss_type": "sapo"}, "grpo_r2": {"loss_type": "grpo", "epsilon_high": 0.27}, "base": {},
                    "wide": {"loss_type": "grpo", "epsilon": 0.3, "reward_funcs": ["arithmetic", "exact_match"]}}
    runs = arm_runs(arms, [0, 1])
    assert [(r.arm, r.seed) for r in runs][:3] == [("sapo", 0), ("sapo", 1), ("grpo_r2", 0)]
    assert runs[2].overrides == {"loss_type": "grpo", "epsilon_high": 0.27}
    assert runs[2].directory(tmp_path) == tmp_path / "grpo_r2" / "seed0"
    # The shipped GRPO-R2 preset is an arm as it is.
    from pathlib import Path

    preset = Path(__file__).resolve().parents[2] / "examples" / "grpo_r2.yaml"
    assert parse_arms([f"grpo_r2:{preset}"])["grpo_r2"] == {"loss_type": "grpo", "epsilon": 0.2, "epsilon_high": 0.27,
                                                             "routing_replay": "r2"}


@pytest.mark.parametrize("specs, message", [
    (["sapo"], "--arms 'sapo' is not NAME:key=value[,key=value...] or NAME:file.yaml"),
    (["a/b:loss_type=sapo"], "is not NAME:key=value"),
    (["a:loss_type=sapo", "a:loss_type=grpo"], "--arms a: the name is given twice"),
    (["a:lr=1e-3"], "--arms a: unknown config field(s): 'lr'"),
    (["a:learning_rate=fast"], "--arms a: learning_rate must be a number"),
    (["a:loss_type=sapo,loss_type=grpo"], "--arms a: loss_type is given twice"),
    (["a:max_steps=[1"], "--arms a: max_steps=[1: the value is not valid YAML"),
    (["a:seed=1"], "--arms a: seed is set by the command for each run (give the seeds with --seeds)"),
    (["a:output_dir=x"], "--arms a: output_dir is set by the command"),
    (["a:resume_from_checkpoint=latest"], "--arms a: resume_from_checkpoint is set by the command"),
    (["a:missing.yaml"], "--arms a: config file 'missing.yaml' does not exist"),
    (["a:LIST"], "--arms a: config file"),  # a YAML list, written below
])
def test_bad_arm_specs_are_one_line_errors_naming_the_arm(specs, message, tmp_path, monkeypatch):
    from sapo.experiments.runs import parse_arms

    monkeypatch.chdir(tmp_path)
    (tmp_path / "LIST").write_text("- loss_type: sapo\n")
    with pytest.raises(sapo.ConfigError) as err:
        parse_arms(specs)
    assert message in str(err.value) and "\n" not in str(err.value)
    if specs == ["a:LIST"]:
        assert "expected a mapping of field: value" in str(err.value)


def test_an_arms_invalid_value_is_named_before_any_run(tiny_base, tmp_path):
    from sapo.experiments.runs import Run

    runs = [Run("fine", 0, {"loss_type": "sapo"}), Run("typo", 0, {"loss_type": "grpp"})]
    with pytest.raises(sapo.ConfigError, match=r"^arm 'typo': loss_type='grpp' is not one of"):
        run_all(tiny_base, runs, tmp_path)
    with pytest.raises(sapo.ConfigError, match=r"^num_generations=1 must be at least 2"):  # the base's own problem
        run_all({**tiny_base, "num_generations": 1}, runs, tmp_path)
    assert not (tmp_path / "fine").exists()


def test_compare_arms_on_the_command_line(tmp_path, monkeypatch, capsys):
    import sapo.experiments.report
    from sapo.cli import main

    seen = {}
    monkeypatch.setattr(sapo.experiments.runs, "run_all", lambda base, runs, out: seen.update(base=base, runs=runs))
    monkeypatch.setattr(sapo.experiments.report, "build_report", lambda *a, **k: tmp_path / "report.md")
    preset = "examples/grpo_r2.yaml"
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    # Overrides after the arms are the command's, not arms.
    assert main(["compare", "--arms", "sapo:loss_type=sapo", f"grpo_r2:{preset}", "gspo:loss_type=gspo,tau_neg=2",
                 "max_steps=7", "--seeds", "0,1", "--out", str(tmp_path)]) == 0
    assert seen["base"]["max_steps"] == 7 and seen["base"]["dataset"] == "arithmetic"
    assert [(r.arm, r.seed) for r in seen["runs"]] == [(a, s) for a in ("sapo", "grpo_r2", "gspo") for s in (0, 1)]
    assert seen["runs"][2].overrides["routing_replay"] == "r2" and seen["runs"][4].overrides["tau_neg"] == 2
    # --loss-types as before.
    assert main(["compare", "--seeds", "0", "--out", str(tmp_path)]) == 0
    assert [r.overrides for r in seen["runs"]] == [{"loss_type": t} for t in ("sapo", "grpo", "gspo")]
    capsys.readouterr()
    cases = [
        (["--arms", "a:loss_type=sapo", "--loss-types", "sapo"], "--arms and --loss-types both name the arms"),
        (["--arms", "a:loss_type=sapo", "loss_type=grpo"],
         "loss_type is set for every run and varied by the --arms option"),
        (["--arms", "a:seed=3"], "--arms a: seed is set by the command"),
    ]
    for argv, message in cases:
        assert main(["compare", *argv, "--out", str(tmp_path)]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
