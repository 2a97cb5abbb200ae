"""`accelerate launch` with 2 CPU processes (gloo) gives the update of one process on the same
global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess


def launch(config_path, *overrides, processes):
    if processes == 1:
        cmd = [sys.executable, "-m", "sapo", "train"]
    else:  # --multi_gpu is accelerate's flag for multi-process DDP; without GPUs it runs on CPU with gloo
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "-m", "sapo", "train"]
    result = subprocess.run([*cmd, str(config_path), *overrides], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def config_for(workdir, model, **changes) -> dict:
    return {
        "model": str(model), "dataset": str(workdir / "data.jsonl"),
        "reward_funcs": [f"{workdir / 'rewards.py'}:first_char_parity"], "num_generations": 4, "prompts_per_step": 4,
        "num_minibatches": 2, "micro_batch_size": 3, "max_completion_length": 6, "max_steps": 2, "optim": "sgd",
        "learning_rate": 0.5, "max_grad_norm": 0.0, **changes,
    }


def one_and_two_processes(config, tmp_path, start_dir):
    """Launches the config on 1 and on 2 processes and checks that they take the same update."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    launch(path, f"output_dir={tmp_path / 'one'}", processes=1)
    launch(path, f"output_dir={tmp_path / 'two'}", processes=2)
    one = load_file(tmp_path / "one" / "checkpoint-2" / "model.safetensors")
    two = load_file(tmp_path / "two" / "checkpoint-2" / "model.safetensors")
    start = load_file(start_dir / "model.safetensors")
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved > 1e-3 and worst <= 1e-4 * moved, (worst, moved)
    return [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")]


@pytest.mark.parametrize("aggregation,scale", [("token-mean", "batch")])
def test_two_processes_match_one(workdir, tmp_path, aggregation, scale):
    # the chunked output layer (vocabulary 106) inside DDP's forward
    config = config_for(workdir, workdir / "model", aggregation=aggregation, scale_rewards=scale,
                        logprob_chunk_size=16)
    lines_one, lines_two = one_and_two_processes(config, tmp_path, workdir / "model")
    assert len(lines_one) == len(lines_two) == 2
    for a, b in zip(lines_one, lines_two):
        assert a["reward"] == b["reward"] and a["completions/mean_length"] == b["completions/mean_length"]
        # Update metrics are the global batch's (token-weighted over processes), not rank 0's.
        update_keys = [k for k in a if k in ("loss", "entropy", "grad_norm") or k.startswith(("sapo/", "ratio"))]
        assert "loss" in update_keys and "entropy" in update_keys
        for k in update_keys:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_two_processes_match_one_with_moe_routing_replay(workdir, tmp_path):
    import torch

    from sapo.model.routing import find_routers
    from sapo.model.tiny import char_tokenizer, tiny_causal_lm

    tok = char_tokenizer()
    model = tiny_causal_lm(tok, "qwen3_moe", hidden_size=32, num_experts=8, num_experts_per_tok=2)
    with torch.no_grad():  # routers away from their zero init, so that routing moves with the updates
        for router in find_routers(model):
            router.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    # no router_aux_loss_coef: that loss depends on the micro-batches (docs/moe.md)
    config = config_for(workdir, tmp_path / "moe", aggregation="token-mean", scale_rewards="batch",
                        routing_replay="r2")
    lines_one, lines_two = one_and_two_processes(config, tmp_path, tmp_path / "moe")
    last_one, last_two = lines_one[-1], lines_two[-1]
    assert last_one["moe/routing_changed_frac/minibatch_2"] > 0  # the replay had something to force
    assert last_two["loss"] == pytest.approx(last_one["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("tied", ["tied", "untied"])
def test_chunked_logprobs_under_fsdp2_match_the_unsharded_model(tied):
    """The chunked output layer inside a model sharded with `fully_shard` (2 CPU processes, gloo):
    the same log-probabilities and, after FSDP's gradient averaging, the same full gradients."""
    worker = Path(__file__).parent / "workers" / "fsdp_logprobs.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(worker), tied], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [c["call"] for c in calls] == [0, 1]
    assert all(c["chunked"] for c in calls)  # verified on the first call, so the second took the chunked path
    for c in calls:
        assert c["value_error"] < 1e-5 and c["grad_error"] < 1e-5, c
