"""The model and optimizer state of a sharded (fsdp=true) run, in a checkpoint: PyTorch's
Distributed Checkpoint, each process writing its own shards into `dcp/`, and reading them back
(resharded if the process count changed). checkpoint.py writes the rest of the checkpoint around
it, atomically as for any run; export.py turns one into a model directory."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

DCP_DIR = "dcp"
DCP_METADATA = f"{DCP_DIR}/.metadata"


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_METADATA).is_file()


def save_sharded_state(directory: Path, model, optimizer) -> None:
    """Every process writes its shards of the model and optimizer state (a collective call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optimizer_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optimizer_sd}, checkpoint_id=str(Path(directory) / DCP_DIR))


def load_sharded_state(path: Path, model, optimizer) -> None:
    """Read the model and optimizer shards of a checkpoint into `model` and `optimizer` (a
    collective call)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optimizer_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optimizer_sd}
    try:
        dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    except Exception as err:  # noqa: BLE001 - DCP wraps every process's failure in one CheckpointException
        raise CheckpointError(f"{Path(path) / DCP_DIR} cannot be read into this model ({_first_line(err)}): "
                              "resume with the model the run was started from") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
