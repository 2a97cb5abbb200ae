"""Phase 6, log: metrics.jsonl (always), tensorboard and wandb (optional), sampled completions,
and the progress bar."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import LogWriteError


def _optional(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"report_to={extra!r} needs the {extra} extra: pip install 'sapo-rl[{extra}]'") from err


def append_lines(path: Path, text: str) -> None:
    """Append to a log; a failure stops the run with one line naming the file (a line cut short
    by it is dropped at resume, and the last checkpoint is untouched)."""
    try:
        with path.open("a") as f:
            f.write(text)
    except OSError as err:
        raise LogWriteError(f"could not write {path}: {err.strerror or err}; the last checkpoint is intact: make "
                            "room (or fix the directory) and resume with resume_from_checkpoint=latest") from None


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class RunLogger:
    """Writes on the main process only; the other processes get a logger that does nothing."""

    def __init__(self, output_dir: str | Path, report_to: list[str], config: dict[str, Any], *, enabled: bool,
                 resume_step: int | None = None, lock=None) -> None:
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.tensorboard = self.wandb = None
        self.lock = lock  # the output directory's lock (output_dir.OutputDirLock), released by close()
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.completions_path = self.dir / "completions.jsonl"
        self.off_policy_path = self.dir / "logratios.jsonl"
        for path in (self.metrics_path, self.completions_path, self.off_policy_path):
            _truncate_after(path, resume_step)
        if "tensorboard" in report_to:
            tb = _optional("torch.utils.tensorboard", "tensorboard")
            self.tensorboard = tb.SummaryWriter(log_dir=str(self.dir / "tensorboard"))
        if "wandb" in report_to:
            self.wandb = _optional("wandb", "wandb")
            self.wandb.init(config=config, dir=str(self.dir), resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        append_lines(self.metrics_path, json.dumps({"step": step, **{k: _clean(v) for k, v in metrics.items()}}) + "\n")
        if self.tensorboard is not None:
            for k, v in metrics.items():
                self.tensorboard.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        if not self.enabled or not rows:
            return
        append_lines(self.completions_path,
                     "".join(json.dumps({"step": step, **row}, default=str) + "\n" for row in rows))

    def log_off_policy(self, step: int, stats) -> None:
        """Histograms of the off-policy token log-ratios (see diagnostics.py), one line per step."""
        if not self.enabled or stats.counts[0] == 0:
            return
        append_lines(self.off_policy_path, json.dumps({"step": step, **stats.histograms()}) + "\n")

    def close(self, exit_code: int = 0) -> None:
        """Idempotent: the trainer closes the logger however its run ends (`exit_code` 1 for a run
        that failed, which W&B then shows as such). The lock is released whatever a tracker does."""
        tensorboard, wandb, lock = self.tensorboard, self.wandb, self.lock
        self.tensorboard = self.wandb = self.lock = None
        try:
            try:
                if tensorboard is not None:
                    tensorboard.close()
            finally:
                if wandb is not None:
                    wandb.finish(exit_code=exit_code)
        finally:
            if lock is not None:
                lock.release()


def _truncate_after(path: Path, step: int | None) -> None:
    """On resume, drop lines of steps after the checkpoint: they are about to be redone. The kept
    lines go to a temporary file in the same directory that replaces the log only once it is
    complete and on disk, so a crash (or a full disk) during the rewrite leaves the old log."""
    if step is None or not path.is_file():
        return  # a fresh run: identity.check_start refused an output_dir holding another run's logs
    tmp = path.with_name(f".{path.name}.rewrite")  # a fixed name: a killed rewrite's leftover is overwritten
    try:
        with path.open("rb") as src, tmp.open("wb") as dst:
            for line in src:  # streamed: completions.jsonl can be hundreds of MiB
                try:
                    keep = json.loads(line).get("step", 0) <= step
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue  # a line cut short by a crash
                if keep:
                    dst.write(line if line.endswith(b"\n") else line + b"\n")
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(), TextColumn("eta"),
        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), disable=not enabled,
    )
