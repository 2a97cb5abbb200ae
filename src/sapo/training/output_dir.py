"""The output directory's lock: one run at a time writes into an output_dir. An exclusive flock
on output_dir/.sapo.lock, held for the whole run; the kernel drops it when the process dies."""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

LOCK_FILE = ".sapo.lock"


class OutputDirLock:
    """An exclusive flock on output_dir/.sapo.lock, held through `fd` (see `lock_output_dir`). The
    kernel drops it when the process dies, so a lock file left behind by a killed run is free
    again (its contents only name the holder)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        # The file stays: unlinking it would let a third run lock a new inode while a second
        # one still waits on (or holds) the old one.
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self) -> None:
        # At interpreter exit module globals (os included) may already be gone; the kernel
        # closes the descriptor and drops the lock anyway.
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except Exception:  # noqa: BLE001, S110 - `os` itself may be None by then
                pass


def lock_output_dir(output_dir: str | Path) -> OutputDirLock:
    """Create output_dir if needed and lock it for this run; a CheckpointError naming the holder
    if another run has it."""
    root = Path(output_dir)
    path = root / LOCK_FILE
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise _unusable(root, err) from None
    try:
        # A few tries: another process's check_output_dir_free holds a shared lock for a moment.
        _flock_or_raise(fd, root, path, fcntl.LOCK_EX, tries=5)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except CheckpointError:
        os.close(fd)
        raise
    except OSError as err:  # the record did not fit (a full disk): unlocked with the close
        os.close(fd)
        raise CheckpointError(f"output_dir={str(root)!r}: could not write {path}: {os_reason(err)}") from None
    return OutputDirLock(path, fd)


def check_output_dir_usable(output_dir: str | Path) -> None:
    """Raise as `lock_output_dir` would, writing nothing: when another run holds output_dir (a
    shared lock taken and dropped at once; a run's exclusive one excludes it), or when it cannot
    be created or written to."""
    root = Path(output_dir)
    existing = next(p for p in (root, *root.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise _unusable(root, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing)))
    for bad, failed in ((errno.EROFS, os.statvfs(existing).f_flag & os.ST_RDONLY),
                        (errno.EACCES, not os.access(existing, os.W_OK | os.X_OK))):
        if failed:
            raise _unusable(root, OSError(bad, os.strerror(bad), str(existing)))
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: no run has held it; one that cannot be read fails at lock_output_dir
    try:
        _flock_or_raise(fd, root, path, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def _unusable(root: Path, err: OSError) -> CheckpointError:
    return CheckpointError(f"output_dir={str(root)!r} cannot be used: {os_reason(err)}; choose a directory you can "
                           "write to")


def _flock_or_raise(fd: int, root: Path, path: Path, mode: int, tries: int = 1) -> None:
    for attempt in range(tries):
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise CheckpointError(f"output_dir={str(root)!r}: cannot lock {path}: {os_reason(err)}") from None
            if attempt == tries - 1:
                holder = _read_holder(fd)
                raise CheckpointError(f"output_dir {root} is in use by pid {holder.get('pid', '?')} on host "
                                      f"{holder.get('host', '?')} (started {holder.get('started', '?')}); wait for "
                                      "that run to end, or use another output_dir") from None
            time.sleep(0.05)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}  # being written by its holder at this moment


def os_reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror} ({err.filename})" if err.filename else err.strerror
    return str(err) or type(err).__name__
