"""Fault injection: a second run in the same output_dir, a crash while the logs are rewritten at
resume, a full disk while saving, corrupted checkpoints, a kill during checkpoint rotation."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sapo
import sapo.training.trainer
from sapo.errors import CheckpointError
from sapo.training import checkpoint, output_dir
from sapo.training.checkpoint import list_checkpoints
from sapo.training.tracking import RunLogger

HOLDER = textwrap.dedent("""
    import json, sys
    import sapo
    sapo.Trainer(sapo.TrainConfig(**json.loads(sys.argv[1]))).train()
""")
STALLS = textwrap.dedent("""
    import time


    def stall(prompts, completions, **kwargs):
        print("ready", flush=True)
        time.sleep(300)
""")


def test_a_second_run_in_the_same_output_dir_fails_at_once_and_a_killed_run_frees_it(base_config, tmp_path):
    out = Path(base_config["output_dir"])
    (tmp_path / "stalls.py").write_text(STALLS)  # a run in progress: its first reward call never returns
    running = {**base_config, "reward_funcs": [f"{tmp_path / 'stalls.py'}:stall"]}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, json.dumps(running)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        # In the same process (a second Trainer) and from the command line: refused, naming the holder.
        with pytest.raises(sapo.ConfigError, match=rf"output_dir {out} is in use by pid {holder.pid} on host .* "
                                                   r"\(started .*\); wait for that run to end, or use another"):
            sapo.Trainer(sapo.TrainConfig(**base_config))
        args = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in base_config.items()]
        result = subprocess.run([sys.executable, "-m", "sapo", "train", *args], capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().count("\n") == 0 and f"in use by pid {holder.pid}" in result.stderr
        assert not list_checkpoints(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert (out / ".sapo.lock").is_file()  # stale: its flock went with the process
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 1}))
    trainer.train()
    assert list_checkpoints(out) == [out / "checkpoint-1"]
    sapo.Trainer(sapo.TrainConfig(**{**base_config, "resume_from_checkpoint": "latest"}))  # train() released it


REWRITE = textwrap.dedent("""
    import resource, signal, sys
    from sapo.training.tracking import RunLogger
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # killed by the kernel in the middle of a write
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    RunLogger(sys.argv[1], ["jsonl"], {}, enabled=True, resume_step=int(sys.argv[3]))
""")


def test_a_kill_while_resume_rewrites_the_logs_leaves_them_intact(tmp_path):
    rows = "".join(json.dumps({"step": s, "completion": "x" * 2000}) + "\n" for s in range(1, 11))
    for name in ("metrics.jsonl", "completions.jsonl", "logratios.jsonl"):
        (tmp_path / name).write_text(rows)
    # The kept rows (steps 1-8) are larger than the limit: the rewrite dies halfway through.
    killed = subprocess.run([sys.executable, "-c", REWRITE, str(tmp_path), str(len(rows) // 2), "8"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr[-2000:]
    for name in ("metrics.jsonl", "completions.jsonl", "logratios.jsonl"):
        assert (tmp_path / name).read_text() == rows, name
    from sapo.training.tracking import RunLogger

    RunLogger(tmp_path, ["jsonl"], {}, enabled=True, resume_step=8)  # the next resume completes it
    for name in ("metrics.jsonl", "completions.jsonl", "logratios.jsonl"):
        assert [json.loads(line)["step"] for line in (tmp_path / name).open()] == list(range(1, 9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["completions.jsonl", "logratios.jsonl", "metrics.jsonl"]


def test_a_full_disk_while_saving_names_the_checkpoint_and_keeps_the_last_one(base_config, monkeypatch):
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 1}))
    trainer.train()
    out = trainer.logger.dir
    good = {p.name: p.read_bytes() for p in (out / "checkpoint-1").iterdir()}
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        name = getattr(f, "name", str(f))
        if name.endswith("scheduler.pt"):  # after the model, the tokenizer and optimizer.pt
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointError, match=rf"could not write checkpoint {out / 'checkpoint-2'}: No space left on "
                                              r"device \(.*scheduler.pt\); checkpoint-1 is intact"):
        trainer.save(2)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]  # no temporary dir
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-1").iterdir()} == good


def _mount_tmpfs(tmp_path, size):
    """A small filesystem of its own (root, and a kernel that allows the mount), else skipped."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True,
                          timeout=30, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    _MOUNTS.append(mount)
    return mount


_MOUNTS = []


@pytest.fixture(autouse=True)
def _unmount():
    yield
    while _MOUNTS:
        subprocess.run(["umount", "-l", str(_MOUNTS.pop())], timeout=30, check=False)


