"""Phase 7, checkpoint: checkpoints that resume exactly, written atomically: a crash mid-save leaves the previous
checkpoint intact (everything goes to a temporary directory that is renamed at the end). Each
checkpoint carries a manifest of its files' sizes and sha256 sums, written last, and a resume
checks every file against it; the output directory is locked for the whole run (output_dir.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import read_yaml_mapping
from ..errors import CheckpointError, ConfigError, ProcessCountMismatch
from ..model.loading import DCP_METADATA
from .output_dir import os_reason
from .sharded_checkpoint import load_sharded_state, save_sharded_state

_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Hidden names that only this module creates (and so may remove): a checkpoint being written,
# one being replaced by a rerun of its step, one being deleted by save_total_limit.
_LEFTOVER = re.compile(r"^\.(tmp|old|deleting)-checkpoint-\d+$")
MANIFEST = "manifest.json"
_MANIFEST_FORMAT = 1
_CHUNK = 1 << 20


# ---------------------------------------------------------------- finding checkpoints
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints in output_dir, oldest first (hidden names, in progress or being deleted, are
    not checkpoints)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(spec: str | None, output_dir: str | Path, *, num_processes: int = 1,
                   log: Callable[[str], None] | None = None) -> tuple[Path | None, list[Path]]:
    """The checkpoint to resume from (None: start fresh) and the newer ones that were skipped as
    corrupt (only with "latest_valid"). The checkpoint is verified against its manifest first."""
    log = log or (lambda message: None)
    if spec is None:
        return None, []
    if spec in ("latest", "latest_valid"):
        found = list_checkpoints(output_dir)
        if not found:
            return None, []
        if spec == "latest":
            try:
                _log_notes(verify_checkpoint(found[-1], num_processes), log)
            except CheckpointError as err:
                raise CheckpointError(f"resume_from_checkpoint=latest: {err}; resume from the newest intact checkpoint "
                                      "with resume_from_checkpoint=latest_valid") from None
            return found[-1], []
        skipped: list[tuple[Path, str]] = []
        for path in reversed(found):
            try:
                notes = verify_checkpoint(path, num_processes)
            except ProcessCountMismatch as err:
                # Falling back past an intact checkpoint would rewind over it.
                raise CheckpointError(f"resume_from_checkpoint=latest_valid: {err}") from None
            except CheckpointError as err:
                skipped.append((path, f"{path.name} ({err})"))
                continue
            if skipped:
                log(f"note: resume_from_checkpoint=latest_valid: skipped {'; '.join(why for _, why in skipped)}; "
                    f"resuming from {path.name} (the skipped ones stay until this run saves those steps again)")
            _log_notes(notes, log)
            return path, [p for p, _ in skipped]
        raise CheckpointError(f"resume_from_checkpoint=latest_valid: no intact checkpoint in {output_dir} "
                              f"({'; '.join(why for _, why in skipped)}); start over in another output_dir")
    path = Path(spec)
    if not ((path / "trainer_state.json").is_file() or (path / MANIFEST).is_file()):
        close = " (did you mean 'latest_valid'?)" if spec.replace("-", "_").lower().startswith("latest") else ""
        raise ConfigError(f"resume_from_checkpoint={spec!r} is not a checkpoint directory (no trainer_state.json); "
                          f"use 'latest', 'latest_valid' or a checkpoint-<step> directory{close}")
    try:
        _log_notes(verify_checkpoint(path, num_processes), log)
    except CheckpointError as err:
        raise CheckpointError(f"resume_from_checkpoint: {err}; resume from another checkpoint "
                              "(resume_from_checkpoint=latest_valid takes the newest intact one)") from None
    return path, []


def _log_notes(notes: list[str], log: Callable[[str], None]) -> None:
    for note in notes:
        log(note)


def checkpoint_step(path: Path) -> int:
    # The name first: it is how checkpoints are ordered, and a corrupt trainer_state.json of a
    # later checkpoint must not stop the check of an earlier one.
    m = _PATTERN.match(path.name)
    return int(m.group(1)) if m else json.loads((path / "trainer_state.json").read_text())["step"]


# ---------------------------------------------------------------- verification
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _required(num_processes: int, sharded: bool = False) -> list[str]:
    # A sharded checkpoint's optimizer state is in its DCP shards with the weights.
    return ["config.json", "config.yaml", "trainer_state.json", *([] if sharded else ["optimizer.pt"]), "scheduler.pt",
            *(f"rng_state_{i}.pt" for i in range(num_processes))]


def _weights(names) -> bool:
    return any(n.endswith((".safetensors", ".safetensors.index.json", ".bin")) or n == DCP_METADATA for n in names)


def verify_checkpoint(path: Path, num_processes: int = 1) -> list[str]:
    """Check a checkpoint before resuming from it: every file its manifest lists, with its size
    and sha256 (all of them, read in full), and the files a resume needs. Raises CheckpointError
    naming the first file that fails; returns notes (a checkpoint of an earlier version, without
    a manifest, is checked for its files' presence and structure only)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        _check_structure(path, num_processes)
        note = (f"note: {path.name} has no {MANIFEST} (written before checkpoints had checksums): its files are "
                "checked for presence and structure, not their contents")
        return [note]
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        saved_by = int(manifest["num_processes"])
        if manifest.get("format") != _MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
        for name, entry in files.items():
            if not (isinstance(entry, dict) and type(entry.get("size")) is int
                    and isinstance(entry.get("sha256"), str)):
                raise ValueError(f"entry {name!r} is not {{size, sha256}}")
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"entry {name!r} is outside the checkpoint")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path} is not a valid manifest ({type(err).__name__}: {err})") from None
    for name in _required(num_processes, sharded=DCP_METADATA in files):
        if name not in files:
            if name.startswith("rng_state_") and saved_by < num_processes:
                raise ProcessCountMismatch(f"{path} was saved by {saved_by} process(es) and holds no {name} for "
                                           f"process {name[10:-3]}: resume it with {saved_by} process(es) for an "
                                           "exact resume")
            raise CheckpointError(f"{path / name} is not in {manifest_path}: not a checkpoint of sapo-rl")
    if not _weights(files):
        raise CheckpointError(f"{path} holds no model weights in {manifest_path}")
    for name, entry in files.items():  # sizes first: a missing or truncated file fails without reading the rest
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{file} has {size} bytes, {MANIFEST} says {entry['size']} (truncated or replaced)")
    for name, entry in files.items():
        if _sha256(path / name) != entry["sha256"]:
            raise CheckpointError(f"{path / name} does not match its sha256 in {MANIFEST} (corrupted bytes)")
    if saved_by > num_processes:  # it resumes, but with the RNG states of the first processes only
        return [f"note: {path.name} was saved by {saved_by} processes and is resumed by {num_processes}: the run goes "
                f"on, but not exactly as it would have with {saved_by}"]
    return []


