"""Removing a directory tree that a hostile program wrote (the unsandboxed mode's run directory).

`shutil.rmtree` recurses once per level, so a tree nested a few thousand deep raises
RecursionError; and it stops at a directory it cannot enter (mode 000 without root). This
walk keeps one directory open at a time, never follows a symbolic link (every open is
relative to the directory above, with O_NOFOLLOW), and checks on the way back up that `..`
is the directory it came down from: a process still running could move a subdirectory
elsewhere (e.g. into /tmp), and following `..` from there would delete someone else's files.
"""

from __future__ import annotations

import os
import stat

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str) -> str | None:
    """Remove `path` and everything under it. Never raises; returns None when it is all gone,
    else why not."""
    try:
        fd = os.open(path, _DIR)
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"cannot open {path}: {err}"
    failed: set[tuple[int, int]] = set()  # (st_dev, st_ino) of what could not be removed: not retried
    above: list[tuple[str, int, int]] = []  # (name, st_dev, st_ino) of each directory open above, top first
    problem = None
    try:
        while True:
            child = _clear_files(fd, failed)
            if child is not None:
                name, sub = child
                here = os.fstat(fd)
                above.append((name, here.st_dev, here.st_ino))
                os.close(fd)
                fd = sub
                continue
            if not above:
                break
            name, dev, ino = above.pop()
            parent = os.open("..", _DIR, dir_fd=fd)
            back = os.fstat(parent)
            if (back.st_dev, back.st_ino) != (dev, ino):
                os.close(parent)
                return f"a directory under {path} was moved while it was being removed; left in place"
            gone = os.fstat(fd)
            os.close(fd)
            fd = parent
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError as err:
                failed.add((gone.st_dev, gone.st_ino))
                problem = problem or f"cannot remove a directory under {path}: {err}"
    except OSError as err:
        return f"cannot remove {path}: {err}"
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError as err:
        return problem or f"cannot remove {path}: {err}"
    return None


def _clear_files(fd: int, failed: set[tuple[int, int]]) -> tuple[str, int] | None:
    """Unlink every non-directory in the directory `fd`; return the first subdirectory that
    can be opened (its name and an open fd), or None when only failed ones are left."""
    with os.scandir(fd) as entries:
        listed = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in listed:
        if not is_dir:
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError:
                pass  # then the rmdir above it fails and says so
            continue
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in failed or not stat.S_ISDIR(info.st_mode):
            continue
        try:
            return name, os.open(name, _DIR, dir_fd=fd)
        except PermissionError:
            pass
        except OSError:
            failed.add((info.st_dev, info.st_ino))
            continue
        # Mode 000 and we are not root: the directory is ours (the program ran as our uid), so
        # give it back its owner bits. Through an O_PATH descriptor, so a link swapped in meanwhile
        # cannot redirect the chmod.
        try:
            handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                if stat.S_ISDIR(os.fstat(handle).st_mode):
                    os.chmod(f"/proc/self/fd/{handle}", 0o700)
            finally:
                os.close(handle)
            return name, os.open(name, _DIR, dir_fd=fd)
        except OSError:
            failed.add((info.st_dev, info.st_ino))
    return None