@pytest.mark.parametrize("size", ["64k", "160k"])  # full while writing model.safetensors, or optimizer.pt
def test_a_really_full_disk_at_the_first_save_is_one_line(base_config, workdir, tmp_path, size):
    tmpfs = _mount_tmpfs(tmp_path, size)  # the tiny model's checkpoint is about 320 KB
    args = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in base_config.items() if k != "output_dir"]
    result = subprocess.run([sys.executable, "-m", "sapo", "train", *args, "max_steps=1", f"output_dir={tmpfs}"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and last.startswith("sapo train: error: could not write checkpoint "
                                                                f"{tmpfs / 'checkpoint-1'}: "), result.stderr[-2000:]
    assert "No space left on device" in last and "there is no earlier checkpoint" in last
    assert not [p for p in tmpfs.iterdir() if "checkpoint" in p.name]


# ---------------------------------------------------------------- corrupted checkpoints
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, workdir):
    """A finished run of 2 steps with checkpoint-1 and checkpoint-2 (copied by each test)."""
    out = tmp_path_factory.mktemp("run") / "out"
    config = {"model": str(workdir / "model"), "dataset": str(workdir / "data.jsonl"),
              "reward_funcs": [f"{workdir / 'rewards.py'}:first_char_parity"], "num_generations": 4,
              "prompts_per_step": 2, "max_completion_length": 6, "max_prompt_length": 16, "num_minibatches": 2,
              "micro_batch_size": 4, "learning_rate": 1e-2, "max_steps": 2, "save_steps": 1, "output_dir": str(out),
              "seed": 0, "max_grad_norm": 0.0}
    sapo.Trainer(sapo.TrainConfig(**config)).train()
    return config


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor's data, past the header
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "missing model.safetensors": ("model.safetensors", lambda p: p.unlink()),
    "truncated model.safetensors": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-1000])),
    "flipped bytes in the tensor data": ("model.safetensors", _flip),
    "garbage trainer_state.json": ("trainer_state.json", lambda p: p.write_text("{garbage")),
    "garbage config.json": ("config.json", lambda p: p.write_text("not json at all")),
    "missing rng state": ("rng_state_0.pt", lambda p: p.unlink()),
    "missing config.yaml": ("config.yaml", lambda p: p.unlink()),
    "missing optimizer.pt": ("optimizer.pt", lambda p: p.unlink()),
}


@pytest.mark.parametrize("variant", list(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_is_named_and_latest_valid_resumes_the_older_one(two_checkpoints, tmp_path,
                                                                                      variant, capsys):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints["output_dir"], out)
    name, corrupt = CORRUPTIONS[variant]
    corrupt(out / "checkpoint-2" / name)
    config = {**two_checkpoints, "output_dir": str(out), "max_steps": 3}
    with pytest.raises(CheckpointError, match=rf"resume_from_checkpoint=latest: {out / 'checkpoint-2' / name} .*; "
                                              r"resume from the newest intact checkpoint with "
                                              r"resume_from_checkpoint=latest_valid$"):
        sapo.Trainer(sapo.TrainConfig(**config, resume_from_checkpoint="latest"))
    capsys.readouterr()
    trainer = sapo.Trainer(sapo.TrainConfig(**config, resume_from_checkpoint="latest_valid"))
    assert trainer.resume_path == out / "checkpoint-1" and trainer.start_step == 1
    note = capsys.readouterr().err
    assert f"skipped checkpoint-2 ({out / 'checkpoint-2' / name}" in note and "resuming from checkpoint-1" in note
    trainer.train()  # saving step 2 again replaces the corrupt checkpoint
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    checkpoint.verify_checkpoint(out / "checkpoint-2")


def test_no_intact_checkpoint_and_checkpoints_without_a_manifest(two_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints["output_dir"], out)
    config = {**two_checkpoints, "output_dir": str(out), "max_steps": 3}
    # Written before manifests: accepted with a note, and still checked for what a resume needs.
    (out / "checkpoint-2" / "manifest.json").unlink()
    trainer = sapo.Trainer(sapo.TrainConfig(**config, resume_from_checkpoint="latest"))
    assert trainer.start_step == 2 and "checkpoint-2 has no manifest.json" in capsys.readouterr().err
    (out / "checkpoint-2" / "scheduler.pt").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match=r"checkpoint-2/scheduler.pt is truncated or not a torch.save file"):
        sapo.Trainer(sapo.TrainConfig(**config, resume_from_checkpoint="latest"))
    _flip(out / "checkpoint-1" / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"latest_valid: no intact checkpoint in .*checkpoint-2 \(.*scheduler"
                                              r".*; checkpoint-1 \(.*optimizer.pt does not match its sha256"):
        sapo.Trainer(sapo.TrainConfig(**config, resume_from_checkpoint="latest_valid"))
    with pytest.raises(CheckpointError, match=r"checkpoint-1/optimizer.pt does not match its sha256 in manifest.json"
                                              r" \(corrupted bytes\); resume from another checkpoint"):
        sapo.Trainer(sapo.TrainConfig(**config, resume_from_checkpoint=str(out / "checkpoint-1")))


