import json
import subprocess
import sys

import torch

import sapo
from sapo.cli import main
from sapo.demo import shipped_model_path

SHIPPED = shipped_model_path()


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "SAPO" in capsys.readouterr().out
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert sapo.__version__ in capsys.readouterr().out


def test_losses_lists_every_registered_name():
    out = subprocess.run([sys.executable, "-m", "sapo", "losses"], capture_output=True, text=True, check=True).stdout
    for name in sapo.available_policy_losses() + sapo.available_aggregations():
        assert name in out


def sapo_train(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sapo", "train", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, check=False)


def test_help_config_lists_every_field():
    out = sapo_train("--help-config").stdout
    for name in sapo.TrainConfig.__dataclass_fields__:
        assert f"\n{name} = " in "\n" + out, name


def test_bad_input_is_one_clear_line_not_a_traceback(workdir, tmp_path):
    model, data, rewards = workdir / "model", workdir / "data.jsonl", workdir / "rewards.py"
    common = [f"model={model}", "max_steps=1", "num_generations=2", "prompts_per_step=2",
              "max_completion_length=4", "num_minibatches=1"]
    cases = [
        ([f"dataset={tmp_path}/missing.jsonl", "reward_funcs=exact_match"], "dataset file"),
        ([f"dataset={workdir}/chat.jsonl", f"reward_funcs={rewards}:conversational_parity"], None),  # control: runs
        ([f"dataset={data}", "reward_funcs=exact_match", "num_generations=1"], "num_generations=1 must be at least 2"),
        ([f"dataset={data}", f"reward_funcs={rewards}:raises_on_seven", "prompts_per_step=36"],
         "reward function 'raises_on_seven' raised ZeroDivisionError"),
        ([f"dataset={data}", f"reward_funcs={rewards}:wrong_length"], "returned 1 values for 4 completions"),
        ([f"dataset={data}", "reward_funcs=exact_match", "learning_rat=1"], "did you mean learning_rate"),
    ]
    for i, (extra, message) in enumerate(cases):
        result = sapo_train(*common, f"output_dir={tmp_path / str(i)}", *extra)
        if message is None:
            assert result.returncode == 0, result.stderr[-2000:]
            continue
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        assert message in result.stderr, (message, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_bad_column_is_named(workdir, tmp_path):
    (tmp_path / "q.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n')
    result = sapo_train(f"model={workdir / 'model'}", f"dataset={tmp_path / 'q.jsonl'}", "reward_funcs=exact_match",
                        f"output_dir={tmp_path / 'o'}")
    assert result.returncode == 2 and "has no 'prompt' column" in result.stderr and "Traceback" not in result.stderr


def test_tasks_lists_each_with_an_example():
    out = subprocess.run([sys.executable, "-m", "sapo", "tasks"], capture_output=True, text=True, check=True).stdout
    assert "arithmetic:" in out and "countdown:" in out and out.count("example: prompt") == 2


def test_warmstart_writes_a_loadable_model_deterministically(tmp_path):
    import torch
    from safetensors.torch import load_file

    from sapo.warmstart import warmstart

    a = warmstart(tmp_path / "a", steps=5, hidden_size=32, num_layers=1, progress=None)
    b = warmstart(tmp_path / "b", steps=5, hidden_size=32, num_layers=1, progress=None)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").is_file() and not (tmp_path / "a.tmp").exists()
    result = subprocess.run([sys.executable, "-m", "sapo", "warmstart", "--out", str(tmp_path / "c"), "--steps", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and (tmp_path / "c" / "model.safetensors").is_file()


def test_warmstart_moe_is_deterministic_and_loads_as_qwen3_moe(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sapo.cli import main
    from sapo.warmstart import warmstart

    a = warmstart(tmp_path / "a", arch="qwen3_moe", steps=5, hidden_size=32, num_layers=1, progress=None)
    b = warmstart(tmp_path / "b", arch="qwen3_moe", steps=5, hidden_size=32, num_layers=1, progress=None)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    model = AutoModelForCausalLM.from_pretrained(a)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.model_type == "qwen3_moe"
    assert (model.config.num_experts, model.config.num_experts_per_tok, model.config.norm_topk_prob) == (4, 2, True)
    assert model.config.output_router_logits is False  # the load-balancing loss is the trainer's choice
    # The router learned: its weights moved from their initialisation.
    fresh = warmstart(tmp_path / "c", arch="qwen3_moe", steps=0, hidden_size=32, num_layers=1, progress=None)
    router = next(k for k in wa if k.endswith("mlp.gate.weight"))
    assert not torch.equal(wa[router], load_file(fresh / "model.safetensors")[router])
    assert main(["warmstart", "--arch", "qwen3_moe", "--out", str(tmp_path / "d"), "--steps", "1"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "d").config.num_hidden_layers == 4


def test_eval_takes_a_shipped_models_name(tmp_path):
    from sapo.cli import main
    from sapo.demo import shipped_model_path

    assert main(["eval", "moe-tiny", "--problems", "4", "--samples", "2", "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["model"] == str(shipped_model_path("moe-tiny")) and result["problems"] == 4


def test_train_without_a_config_runs_the_demo(tmp_path):
    from sapo.demo import demo_config, shipped_model_path

    config = demo_config([])
    assert config.model == str(shipped_model_path()) and config.dataset == "arithmetic" and config.loss_type == "sapo"
    result = subprocess.run([sys.executable, "-m", "sapo", "train", "max_steps=2", "eval_num_generations=1",
                             f"output_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and {"pass@1_before", "pass@1_after", "greedy_accuracy_before",
                                       "greedy_accuracy_after", "wall_seconds"} <= set(summary)
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file() and (tmp_path / "training.png").is_file()
    assert "run summary" in result.stdout


def test_bad_yaml_and_bad_eval_arguments_are_clear_errors(tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- a: 1\n- b: 2\n")
    (tmp_path / "broken.yaml").write_text("loss_type: [sapo\n")
    (tmp_path / "latin1.yaml").write_bytes("loss_type: sapo # caf\xe9\n".encode("latin-1"))
    # One real process (the exit status and stderr as a shell sees them); the rest in this one, through main().
    result = sapo_train(str(tmp_path / "list.yaml"))
    assert result.returncode == 2 and "expected a mapping" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    def cli(*args: str) -> str:
        capsys.readouterr()
        assert main(list(args)) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return err

    for name, message in (("broken.yaml", "is not valid YAML"), ("latin1.yaml", "is not UTF-8 text")):
        assert message in cli("train", str(tmp_path / name))
    from sapo.demo import shipped_model_path

    model = str(shipped_model_path())
    assert "--samples must be at least 1" in cli("eval", model, "--samples", "0")
    for args, message in ((["--max-num-seqs", "-1"], "--max-num-seqs must be 0"),
                          (["--temperature", "-1"], "--temperature must be positive"),
                          (["--problems", "-5"], "--problems must be positive"),
                          (["--out", str(tmp_path / "missing" / "e.json")], "does not exist"),
                          (["--device", "gpu"], "is not a torch device"),
                          (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--samples", "0"],
                           "no CUDA device" if not torch.cuda.is_available() else "--samples must be")):
        assert message in cli("eval", model, *args), args
    assert "no such local model directory" in cli("eval", str(tmp_path / "nope"))
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-10").mkdir()
    assert f"not a model directory (no config.json); it looks like a training run: evaluate one of its " \
        f"checkpoints, e.g. {run / 'checkpoint-10'}" in cli("eval", str(run))
    err = cli("eval", model, "--task", "mine.jsonl")
    assert "--task 'mine.jsonl' is not a built-in task" in err and "eval_dataset=<file>" in err


def test_eval_results_do_not_depend_on_max_num_seqs(tmp_path):
    from sapo.demo import shipped_model_path

    results = []
    for cap in ("0", "8"):
        out = tmp_path / f"eval{cap}.json"
        result = subprocess.run([sys.executable, "-m", "sapo", "eval", str(shipped_model_path()), "--problems", "24",
                                 "--samples", "4", "--max-num-seqs", cap, "--device", "cpu", "--out", str(out)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        results.append(json.loads(out.read_text()))
    assert results[0]["problems"] == 24 and 0 < results[0]["pass@1"] < 1
    assert results[0] == results[1]


def test_warmstart_refuses_to_overwrite_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    result = subprocess.run([sys.executable, "-m", "sapo", "warmstart", "--out", str(tmp_path), "--steps", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "does not hold a model" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_experiment_and_plot_options_are_checked_before_anything_runs(tmp_path, capsys):
    cases = [
        (["compare", "--seeds", "a"], "--seeds 'a': expected comma-separated int values"),
        (["compare", "--seeds", "0,0"], "repeats a value"),
        (["compare", "--loss-types", ""], "--loss-types is empty"),
        (["compare", "loss_type=grpo"], "loss_type is set for every run and varied by the --loss-types option"),
        (["sweep", "--grid", "tau_neg=1.0", "--grid", "tau_neg=2.0"], "--grid tau_neg is given twice"),
        (["plot", "gates", "--out", str(tmp_path / "g.xyz")], "give a .png, .pdf or .svg file"),
        (["plot", "gates", "--out", str(tmp_path / "g.png"), "--tau-pos", "0"], "must be positive"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "runs")] if argv[0] != "plot" else argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "runs").exists()


def assert_one_error_line(result, message):
    """No traceback; the error is the last line of stderr (above it: progress bars of loading)."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and lines[-1].startswith("sapo train: error: "), result.stderr[-2000:]
    assert message in lines[-1] and sum("error" in line for line in lines) == 1, (message, result.stderr[-2000:])


def test_damaged_models_and_unusable_output_dirs_are_one_line_naming_the_file(workdir, tmp_path):
    import shutil

    common = [f"dataset={workdir / 'data.jsonl'}", "reward_funcs=exact_match", "max_steps=1", "num_generations=2",
              "prompts_per_step=2", "max_completion_length=4", "num_minibatches=1"]
    truncated, garbage = tmp_path / "truncated", tmp_path / "garbage"
    for copy in (truncated, garbage):
        shutil.copytree(workdir / "model", copy)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    (garbage / "config.json").write_text('{"model_type": "qwen2",')
    (tmp_path / "a-file").write_text("not a directory")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only)],
                             capture_output=True, timeout=30, check=False).returncode == 0
    cases = [
        ([f"model={truncated}", f"output_dir={tmp_path / 'o1'}"], f"{weights} is truncated or corrupt"),
        ([f"model={garbage}", f"output_dir={tmp_path / 'o2'}"], f"{garbage / 'config.json'} is not valid JSON"),
        ([f"model={workdir / 'model'}", f"output_dir={tmp_path / 'a-file' / 'run'}"],
         f"output_dir={str(tmp_path / 'a-file' / 'run')!r} cannot be used: Not a directory"),
    ]
    if mounted:  # root ignores permission bits; a read-only mount stops it too
        cases.append(([f"model={workdir / 'model'}", f"output_dir={read_only / 'run'}"],
                      f"output_dir={str(read_only / 'run')!r} cannot be used: Read-only file system"))
    try:
        for args, message in cases:
            result = sapo_train(*common, *args)
            assert result.returncode == 2, (args, result.stderr[-2000:])
            assert_one_error_line(result, message)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(read_only)], timeout=30, check=False)
    assert not (tmp_path / "o1").exists() or not any((tmp_path / "o1").glob("checkpoint-*"))


def test_a_garbage_config_json_in_the_checkpoint_being_resumed_is_one_line(workdir, tmp_path):
    run = [f"model={workdir / 'model'}", f"dataset={workdir / 'data.jsonl'}", "reward_funcs=exact_match",
           "num_generations=2", "prompts_per_step=2", "max_completion_length=4", "num_minibatches=1", "save_steps=1",
           f"output_dir={tmp_path / 'run'}"]
    result = sapo_train(*run, "max_steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    (tmp_path / "run" / "checkpoint-2" / "config.json").write_text("garbage")
    result = sapo_train(*run, "max_steps=3", "resume_from_checkpoint=latest")
    assert result.returncode == 2, result.stderr[-2000:]
    assert_one_error_line(result, f"{tmp_path / 'run' / 'checkpoint-2' / 'config.json'} has 7 bytes")
    assert "with resume_from_checkpoint=latest_valid" in result.stderr
    result = sapo_train(*run, "max_steps=3", "resume_from_checkpoint=latest_valid")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: resume_from_checkpoint=latest_valid: skipped checkpoint-2" in result.stderr
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").open()] == [1, 2, 3]


def test_export_writes_a_model_directory_and_refuses_what_it_cannot(base_config, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sapo.Trainer(sapo.TrainConfig(**base_config)).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "model"), "--dtype", "bfloat16"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype="auto")
    trained = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(p, trained[k].to(torch.bfloat16)) for k, p in model.state_dict().items() if k in trained)
    capsys.readouterr()
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "model")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    (checkpoint / "scheduler.pt").write_bytes(b"garbage")
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "scheduler.pt has 7 bytes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists()


def test_vllm_serve_prints_the_flags_the_client_needs(capsys):
    import shlex

    assert main(["vllm-serve", str(SHIPPED), "--port", "8123", "--max-model-len", "4096"]) == 0
    line = capsys.readouterr().out.strip()
    env, argv = line.split(" ", 1)
    assert env == "VLLM_SERVER_DEV_MODE=1"
    argv = shlex.split(argv)
    assert argv[:3] == ["vllm", "serve", str(SHIPPED.resolve())]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags["--port"] == "8123" and flags["--max-model-len"] == "4096" and flags["--host"] == "127.0.0.1"
    assert flags["--logprobs-mode"] == "processed_logprobs" and flags["--generation-config"] == "vllm"
    assert json.loads(flags["--weight-transfer-config"]) == {"backend": "disk"}


def test_vllm_serve_refuses_what_it_cannot_do(tmp_path, capsys, monkeypatch):
    assert main(["vllm-serve", str(tmp_path)]) == 2
    assert "not a model directory" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no vllm on it
    assert main(["vllm-serve", str(SHIPPED), "--run"]) == 2
    assert "vllm is not installed here" in capsys.readouterr().err
