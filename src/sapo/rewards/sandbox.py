"""Running untrusted, model-written programs.

A program never runs in the trainer's process. Each run gets:
- bubblewrap (`bwrap`): new user, PID, network, IPC and UTS namespaces (no network at all);
  only the system's /usr and the interpreter's own directories (read-only), a fresh /proc and
  /dev; `/` and `/dev` read-only; the only writable places, /tmp, /dev/shm and the working
  directory /sandbox, are tmpfs of `Limits.tmp_bytes` each, inside the namespace (nothing of a
  run is written on the host's disk, so there is nothing there to race for or clean up);
  an empty environment, no capabilities, no nested user namespaces, and a seccomp filter
  (`sandbox_seccomp`) that refuses mounts, namespaces, ptrace and other kernel attack surface;
  the program is PID 1 of its namespace, so whatever it leaves dies with it; killed with its parent;
- a non-root uid of its own when the trainer runs as root, so that the process limit applies to
  that program alone (one uid per run: the limit counts all processes of a uid);
- rlimits through `prlimit`: CPU seconds, address space, file size, processes, open files;
- where the trainer's cgroup v2 allows it, a cgroup of its own bounding its total memory,
  processes and CPU (`sandbox_cgroup`); where not, a warning says so once;
- a wall-clock timeout and a cap on the output read back; everything is killed at either.

`bwrap`, `prlimit` and `setpriv` are resolved to absolute paths once, and the start-up check
runs the chosen interpreter in the sandbox: one that cannot run there raises
SandboxUnavailable naming it, rather than scoring every program 0.

If bubblewrap cannot start here (not installed, or user namespaces disabled), `Sandbox()`
raises SandboxUnavailable, saying why, unless `allow_unsandboxed=True`: then programs run with
the rlimits, the unprivileged uid, the empty environment and a temporary directory only (made
so that no other user can redirect the trainer's writes, removed without following links), a
warning is logged, and what a program leaves running is killed when it exits.
"""

from __future__ import annotations

import contextlib
import logging
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

from ..errors import SandboxUnavailable
from .sandbox_cgroup import RunCgroup, find_base
from .sandbox_fs import remove_tree
from .sandbox_seccomp import SeccompUnavailable, compile_filter

log = logging.getLogger(__name__)

NOBODY = 65534
MAX_CONCURRENCY = 64
WORKDIR = "/sandbox"  # the program's working directory inside bwrap: a tmpfs of its own


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
        done = subprocess.run([shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={uid}",
                               "--clear-groups", "--", "/bin/true"],
                              check=False, capture_output=True, timeout=30)
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


def _run_uids() -> _RunUids:
    global _RUN_UIDS
    with _RUN_UIDS_LOCK:
        if _RUN_UIDS is None:
            _RUN_UIDS = _RunUids()
    return _RUN_UIDS


def _run_uid() -> int:
    return _run_uids().take()


def _private_uids() -> bool:
    """Whether each run gets a uid no other run (or user) has: then every process of that uid is
    the run's, and a sweep by uid kills exactly what it left."""
    return _run_uids().count > 1


@dataclass
class Limits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 512 << 20  # per process; with `processes` it bounds the total (without a cgroup)
    file_bytes: int = 16 << 20
    processes: int = 16
    tmp_bytes: int = 64 << 20  # each of /tmp, /dev/shm and the working directory, in RAM
    output_bytes: int = 1 << 20
    total_memory_bytes: int = 2 << 30  # the whole program, its files in RAM included: only with a cgroup
    cpus: float = 1.0  # CPUs' worth of time at once: only with a cgroup