def _check_structure(path: Path, num_processes: int) -> None:
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    for name in _required(num_processes):
        if name not in names:
            raise CheckpointError(f"{path / name} is missing")
    if not _weights(names):
        raise CheckpointError(f"{path} holds no model weights (model.safetensors)")
    try:
        step = json.loads((path / "trainer_state.json").read_text()).get("step")
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / 'trainer_state.json'} is not a trainer state ({err})") from None
    if not isinstance(step, int):
        raise CheckpointError(f"{path / 'trainer_state.json'} is not a trainer state (no integer 'step')")
    try:
        read_yaml_mapping(path / "config.yaml")
        json.loads((path / "config.json").read_text())
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON ({err})") from None
    for name in sorted(names):
        if name.endswith(".pt") and not zipfile.is_zipfile(path / name):
            raise CheckpointError(f"{path / name} is truncated or not a torch.save file")
        if name.endswith(".safetensors"):
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path / name), "pt"):
                    pass
            except SafetensorError as err:
                raise CheckpointError(f"{path / name} is truncated or corrupt ({err})") from None


# ---------------------------------------------------------------- RNG
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


# ---------------------------------------------------------------- saving
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, num_processes: int) -> None:
    """sha256 and size of every file in `directory`, fsynced (the rename that publishes the
    checkpoint must not reach the disk before its contents)."""
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        files[file.relative_to(directory).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256(file)}
        _fsync(file)
    manifest = {"format": _MANIFEST_FORMAT, "algorithm": "sha256", "num_processes": num_processes, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync(directory / MANIFEST)
    _fsync(directory)


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file, whose write raises the OSError (a full disk, say) that
    torch's own writer reports only as "unexpected pos" in a RuntimeError."""
    with path.open("wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise


def _clean_leftovers(root: Path) -> None:
    """Remove what a killed save or rotation left (names this module creates, nothing else)."""
    for p in root.iterdir():
        if _LEFTOVER.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, *, model, tokenizer, optimizer, scheduler,
                    config_yaml: str, trainer_state: dict[str, Any], save_total_limit: int | None,
                    sharded: bool = False) -> Path:
    """Write checkpoint-<step>; a failure to write (a full disk, say) on any process is a
    CheckpointError on every process that names the checkpoint and the cause, with the temporary
    directory removed and the earlier checkpoints untouched. `sharded`: the model and optimizer
    state go into DCP shards that every process writes (sharded_checkpoint.py)."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    main = accelerator.is_main_process

    def write_main_files() -> None:
        _clean_leftovers(root)
        tmp.mkdir(parents=True)
        if sharded:
            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
        else:
            accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        tokenizer.save_pretrained(tmp)
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))

    try:
        # Each part ends with every process learning whether it failed anywhere: a process that
        # raised alone would leave the others waiting in the next collective.
        _on_every_process(accelerator, write_main_files if main else None)
        if sharded:
            _on_every_process(accelerator, lambda: save_sharded_state(tmp, model, optimizer))
        rng_file = tmp / f"rng_state_{accelerator.process_index}.pt"
        _on_every_process(accelerator, lambda: _torch_save(rng_state(), rng_file))
        # last: a checkpoint with a manifest is complete
        _on_every_process(accelerator, (lambda: write_manifest(tmp, accelerator.num_processes)) if main else None)
    except (OSError, SafetensorError, CheckpointException) as err:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()  # every process raises once the temporary directory is gone
        earlier = [p.name for p in list_checkpoints(root)]
        kept = f"{earlier[-1]} is intact" if earlier else "there is no earlier checkpoint"
        # safetensors reports an OS error inside its own message, e.g. "... No space left on device ..."
        raise CheckpointError(f"could not write checkpoint {final}: {os_reason(err)}; {kept}. Free space (or fix "
                              "the permissions) and continue with resume_from_checkpoint=latest") from err
    if main:
        if final.exists():  # a rerun of the same step: replace it only once the new one is complete
            old = root / f".old-checkpoint-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(root)
        if save_total_limit:
            # Oldest steps first (a resume never leaves later steps behind); the one just written stays.
            others = [p for p in list_checkpoints(root) if p != final]
            for stale in others[:max(len(others) - (save_total_limit - 1), 0)]:
                # Hidden before deletion: a kill midway leaves no half-deleted checkpoint for
                # "latest" or "latest_valid" to find; the next save removes the rest.
                doomed = root / f".deleting-{stale.name}"
                shutil.rmtree(doomed, ignore_errors=True)
                os.replace(stale, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _on_every_process(accelerator, action: Callable[[], None] | None) -> None:
    """Run `action` (None: nothing here), then raise on every process the first error of a
    writing kind that any process met (the exception travels pickled)."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    failure = None
    try:
        if action is not None:
            action()
    except (OSError, SafetensorError, CheckpointException) as err:
        failure = err
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        failure = next((f for f in gather_object([failure]) if f is not None), None)
    if failure is not None:
        raise failure


def _load(path: Path, **kwargs) -> Any:
    try:
        return torch.load(path, weights_only=False, **kwargs)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete (resume_from_checkpoint=latest_valid "
                              "takes the newest intact one)") from None
    except (OSError, EOFError, RuntimeError) as err:  # torch reports a damaged zip archive as RuntimeError
        raise CheckpointError(f"{path} cannot be read ({os_reason(err)}): the checkpoint is damaged "
                              "(resume_from_checkpoint=latest_valid takes the newest intact one)") from None


def load_training_state(path: Path, accelerator, optimizer, scheduler, *, sharded_model=None) -> dict[str, Any]:
    """Restore optimizer and scheduler (and, given `sharded_model`, its weights and the optimizer
    from the DCP shards); return trainer_state.json. This process's RNG state is checked here (a
    missing one is an error: without it the resume would not be exact) and restored when the run
    starts (`restore_rng_state`)."""
    if sharded_model is not None:
        load_sharded_state(path, sharded_model, optimizer)
    else:
        optimizer.load_state_dict(_load(path / "optimizer.pt", map_location=accelerator.device))
    scheduler.load_state_dict(_load(path / "scheduler.pt"))
    _load(path / f"rng_state_{accelerator.process_index}.pt")
    return json.loads((path / "trainer_state.json").read_text())


def restore_rng_state(path: Path, accelerator) -> None:
    set_rng_state(_load(path / f"rng_state_{accelerator.process_index}.pt"))


def print_note(message: str) -> None:
    print(message, file=sys.stderr)
