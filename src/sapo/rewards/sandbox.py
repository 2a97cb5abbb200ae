"""Running untrusted, model-written programs.

A program never runs in the trainer's process. Each run gets a fresh temporary directory and:
- bubblewrap (`bwrap`): new user, PID, network, IPC and UTS namespaces (no network at all), the
  host filesystem read-only, a private /tmp, only its own directory writable, an empty
  environment, no capabilities, killed with its parent;
- a non-root uid of its own when the trainer runs as root, so that the process limit applies to
  that program alone (one uid per run: the limit counts all processes of a uid);
- rlimits through `prlimit`: CPU seconds, address space, file size, processes, open files;
- a wall-clock timeout and a cap on the output read back; everything is killed at either.

If bubblewrap cannot start here (not installed, or user namespaces disabled), `Sandbox()`
raises SandboxUnavailable, saying why, unless `allow_unsandboxed=True`: then programs run with
the rlimits, the empty environment and the temporary directory only, and a warning is logged.
"""

from __future__ import annotations

import os
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

from ..config import ConfigError

NOBODY = 65534
MAX_CONCURRENCY = 64


class _RunUids:
    """Under root, each program runs as a uid of its own: unprivileged, mapped in this user
    namespace (containers map fewer uids), below 2^31, and not shared with any run still alive
    or dying (a killed run's processes take a moment to go and would count against a new run's
    process limit). The upper half of the largest mapped range is walked from a random start,
    so other trainers on the machine are unlikely to meet the same uids."""

    def __init__(self) -> None:
        first, count = max(_mapped_uid_ranges(), key=lambda r: r[1], default=(NOBODY, 1))
        first, count = max(first, 1 << 16), min(first + count, (1 << 31) - 1) - max(first, 1 << 16)
        self.first, self.count = (first + count // 2, count - count // 2) if count > (1 << 16) else (NOBODY, 1)
        if self.count > 1 and not _can_become(self.first):
            self.first, self.count = NOBODY, 1
        self._next = secrets.randbelow(self.count)
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            self._next = (self._next + 1) % self.count
            return self.first + self._next


def _can_become(uid: int) -> bool:
    try:
        done = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", "/bin/true"],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _mapped_uid_ranges() -> list[tuple[int, int]]:
    """(first uid, count) of each range of /proc/self/uid_map, in this namespace's numbering."""
    try:
        with open("/proc/self/uid_map") as f:
            return [(int(line.split()[0]), int(line.split()[2])) for line in f if line.strip()]
    except (OSError, ValueError, IndexError):
        return []


_RUN_UIDS: _RunUids | None = None
_RUN_UIDS_LOCK = threading.Lock()


def _run_uid() -> int:
    global _RUN_UIDS
    with _RUN_UIDS_LOCK:
        if _RUN_UIDS is None:
            _RUN_UIDS = _RunUids()
    return _RUN_UIDS.take()


class SandboxUnavailable(ConfigError):
    """The isolation the sandbox needs cannot be set up on this machine."""


@dataclass
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 512 << 20  # per process; with `processes` it bounds the total
    file_bytes: int = 16 << 20
    processes: int = 16
    tmp_bytes: int = 64 << 20  # the private /tmp, in RAM
    output_bytes: int = 1 << 20


@dataclass
class Result:
    status: str  # "ok" (exited), "timeout", "output_limit", "infra" (the sandbox itself failed)
    returncode: int | None
    stdout: str
    stderr: str


class Sandbox:
    def __init__(self, limits: Limits | None = None, *, allow_unsandboxed: bool = False,
                 python: str | None = None, concurrency: int = 4) -> None:
        """`concurrency`: programs run at once at most (more callers wait their turn). Under root
        each has a process budget of its own, so none fails for what runs beside it."""
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be in [1, {MAX_CONCURRENCY}], got {concurrency}")
        self.limits = limits or Limits()
        self.concurrency = concurrency
        self._turns = threading.BoundedSemaphore(concurrency)
        # The system interpreter: the trainer's may live where an unprivileged uid cannot read (e.g. under /root).
        self.python = python or next((p for p in ("/usr/bin/python3",) if os.path.exists(p)), sys.executable)
        self.isolated = self._probe()
        if not self.isolated:
            message = ("code rewards need bubblewrap with user namespaces to run model-written programs without "
                       "network and outside the trainer (apt-get install bubblewrap)")
            if not allow_unsandboxed:
                raise SandboxUnavailable(message + "; or set allow_unsandboxed_code=true to run them with rlimits only, "
                                         "with network access")
            warnings.warn("UNSANDBOXED CODE EXECUTION: " + message, RuntimeWarning, stacklevel=2)

    def _probe(self) -> bool:
        if shutil.which("bwrap") is None or shutil.which("prlimit") is None:
            return False
        with tempfile.TemporaryDirectory() as work:
            os.chmod(work, 0o777)
            try:
                done = subprocess.run(self._command(work, ["/bin/true"], isolated=True), capture_output=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                return False
        return done.returncode == 0

    def _command(self, work: str, argv: list[str], *, isolated: bool, status_fd: int | None = None) -> list[str]:
        lim = self.limits
        if os.geteuid() == 0:
            # Root is exempt from RLIMIT_NPROC, so the program runs as an unprivileged uid of its
            # own, where the limit counts its processes alone.
            uid = _run_uid()
            nproc, drop = lim.processes, ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        else:
            # RLIMIT_NPROC counts every thread of our uid: the trainer's, and those of the programs
            # running beside this one. Allow those, and a full budget for each of them.
            nproc, drop = _user_tasks() + lim.processes * self.concurrency, []
        cmd = ["prlimit", f"--cpu={lim.cpu_seconds}", f"--as={lim.memory_bytes}", f"--fsize={lim.file_bytes}",
               f"--nproc={nproc}", "--nofile=64", "--", *drop]
        if isolated:
            # Only the system's /usr (merged-/usr layout) is visible: no host files, sockets or data.
            cmd += ["bwrap", "--ro-bind", "/usr", "/usr"]
            for link in ("bin", "sbin", "lib", "lib64"):
                if os.path.exists(f"/usr/{link}"):
                    cmd += ["--symlink", f"usr/{link}", f"/{link}"]
            cmd += ["--size", str(lim.tmp_bytes), "--tmpfs", "/tmp", "--dev", "/dev", "--proc", "/proc",
                    "--bind", work, work, "--chdir", work, "--unshare-all", "--die-with-parent", "--new-session",
                    "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--cap-drop", "ALL"]
            if status_fd is not None:
                cmd += ["--json-status-fd", str(status_fd)]
        return cmd + argv

    def run_python(self, program: str, stdin: str = "") -> Result:
        """Run `program` with `python -I` (stdlib only, no user site, no PYTHON* variables)."""
        try:
            work = tempfile.mkdtemp(prefix="sapo-sandbox-")
        except OSError as err:
            return Result("infra", None, "", f"no temporary directory: {err}")
        try:
            os.chmod(work, 0o777)
            path = os.path.join(work, "program.py")
            with open(path, "w") as f:
                f.write(program)
            os.chmod(path, 0o644)
            argv = [self.python, "-I", path]
            with self._turns:
                for attempt in range(5):
                    result = self._run(work, argv, stdin)
                    # Without root, a killed run's processes count against our uid until its namespace
                    # has died, which takes a moment; a new namespace may not start until then.
                    if result.status != "infra":
                        break
                    time.sleep(0.25 * (attempt + 1))
            return result
        except OSError as err:
            return Result("infra", None, "", f"could not prepare the run: {err}")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _run(self, work: str, argv: list[str], stdin: str) -> Result:
        lim = self.limits
        deadline = time.monotonic() + lim.wall_seconds
        # bwrap reports on this pipe when the program has started: only a run that never started
        # is an infrastructure failure (the program's own stderr could say anything).
        status_r, status_w = os.pipe()
        cmd = self._command(work, argv, isolated=self.isolated, status_fd=status_w if self.isolated else None)
        try:
            process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       cwd=work, env={"PATH": "/usr/bin:/bin"}, start_new_session=True,
                                       pass_fds=(status_w,))
        except OSError as err:
            os.close(status_r)
            os.close(status_w)
            return Result("infra", None, "", f"could not start the sandbox: {err}")
        os.close(status_w)
        # Feed stdin from a thread: a program that reads and prints as it goes must not block us.
        threading.Thread(target=_feed, args=(process.stdin, stdin.encode()), daemon=True).start()
        selector = selectors.DefaultSelector()
        buffers = {process.stdout: bytearray(), process.stderr: bytearray()}
        for stream in buffers:
            selector.register(stream, selectors.EVENT_READ)
        status = "ok"
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status = "timeout"
                break
            for key, _ in selector.select(timeout=min(remaining, 0.5)):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffers[key.fileobj] += chunk
                if sum(len(b) for b in buffers.values()) > lim.output_bytes:
                    status = "output_limit"
                    break
            if status != "ok":
                break
        if status != "ok":
            _kill(process)
        try:
            returncode = process.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            status = "timeout"
            _kill(process)
            returncode = process.wait()
        selector.close()
        with os.fdopen(status_r, "rb") as f:
            started = b"child-pid" in f.read()
        stdout = buffers[process.stdout][: lim.output_bytes].decode(errors="replace")
        stderr = buffers[process.stderr][: lim.output_bytes].decode(errors="replace")
        if self.isolated and not started:
            status = "infra"
        return Result(status, returncode, stdout, stderr)


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, OSError):
        pass


def _user_tasks() -> int:
    """Processes and threads of this uid: what RLIMIT_NPROC counts."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                pass
    return count


def _kill(process: subprocess.Popen) -> None:
    """Kill the whole session: bwrap's namespace dies with it (--die-with-parent)."""
    try:
        os.killpg(process.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    process.kill()
