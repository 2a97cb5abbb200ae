"""Training with fsdp=true (FSDP2 over 2 CPU processes, gloo) gives the update of one process on
the same global batch, for a dense and a mixture-of-experts model, with and without gradient
checkpointing; bfloat16 parameters train close to float32 ones; a run resumed from its sharded
checkpoint continues bit-exactly; `sapo export` writes the gathered weights; and the paths where
one process could wait forever for another (decoding that stops early on one, uneven evaluation
shards, token-budget micro-batches, saving) finish. One launch runs them all (see
workers/fsdp_train.py), under a timeout."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import sapo
from sapo.model.tiny import save_tiny_model
from sapo.training.export import export_model

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).parent / "workers" / "fsdp_train.py"
LAUNCH_TIMEOUT = 120  # seconds; it takes about 40 on 2 cores


def base(workdir, model, out, **changes):
    return {**dict(model=str(model), dataset=str(workdir / "data.jsonl"),
                   reward_funcs=[f"{workdir / 'rewards.py'}:first_char_parity"], num_generations=4, prompts_per_step=4,
                   num_minibatches=2, micro_batch_size=3, max_completion_length=6, max_prompt_length=16, max_steps=2,
                   optim="sgd", learning_rate=0.5, max_grad_norm=0.0, logprob_chunk_size=16, output_dir=str(out),
                   beta=0.05),  # a reference model too, sharded like the policy
            **changes}


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / "model"
    save_tiny_model(path, "qwen3_moe", hidden_size=32)
    return path


@pytest.fixture(scope="module")
def runs(workdir, moe_model, tmp_path_factory):
    """The 2-process launch: its output directory and what it found."""
    root = tmp_path_factory.mktemp("fsdp")
    rows = (workdir / "data.jsonl").read_text().splitlines()
    (root / "eval5.jsonl").write_text("\n".join(rows[:5]))  # 3 problems on one process, 2 on the other
    dense, fsdp = workdir / "model", dict(fsdp=True)
    adam = dict(fsdp=True, optim="adamw", learning_rate=1e-2, max_grad_norm=1.0, save_steps=1)
    plan = {"model": str(dense), "runs": {
        # token-budget micro-batches, an odd evaluation set, a checkpoint every step
        "dense": base(workdir, dense, root / "dense", **fsdp, max_tokens_per_micro_batch=22, save_steps=1,
                      eval_dataset=str(root / "eval5.jsonl"), eval_steps=1, eval_num_generations=2),
        "dense_gc": base(workdir, dense, root / "dense_gc", **fsdp, gradient_checkpointing=True),
        "moe": base(workdir, moe_model, root / "moe", **fsdp),
        "moe_gc": base(workdir, moe_model, root / "moe_gc", **fsdp, gradient_checkpointing=True),
        "moe_r2": base(workdir, moe_model, root / "moe_r2", **fsdp, gradient_checkpointing=True, routing_replay="r2"),
        "bf16": base(workdir, dense, root / "bf16", **fsdp, param_dtype="bfloat16"),
        "adam4": base(workdir, dense, root / "adam4", **adam, max_steps=4),
        "adam2": base(workdir, dense, root / "adam22", **adam),
        "adam2+2": base(workdir, dense, root / "adam22", **adam, max_steps=4, resume_from_checkpoint="latest"),
    }, "update_config": base(workdir, dense, root / "unused", num_generations=3, prompts_per_step=2, beta=0.0,
                           max_tokens_per_micro_batch=22)}
    server = start_fake_vllm_server(dense, root / "port")
    try:
        # rollouts from a (stand-in) vLLM server, weights synced from the sharded policy, evaluation too
        plan["runs"]["vllm"] = base(workdir, dense, root / "vllm", **fsdp, rollout_engine="vllm", eval_steps=1,
                                    vllm_server_base_url=f"http://127.0.0.1:{(root / 'port').read_text()}",
                                    eval_dataset=str(root / "eval5.jsonl"), eval_num_generations=2)
        (root / "plan.json").write_text(json.dumps(plan))
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(WORKER), str(root / "plan.json"), str(root)],
                                capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    finally:
        server.kill()
        server.wait(timeout=30)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, json.loads((root / "found.json").read_text())


def start_fake_vllm_server(model, port_file: Path) -> subprocess.Popen:
    from tests.engines.test_vllm_server import SERVER

    proc = subprocess.Popen([sys.executable, str(SERVER), "--model", str(model), "--port-file", str(port_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the fake vLLM server did not start"
        time.sleep(0.1)
    return proc


def one_process(workdir, model, out, **changes):
    sapo.Trainer(sapo.TrainConfig(**base(workdir, model, out, **changes))).train()
    return weights(out / "checkpoint-2")


def weights(path) -> dict[str, torch.Tensor]:
    """In the names of the model in memory (a MoE's experts are stored under other names)."""
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def assert_same_update(got: dict, expected: dict, start: dict, rel: float = 1e-4):
    moved = max((expected[k] - start[k]).abs().max().item() for k in expected)
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert moved > 1e-3 and worst <= rel * moved, (worst, moved)


def test_two_sharded_processes_match_one_dense(runs, workdir, tmp_path):
    root, found = runs
    expected = one_process(workdir, workdir / "model", tmp_path / "one")
    start = weights(workdir / "model")
    for name in ("dense", "dense_gc"):
        assert found[name] == {"param_dtypes": ["torch.float32"], "sharded": True}
        assert_same_update(load_file(root / f"{name}.safetensors"), expected, start)
    metrics = [json.loads(line) for line in (root / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2] and all("eval/pass@1" in m for m in metrics)


def test_two_sharded_processes_match_one_moe(runs, workdir, moe_model, tmp_path):
    root, found = runs
    expected = one_process(workdir, moe_model, tmp_path / "one")
    start = weights(moe_model)
    for name in ("moe", "moe_gc"):
        assert found[name]["sharded"]
        assert_same_update(load_file(root / f"{name}.safetensors"), expected, start)


def test_two_sharded_processes_match_one_with_moe_routing_replay(runs, workdir, moe_model, tmp_path):
    root, found = runs
    expected = one_process(workdir, moe_model, tmp_path / "one", routing_replay="r2")
    assert found["moe_r2"]["sharded"]
    assert_same_update(load_file(root / "moe_r2.safetensors"), expected, weights(moe_model))
    last = json.loads((root / "moe_r2" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "moe/routing_changed_frac/minibatch_2" in last and 0 < last["moe/load_entropy"] <= 1


def test_bfloat16_parameters_train_with_float32_masters_close_to_float32(runs):
    root, found = runs
    assert found["bf16"]["param_dtypes"] == ["torch.float32"]  # the sharded masters
    losses = [json.loads(line)["loss"] for line in (root / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # Two SGD steps on a fixed rollout. bfloat16 keeps 8 significant bits (relative rounding
    # 2^-9 per value); the gradient passes through a few dozen rounded operations, so its error
    # is some percent of its size, while a parameter in the wrong slot would be 100%.
    fp32, bf16 = (load_file(root / f"update_{d}.safetensors") for d in ("float32", "bfloat16"))
    norm = lambda d: torch.sqrt(sum((v.double() ** 2).sum() for v in d.values()))  # noqa: E731
    difference = norm({k: bf16[k] - fp32[k] for k in fp32}) / norm(fp32)
    assert norm(fp32) > 1e-3 and 0 < difference < 0.05, difference
    assert found["update_bfloat16"]["param_dtypes"] == ["torch.float32"]
    assert found["update_float32"]["loss"] == pytest.approx(found["update_bfloat16"]["loss"], rel=0.05)


def test_resume_from_a_sharded_checkpoint_is_bit_exact(runs):
    root, _ = runs
    straight, resumed = load_file(root / "adam4.safetensors"), load_file(root / "adam2+2.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    files = {p.name for p in (root / "adam22" / "checkpoint-2" / "dcp").iterdir()}
    assert files == {".metadata", "__0_0.distcp", "__1_0.distcp"}  # each process wrote its shard
    lines = lambda d: [json.loads(x) for x in (root / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(lines("adam4")[2:], lines("adam22")[2:]):
        assert {k: v for k, v in a.items() if not k.startswith(("time/", "tokens_per"))} == \
               {k: v for k, v in b.items() if not k.startswith(("time/", "tokens_per"))}


def test_export_writes_the_gathered_weights(runs, tmp_path):
    root, _ = runs
    out = export_model(root / "dense" / "checkpoint-2", tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(out)
    gathered = load_file(root / "dense.safetensors")
    state = model.state_dict()
    assert set(gathered) <= set(state)
    assert all(torch.equal(state[k], gathered[k]) for k in gathered)
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    bf16 = export_model(root / "dense" / "checkpoint-2", tmp_path / "bf16", dtype="bfloat16")
    loaded = AutoModelForCausalLM.from_pretrained(bf16, dtype="auto")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    with pytest.raises(sapo.ConfigError, match="not empty"):
        export_model(root / "dense" / "checkpoint-2", tmp_path / "export")


def test_a_save_that_fails_on_one_process_fails_on_every_one_and_loses_nothing(runs):
    _, found = runs
    for rank in (0, 1):
        failed = found[f"failed_save_rank{rank}"]
        assert "could not write checkpoint" in failed["message"] and "No space left on device" in failed["message"]
        assert "checkpoint-2 is intact" in failed["message"]
        assert failed["left"] == ["checkpoint-1", "checkpoint-2"]  # no temporary directory, no checkpoint-3


def test_no_process_waits_forever(runs):
    _, found = runs
    # token-budget micro-batches: process 1 (short completions) packed fewer and was split to match
    assert all(c[0] == c[1] for c in found["micro_batch_counts_rank0"])
    assert any(c[0] < c[1] for c in found["micro_batch_counts_rank1"])
    assert found["unstepped_optimizer"] == [True, True]
    # rank 0 stopped at its first token; rank 1 went on, and both returned (shared prefill, generate)
    assert found["lockstep_rank0"] == [[1], [1]] and found["lockstep_rank1"] == [[6], [6]]


def test_sharded_training_with_rollouts_from_a_vllm_server(runs):
    root, found = runs
    assert found["vllm"]["sharded"]
    steps = [json.loads(line) for line in (root / "vllm" / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "rollout/mismatch_kl" in s]
    assert len(trained) == 2 and any("eval/pass@1" in s for s in steps)
    # the server sampled from the weights the sharded trainer scored with: no mismatch beyond rounding
    assert all(0 <= s["rollout/mismatch_kl"] < 1e-4 for s in trained)
    assert not list((root / "vllm").glob("vllm-weights-*"))
