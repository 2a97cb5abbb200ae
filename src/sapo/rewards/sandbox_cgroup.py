"""A cgroup (v2) for each sandboxed run, where the kernel lets this process make one.

rlimits bound each process of a program, not the program: its RAM-backed files, its kernel
memory, the sum over its processes and its share of the CPUs escape them. A cgroup bounds
them all (`memory.max`, `pids.max`, `cpu.max`). It needs the trainer's own cgroup v2 to let
children have the memory, pids and cpu controllers: a cgroup v2 system with the trainer in a
delegated cgroup (or root) whose processes do not block it. Where that is not so, `find_base`
says what is missing, and the sandbox says it once at start-up.
"""

from __future__ import annotations

import os
import secrets
import time

CONTROLLERS = ("memory", "pids", "cpu")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def find_base(mountinfo: str = "/proc/self/mountinfo", own: str = "/proc/self/cgroup") -> tuple[str | None, str]:
    """(the trainer's cgroup v2 directory, "") when runs can have cgroups below it, else
    (None, what is missing)."""
    try:
        mounts = [line.split(" - ")[0].split()[3:5] for line in _read(mountinfo).splitlines()
                  if line.split(" - ")[-1].startswith("cgroup2 ")]
        path = next((line[3:] for line in _read(own).splitlines() if line.startswith("0::")), None)
    except (OSError, IndexError) as err:
        return None, f"cannot read the cgroup mounts ({err})"
    if not mounts:
        return None, "no cgroup v2 filesystem is mounted"
    if path is None:
        return None, "this process is in no cgroup v2"
    root, point = mounts[0]
    relative = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    base = os.path.normpath(os.path.join(point, relative))
    try:
        available = _read(os.path.join(base, "cgroup.controllers")).split()
        enabled = _read(os.path.join(base, "cgroup.subtree_control")).split()
    except OSError as err:
        return None, f"cannot read the cgroup {base} ({err})"
    missing = [c for c in CONTROLLERS if c not in available]
    if missing:
        return None, (f"the cgroup v2 at {base} has no {'/'.join(missing)} controller (on a hybrid cgroup v1 system "
                      "they belong to v1)")
    if not os.access(base, os.W_OK):
        return None, f"the cgroup {base} is not writable by this user (no delegation)"
    wanted = [c for c in CONTROLLERS if c not in enabled]
    if wanted:
        try:
            _write(os.path.join(base, "cgroup.subtree_control"), " ".join(f"+{c}" for c in wanted))
        except OSError as err:
            return None, (f"cannot enable {'/'.join(wanted)} for the children of {base} ({err}; a cgroup that holds "
                          "processes cannot: start the trainer in a cgroup whose processes sit in a leaf below it)")
    return base, ""


class RunCgroup:
    """One run's cgroup; `prefix` goes in front of the run's command to start it inside."""

    def __init__(self, base: str, *, memory_bytes: int, processes: int, cpus: float, shell: str) -> None:
        self.path = os.path.join(base, f"sapo-run-{os.getpid()}-{secrets.token_hex(6)}")
        os.mkdir(self.path, 0o755)
        try:
            _write(os.path.join(self.path, "memory.max"), str(memory_bytes))
            if os.path.exists(os.path.join(self.path, "memory.swap.max")):
                _write(os.path.join(self.path, "memory.swap.max"), "0")
            _write(os.path.join(self.path, "pids.max"), str(processes))
            _write(os.path.join(self.path, "cpu.max"), f"{max(1000, int(cpus * 100_000))} 100000")
        except OSError:
            self.close()
            raise
        # The shell moves itself in, then becomes the run (same process), so nothing it starts is outside.
        self.prefix = [shell, "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(self.path, "cgroup.procs")]

    def close(self) -> None:
        """Kill what is left and remove the cgroup; never raises."""
        kill = os.path.join(self.path, "cgroup.kill")
        for attempt in range(10):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                pass
            try:
                if os.path.exists(kill):
                    _write(kill, "1")
            except OSError:
                pass
            time.sleep(0.05 * (attempt + 1))
