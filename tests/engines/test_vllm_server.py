"""The vLLM server client against a local stand-in server process (fake_vllm_server.py: loopback,
the tiny model served with transformers, the routes and payloads of vLLM the client uses). No
real vLLM runs here (docs/engines.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sapo
from sapo.engines import SamplingSettings
from sapo.errors import ConfigError, EngineError
from sapo.model.loading import load_model
from sapo.training.checkpoint import list_checkpoints, verify_checkpoint
from tests.engines.fake_vllm_server import weights_digest

SERVER = Path(__file__).with_name("fake_vllm_server.py")
ROOT = Path(__file__).parents[2]


@pytest.fixture
def serve(tmp_path):
    """serve(model_dir, *flags) -> base URL of a fake server; every one started is killed at the end."""
    procs = []

    def start(model: Path, *flags: str) -> str:
        port_file = tmp_path / f"port-{len(procs)}"
        proc = subprocess.Popen([sys.executable, str(SERVER), "--model", str(model), "--port-file", str(port_file),
                                 *flags], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the fake server did not start within 60 s"
            time.sleep(0.1)
        return f"http://127.0.0.1:{port_file.read_text()}"

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=30)


def _get(url: str, route: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + route, timeout=30) as reply:
        return json.loads(reply.read())


class _NoVLLM:
    """A meta-path finder that fails any import of vllm: server mode must not need it."""

    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise AssertionError(f"the trainer imported {name} in server mode")
        return None


def _config(base_config, url, **overrides):
    return sapo.TrainConfig(**{**base_config, "rollout_engine": "vllm", "vllm_server_base_url": url,
                               "vllm_server_timeout": 30, "max_steps": 3, **overrides})


def test_three_steps_against_the_server_keep_its_weights_equal_to_the_trainers(base_config, workdir, serve,
                                                                               monkeypatch):
    url = serve(workdir / "model")
    served_at_start = _get(url, "/sapo_test/weights_digest")["digest"]
    monkeypatch.setattr(sys, "meta_path", [_NoVLLM(), *sys.meta_path])
    rows = (workdir / "data.jsonl").read_text().splitlines()
    (workdir / "eval6.jsonl").write_text("\n".join(rows[:6]))
    trainer = sapo.Trainer(_config(base_config, url, save_steps=1, eval_dataset=str(workdir / "eval6.jsonl"),
                                   eval_steps=3, eval_num_generations=2))
    synced = []
    real_sync = trainer.engine.sync

    def sync(model, version=None):
        real_sync(model, version)
        synced.append((weights_digest(model), _get(url, "/sapo_test/weights_digest")["digest"]))

    trainer.engine.sync = sync
    history = trainer.train()
    # synced before each of the 3 rollouts and the 2 evaluations (before training, after step 3)
    assert len(synced) == 5 and all(ours == served for ours, served in synced)
    assert len({ours for ours, _ in synced}) == 4  # the weights moved, and the server followed each time
    trained = [h for h in history if "rollout/mismatch_kl" in h]
    assert len(trained) == 3 and "eval/pass@1" in history[0] and "eval/pass@1" in history[-1]
    for step in trained:  # the correction is on, and sees the same float32 model on both sides
        assert 0 <= step["rollout/mismatch_kl"] < 1e-4 and abs(step["rollout/is_weight_mean"] - 1) < 1e-3
    # at the end the server has the model's own weights back, ready for the next run
    after = _get(url, "/sapo_test/weights_digest")
    assert after["digest"] == served_at_start and after["updates"] == 5
    out = Path(base_config["output_dir"])
    assert not list(out.glob("vllm-weights-*"))  # the engine's own weights directories are gone
    assert len(list_checkpoints(out)) >= 1


def test_rollouts_from_the_server_are_well_formed(base_config, workdir, serve):
    url = serve(workdir / "model")
    trainer = sapo.Trainer(_config(base_config, url))
    engine, model = trainer.engine, trainer.acc.unwrap_model(trainer.model)
    engine.connect(model, fresh=True)
    engine.sync(model, version=0)
    prompts = [trainer.train_set.prompt_ids[i] for i in range(3)]
    sampling = SamplingSettings(max_new_tokens=6, temperature=1.0)
    gen = engine.generate(prompts, 4, sampling, seeds=[1, 2, 3])
    assert gen.completion_ids.shape[0] == 12 and gen.completion_ids.shape[1] <= 6
    eos = trainer.tokenizer.eos_token_id
    lengths = gen.completion_mask.sum(1)
    for b in range(12):
        n = int(lengths[b])
        assert n >= 1 and gen.completion_mask[b, :n].all() and not gen.completion_mask[b, n:].any()
        ends_with_eos = int(gen.completion_ids[b, n - 1]) == eos
        assert bool(gen.truncated[b]) == (not ends_with_eos) and (ends_with_eos or n == 6)
        assert gen.finish_reasons[b] == ("length" if gen.truncated[b] else "stop")
    assert torch.isfinite(gen.logprobs).all() and (gen.logprobs <= 0).all()
    assert (gen.logprobs[gen.completion_mask == 0] == 0).all()
    updates = _get(url, "/sapo_test/weights_digest")["updates"]
    engine.sync(model, version=0)  # a version synced already is not sent again
    assert _get(url, "/sapo_test/weights_digest")["updates"] == updates
    engine.close()


def test_a_server_that_dies_mid_run_is_a_clear_error_and_the_checkpoint_stays(base_config, workdir, serve):
    url = serve(workdir / "model", "--die-after-updates", "2")
    trainer = sapo.Trainer(_config(base_config, url, save_steps=1))
    with pytest.raises(EngineError, match=f"{url} stopped answering.*resume"):
        trainer.train()
    out = Path(base_config["output_dir"])
    checkpoints = list_checkpoints(out)
    assert [p.name for p in checkpoints] == ["checkpoint-1"] and verify_checkpoint(checkpoints[0]) == []
    resumed = sapo.Trainer(_config(base_config, serve(workdir / "model"), resume_from_checkpoint="latest"))
    assert resumed.start_step == 1 and len(resumed.train()) == 2  # a new server; the run goes on from step 1


def test_a_server_with_other_weights_is_refused_and_left_alone(base_config, workdir, serve, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(workdir / "model", other)
    model = load_model(str(other))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    model.save_pretrained(other)
    url = serve(other)
    before = _get(url, "/sapo_test/weights_digest")
    with pytest.raises(ConfigError, match="serves other weights"):
        sapo.Trainer(_config(base_config, url)).train()
    assert _get(url, "/sapo_test/weights_digest") == before


def test_a_server_with_another_tokenizer_is_refused(base_config, workdir, serve, tmp_path):
    other = tmp_path / "tokenizer"
    shutil.copytree(workdir / "model", other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]  # the probe text holds both digits
    (other / "tokenizer.json").write_text(json.dumps(spec))
    url = serve(workdir / "model", "--tokenizer", str(other))
    with pytest.raises(ConfigError, match="decodes token ids differently"):
        sapo.Trainer(_config(base_config, url)).train()


def test_no_server_is_a_clear_error(base_config):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(EngineError, match=f"no vLLM server answered at {url} within vllm_server_timeout=1"):
        sapo.Trainer(_config(base_config, url, vllm_server_timeout=1)).train()


def test_a_server_without_processed_logprobs_is_refused(base_config, workdir, serve):
    url = serve(workdir / "model", "--logprobs-mode", "raw_logprobs")
    with pytest.raises(ConfigError, match="--logprobs-mode raw_logprobs.*processed_logprobs"):
        sapo.Trainer(_config(base_config, url)).train()


def test_a_short_server_context_is_refused(base_config, workdir, serve):
    url = serve(workdir / "model", "--max-model-len", "8")
    with pytest.raises(ConfigError, match="max_model_len=8"):
        sapo.Trainer(_config(base_config, url)).train()


def test_the_rollout_benchmark_times_the_server_engine(workdir, serve):
    url = serve(workdir / "model")
    script = ROOT / "benchmarks" / "rollout.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(workdir / "model"), "--vllm-server", url,
                           "--prompt-lengths", "4", "--prompts", "2", "--num-generations", "2",
                           "--max-new-tokens", "3", "--repeats", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line.split() for line in done.stdout.splitlines() if "vllm server" in line)
    tokens, seconds, rate = int(row[3]), float(row[4]), float(row[5])
    assert 2 * 2 <= tokens <= 2 * 2 * 3 and seconds > 0 and rate > 0
    assert _get(url, "/sapo_test/weights_digest")["updates"] == 0  # it samples the served weights, pushes none