@dataclass
class Result:
    status: str  # "ok" (exited), "timeout", "output_limit", "infra" (the sandbox itself failed)
    returncode: int | None
    stdout: str
    stderr: str


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


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
        # Looked up once: a run must use the very programs the start-up check used, whatever PATH is later.
        self._tools = {name: shutil.which(name) for name in ("bwrap", "prlimit", "setpriv", "sh", "kill")}
        # The system interpreter: the trainer's may live where an unprivileged uid cannot read (e.g. under /root).
        self.python = python or next((p for p in ("/usr/bin/python3",) if os.path.exists(p)), sys.executable)
        self._interpreter = os.path.realpath(self.python)
        # The probe below runs a program as an isolated run would: isolated until it says otherwise.
        self._seccomp, self._cgroup_base, self._binds, self.isolated = b"", None, [], True
        self.isolated, why = self._probe_bubblewrap()
        if not self.isolated:
            message = ("code rewards need bubblewrap with user namespaces to run model-written programs without "
                       f"network and outside the trainer (apt-get install bubblewrap; here: {why})")
            if not allow_unsandboxed:
                raise SandboxUnavailable(message + "; or set allow_unsandboxed_code=true to run them with rlimits "
                                         "only, with network access")
            if os.geteuid() == 0 and not _private_uids():
                # All runs would share one uid on the host: a daemon left by one program could
                # rewrite the next one's files or output, and no sweep by uid can tell runs apart.
                raise SandboxUnavailable(message + "; allow_unsandboxed_code=true as root needs a uid of its own for "
                                         "each program, and this machine maps too few uids (see /proc/self/uid_map)")
            warnings.warn("UNSANDBOXED CODE EXECUTION: " + message, RuntimeWarning, stacklevel=2)
        self._binds = _interpreter_dirs(self._interpreter) if self.isolated else []
        self._cgroup_base, missing = find_base()
        self._check_interpreter()
        if self._cgroup_base is None:
            _warn_once(f"code sandbox: no cgroup per run ({missing}); a program's memory, processes and CPU are "
                       "bounded per process by rlimits only (see docs/rewards.md)")

    def _probe_bubblewrap(self) -> tuple[bool, str]:
        missing = [n for n in ("bwrap", "prlimit", "setpriv") if self._tools[n] is None]
        if missing:
            return False, f"{', '.join(missing)} not found on PATH"
        try:
            self._seccomp = compile_filter()
        except SeccompUnavailable as err:
            return False, str(err)
        result = self._attempt(None, "", binds=False)
        return result.status == "ok" and result.returncode == 0, _last_line(result.stderr) or result.status

    def _check_interpreter(self) -> None:
        """Run the interpreter as a program will be run: a missing or unreadable one would
        otherwise score every program 0 without a word."""
        if not os.access(self._interpreter, os.X_OK):
            raise SandboxUnavailable(f"the code sandbox's interpreter {self.python} is not an executable file")
        result = self._attempt("print(6 * 7)", "")
        if result.status != "ok" or result.returncode != 0 or result.stdout.strip() != "42":
            raise SandboxUnavailable(f"the code sandbox's interpreter {self.python} ({self._interpreter}) does not "
                                     f"run there: {_last_line(result.stderr) or result.status}; pass python= an "
                                     "interpreter that every user can read, such as /usr/bin/python3")

    def run_python(self, program: str, stdin: str = "") -> Result:
        """Run `program` with `python -I` (stdlib only, no user site, no PYTHON* variables)."""
        with self._turns:
            for attempt in range(5):
                result = self._attempt(program, stdin)
                # Without root, a killed run's processes count against our uid until its namespace
                # has died, which takes a moment; a new namespace may not start until then.
                if result.status != "infra":
                    break
                time.sleep(0.25 * (attempt + 1))
        return result

    def _attempt(self, program: str | None, stdin: str, *, binds: bool = True) -> Result:
        """One run of `program` (None: /usr/bin/true) in a sandbox of its own."""
        lim = self.limits
        uid = _run_uid() if os.geteuid() == 0 else None
        cgroup, host_dir, files = None, None, contextlib.ExitStack()
        try:
            if self._cgroup_base is not None:
                cgroup = RunCgroup(self._cgroup_base, memory_bytes=lim.total_memory_bytes, processes=lim.processes,
                                   cpus=lim.cpus, shell=self._tools["sh"] or "/bin/sh")
            if self.isolated:
                # Nothing of the run is on the host's disk: the program is copied from an unnamed
                # file into the sandbox's own working directory, so there is no path to race for.
                fds = [_unnamed_file(files, program.encode() if program is not None else b""),
                       _unnamed_file(files, self._seccomp)]
                argv = [self._interpreter, "-I", f"{WORKDIR}/program.py"] if program is not None else ["/usr/bin/true"]
                cmd = self._rlimits(uid) + self._bwrap(fds[0], fds[1], binds) + argv
                cwd = "/"
            else:
                fds = []
                host_dir, cwd = _host_dir(program or "", uid)
                argv = ([self._interpreter, "-I", os.path.join(cwd, "program.py")] if program is not None
                        else ["/usr/bin/true"])
                cmd = self._rlimits(uid) + argv
            if cgroup is not None:
                cmd = cgroup.prefix + cmd
            return self._run(cmd, cwd, stdin, fds, uid)
        except OSError as err:
            return Result("infra", None, "", f"could not prepare the run: {err}")
        finally:
            files.close()
            if cgroup is not None:
                cgroup.close()
            if host_dir is not None:
                problem = remove_tree(host_dir)
                if problem:
                    _warn_once(f"code sandbox: {problem}")

    def _rlimits(self, uid: int | None) -> list[str]:
        lim = self.limits
        if uid is not None:
            # Root is exempt from RLIMIT_NPROC, so the program runs as an unprivileged uid of its
            # own, where the limit counts its processes alone.
            nproc, drop = lim.processes, [self._tools["setpriv"], f"--reuid={uid}", f"--regid={uid}",
                                          "--clear-groups", "--"]
        else:
            # RLIMIT_NPROC counts every thread of our uid: the trainer's, and those of the programs
            # running beside this one. Allow those, and a full budget for each of them.
            nproc, drop = _user_tasks() + lim.processes * self.concurrency, []
        return [self._tools["prlimit"] or "prlimit", f"--cpu={lim.cpu_seconds}", f"--as={lim.memory_bytes}",
                f"--fsize={lim.file_bytes}", f"--nproc={nproc}", "--nofile=64", "--", *drop]

    def _bwrap(self, program_fd: int, seccomp_fd: int, binds: bool) -> list[str]:
        size = str(self.limits.tmp_bytes)
        # Only the system's /usr (merged-/usr layout) and the interpreter are visible: no host files, sockets or data.
        cmd = [self._tools["bwrap"] or "bwrap", "--ro-bind", "/usr", "/usr"]
        for link in ("bin", "sbin", "lib", "lib64"):
            if os.path.exists(f"/usr/{link}"):
                cmd += ["--symlink", f"usr/{link}", f"/{link}"]
        # Every writable place is a tmpfs of bounded size; / and /dev (tmpfs of half the RAM each
        # by default) are made read-only once set up.
        cmd += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm",
                "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", WORKDIR]
        for path in self._binds if binds else []:  # after the tmpfs: an interpreter may live under /tmp
            cmd += ["--ro-bind", path, path]
        cmd += ["--file", str(program_fd), f"{WORKDIR}/program.py", "--chdir", WORKDIR,
                "--remount-ro", "/dev", "--remount-ro", "/",
                "--unshare-all", "--unshare-user", "--disable-userns", "--seccomp", str(seccomp_fd),
                # The program is PID 1 of its namespace: when it exits everything it left dies, and
                # bwrap leaves no reaper process orphaned to us (a zombie per run were we PID 1).
                "--as-pid-1", "--die-with-parent", "--new-session",
                "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--cap-drop", "ALL"]
        return cmd

    def _run(self, cmd: list[str], cwd: str, stdin: str, fds: list[int], uid: int | None) -> Result:
        lim = self.limits
        deadline = time.monotonic() + lim.wall_seconds
        # bwrap reports on this pipe when the program has started: only a run that never started
        # is an infrastructure failure (the program's own stderr could say anything).
        status_r, status_w = os.pipe() if self.isolated else (None, None)
        if status_w is not None:
            at = cmd.index("--unshare-all")
            cmd = [*cmd[:at], "--json-status-fd", str(status_w), *cmd[at:]]
        try:
            process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, cwd=cwd, env={"PATH": "/usr/bin:/bin"},
                                       start_new_session=True, pass_fds=(*fds, *([status_w] if status_w else [])))
        except OSError as err:
            for fd in (status_r, status_w):
                if fd is not None:
                    os.close(fd)
            return Result("infra", None, "", f"could not start the sandbox: {err}")
        if status_w is not None:
            os.close(status_w)
        # Feed stdin from a thread: a program that reads and prints as it goes must not block us.
        threading.Thread(target=_feed, args=(process.stdin, stdin.encode()), daemon=True).start()
        status, buffers = self._collect(process, deadline, uid)
        if status != "ok":
            self._sweep(process, uid, by_uid=True)
        try:
            returncode = process.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            status = "timeout"
            self._sweep(process, uid, by_uid=True)
            returncode = process.wait()
        started = b"child-pid" in _read_all(status_r) if status_r is not None else True
        stdout = buffers[0][: lim.output_bytes].decode(errors="replace")
        stderr = buffers[1][: lim.output_bytes].decode(errors="replace")
        if not started:
            status = "infra"
        return Result(status, returncode, stdout, stderr)

    def _collect(self, process: subprocess.Popen, deadline: float, uid: int | None) -> tuple[str, list[bytearray]]:
        """Read the program's output until it and everything it started are gone, or a limit."""
        selector = selectors.DefaultSelector()
        buffers = [bytearray(), bytearray()]
        for i, stream in enumerate((process.stdout, process.stderr)):
            selector.register(stream, selectors.EVENT_READ, i)
        exited = _pidfd(process.pid)
        if exited is not None:
            selector.register(exited, selectors.EVENT_READ, "exited")
        status, drain_until = "ok", None
        try:
            while True:
                now = time.monotonic()
                if drain_until is None and process.poll() is not None:
                    # The program is done. What it left running (a daemon holding our pipes, when
                    # not isolated) is killed, and only what was already written is read.
                    self._sweep(process, uid, by_uid=not self.isolated)
                    drain_until = now + 1.0
                    if exited is not None:
                        selector.unregister(exited)
                if not any(key.data != "exited" for key in selector.get_map().values()):
                    break
                if drain_until is not None and now >= drain_until:
                    break
                if now >= deadline:
                    status = "timeout"
                    break
                wait = min(deadline, drain_until or deadline) - now
                for key, _ in selector.select(timeout=min(wait, 0.5 if exited is not None else 0.05)):
                    if key.data == "exited":
                        continue
                    chunk = os.read(key.fileobj.fileno(), 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    buffers[key.data] += chunk
                    if len(buffers[0]) + len(buffers[1]) > self.limits.output_bytes:
                        status = "output_limit"
                if status != "ok":
                    break
        finally:
            selector.close()
            if exited is not None:
                os.close(exited)
        return status, buffers

    def _sweep(self, process: subprocess.Popen, uid: int | None, *, by_uid: bool) -> None:
        """Kill the run's session; under bwrap its namespace dies with it (--die-with-parent).
        With `by_uid` (unsandboxed, or a run killed at a limit), every process of the run's uid
        too, where that uid is the run's alone: a daemon that left the session, or a program that
        got past its parent-death signal."""
        try:
            os.killpg(process.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.kill()
        except OSError:
            pass
        if by_uid and uid is not None and _private_uids() and self._tools["kill"]:
            # kill(-1) as that uid signals every process of the uid, atomically (a forking daemon
            # cannot outrun it), and nothing else.
            try:
                subprocess.run([self._tools["kill"], "-9", "-1"], user=uid, group=uid, extra_groups=[],
                               check=False, capture_output=True, timeout=10)
            except (OSError, subprocess.SubprocessError):
                pass


def _interpreter_dirs(interpreter: str) -> list[str]:
    """The directories outside /usr that `interpreter` needs: its own and its prefixes
    (a conda or pyenv Python); each is bound read-only into the sandbox."""
    dirs = {os.path.dirname(interpreter)}
    try:
        done = subprocess.run([interpreter, "-I", "-c",
                               "import sys; print(sys.base_prefix); print(sys.base_exec_prefix)"],
                              check=False, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
        dirs.update(os.path.realpath(p) for p in done.stdout.split("\n") if p.startswith("/"))
    except (OSError, subprocess.SubprocessError):
        pass  # then the start-up check says the interpreter does not run
    outside = sorted(d for d in dirs if d != "/" and not (d + "/").startswith("/usr/"))
    return [d for d in outside if not any(d.startswith(o + "/") for o in outside if o != d)]


def _host_dir(program: str, uid: int | None) -> tuple[str, str]:
    """(a directory to remove afterwards, the run's working directory in it) for an unsandboxed
    run. The program file is made before anyone else can write there, and the working directory
    is handed to the run's uid (0700) inside a root-only parent that others can pass, not list or
    write: no other user can swap a path the trainer then follows."""
    parent = tempfile.mkdtemp(prefix="sapo-sandbox-")
    try:
        work = os.path.join(parent, "run")
        os.mkdir(work, 0o700)
        fd = os.open(os.path.join(work, "program.py"),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(program)
        if uid is not None:
            os.chown(work, uid, uid)
            os.chmod(parent, 0o711)
    except OSError:
        remove_tree(parent)
        raise
    return parent, work


def _unnamed_file(stack: contextlib.ExitStack, data: bytes) -> int:
    """A descriptor of a file with no name holding `data` (bwrap copies it in)."""
    fd = os.memfd_create("sapo-sandbox", os.MFD_CLOEXEC)
    stack.callback(os.close, fd)
    with open(fd, "wb", closefd=False) as f:
        f.write(data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None  # an older kernel: poll instead


def _read_all(fd: int) -> bytes:
    """What was written to the pipe `fd`, without waiting for writers that are still around; closes it."""
    os.set_blocking(fd, False)
    data = bytearray()
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return bytes(data)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


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