def test_a_missing_rng_state_is_an_error_not_an_inexact_resume(two_checkpoints, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints["output_dir"], out)
    trainer = sapo.Trainer(sapo.TrainConfig(**{**two_checkpoints, "output_dir": str(out), "max_steps": 3,
                                               "resume_from_checkpoint": "latest"}))
    (out / "checkpoint-2" / "rng_state_0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-2/rng_state_0.pt is missing"):
        checkpoint.load_training_state(out / "checkpoint-2", trainer.acc, trainer.optimizer, trainer.scheduler)
    # Saved by one process, resumed by two: there is no RNG state for the second.
    with pytest.raises(CheckpointError, match=r"checkpoint-1 was saved by 1 process\(es\) and holds no rng_state_1.pt"):
        checkpoint.verify_checkpoint(out / "checkpoint-1", num_processes=2)
    # That checkpoint is intact: latest_valid does not skip it (and rewind over it) but says so.
    with pytest.raises(CheckpointError, match=r"^resume_from_checkpoint=latest_valid: .*checkpoint-2 was saved by 1"):
        checkpoint.resolve_resume("latest_valid", out, num_processes=2)


def test_a_malformed_manifest_is_one_error_naming_it(two_checkpoints, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints["output_dir"], out)
    manifest = out / "checkpoint-2" / "manifest.json"
    content = json.loads(manifest.read_text())
    content["files"]["optimizer.pt"] = "abc"
    manifest.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"manifest.json is not a valid manifest .*'optimizer.pt' is not"):
        checkpoint.verify_checkpoint(out / "checkpoint-2")


def test_a_kill_during_rotation_leaves_no_half_deleted_checkpoint(base_config, monkeypatch):
    out = Path(base_config["output_dir"])
    out.mkdir(parents=True)
    mine = [out / ".deleting-checkpoint-notes", out / "deleting-checkpoint-1", out / ".tmp-checkpoint-1.bak"]
    for path in mine:  # the user's, though named alike: never removed
        path.mkdir()
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        path = Path(path)
        if path.name.endswith("checkpoint-1") and (path / "model.safetensors").exists():
            (path / "model.safetensors").unlink()
            raise KeyboardInterrupt  # the process dies here
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    trainer = sapo.Trainer(sapo.TrainConfig(**{**base_config, "max_steps": 3, "save_steps": 1, "save_total_limit": 2}))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()  # the save of step 3 removes checkpoint-1
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    for path in list_checkpoints(out):
        checkpoint.verify_checkpoint(path)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    trainer.save(3)  # the next save removes the leftover, and only that
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == sorted(
        ["checkpoint-2", "checkpoint-3", *(p.name for p in mine)])


def test_a_run_that_fails_mid_way_releases_its_lock(base_config, monkeypatch):
    trainer = sapo.Trainer(sapo.TrainConfig(**base_config))

    def fail(*args, **kwargs):
        raise RuntimeError("a reward service went away")

    monkeypatch.setattr(sapo.training.trainer, "score_rollout", fail)
    with pytest.raises(RuntimeError, match="went away"):
        trainer.train()
    output_dir.lock_output_dir(base_config["output_dir"]).release()  # free again, in this same process


def test_a_full_disk_while_logging_is_one_line_and_keeps_the_checkpoints(base_config, monkeypatch):
    # /dev/full fails every write with ENOSPC, as a full disk does.
    config = {**base_config, "save_steps": 1}
    sapo.Trainer(sapo.TrainConfig(**{**config, "max_steps": 1})).train()
    before = (Path(config["output_dir"]) / "checkpoint-1" / "model.safetensors").read_bytes()
    trainer = sapo.Trainer(sapo.TrainConfig(**config, resume_from_checkpoint="latest"))
    opened = RunLogger.__init__

    def full_disk(logger, *args, **kwargs):
        opened(logger, *args, **kwargs)
        logger.metrics_path = Path("/dev/full")

    monkeypatch.setattr(RunLogger, "__init__", full_disk)
    with pytest.raises(sapo.ConfigError, match=r"^could not write /dev/full: No space left on device; the last "
                                               r"checkpoint is intact"):
        trainer.train()
    assert list_checkpoints(config["output_dir"])[-1].name == "checkpoint-1"
    assert (Path(config["output_dir"]) / "checkpoint-1" / "model.safetensors").read_bytes() == before


def test_a_config_yaml_that_cannot_be_written_is_one_line(base_config):
    out = Path(base_config["output_dir"])
    out.mkdir(parents=True)
    (out / "config.yaml").symlink_to("/dev/full")
    trainer = sapo.Trainer(sapo.TrainConfig(**base_config))
    with pytest.raises(sapo.ConfigError, match=r"could not write .*config.yaml: No space left on device"):
        trainer.train()
    output_dir.lock_output_dir(out).release()  # the failed start released the lock


def test_a_checkpoint_of_more_processes_resumes_with_a_note_and_manifest_names_stay_inside(two_checkpoints, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints["output_dir"], out)
    manifest = out / "checkpoint-2" / "manifest.json"
    content = json.loads(manifest.read_text())
    content["num_processes"] = 2
    manifest.write_text(json.dumps(content))
    notes = checkpoint.verify_checkpoint(out / "checkpoint-2", num_processes=1)
    assert len(notes) == 1 and "saved by 2 processes and is resumed by 1" in notes[0]
    for name, entry in [("../../outside", {"size": 1, "sha256": "0"}), ("optimizer.pt", {"size": True, "sha256": "0"})]:
        bad = json.loads(json.dumps(content))
        bad["files"][name] = entry
        manifest.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="is not a valid manifest"):
            checkpoint.verify_checkpoint(out / "checkpoint-2")
