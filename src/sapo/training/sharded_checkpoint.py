"""The model and optimizer state of a sharded (fsdp=true) run, in a checkpoint: PyTorch's
Distributed Checkpoint, each process writing its own shards into `dcp/`, and reading them back
(resharded if the process count changed). checkpoint.py writes the rest of the checkpoint around
it, atomically as for any run; export.py turns one into a model directory."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..model.loading import DCP_DIR, DCP_METADATA


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_METADATA).is_file()


def save_sharded_state(directory: Path, model, optimizer) -> None:
    """Every process writes its shards of the model and optimizer state (a collective call). An
    optimizer that has not stepped yet (every step so far skipped as non-finite) has no state to
    save: asking torch for it would initialise it with a step of count 1, and the next real step
    would then differ from an unsaved run's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer.state:
        model_sd, optimizer_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optimizer_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=str(Path(directory) / DCP_DIR))


def load_sharded_state(path: Path, model, optimizer) -> None:
    """Read the model and optimizer shards of a checkpoint into `model` and `optimizer` (a
    collective call); an optimizer saved before its first step stays as it is."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    directory = Path(path) / DCP_DIR
    try:
        stored = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        with_optimizer = any(key.startswith("optimizer.") for key in stored)
        if with_optimizer:
            model_sd, optimizer_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optimizer": optimizer_sd}
        else:
            state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(directory))
    except Exception as err:  # noqa: BLE001 - DCP wraps every process's failure in one CheckpointException
        raise CheckpointError(f"{directory} cannot be read into this model ({_first_line(err)}): "
                              "resume with the model the run was started from") from None
    if with_optimizer:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        set_model_state_dict(model, state["model"])


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
