"""The sandbox itself (`sapo.rewards.sandbox`): what a hostile program, or another user of the
machine, must not be able to do to the trainer or the host. Every process started here has a
timeout, so a hang fails instead of blocking."""

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sapo.rewards.sandbox import Limits, Sandbox, SandboxUnavailable

LIMITS = Limits(wall_seconds=10.0, cpu_seconds=5, memory_bytes=512 << 20, file_bytes=4 << 20, processes=64,
                tmp_bytes=8 << 20, output_bytes=1 << 16)
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root: runs processes as other uids")


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS)


def unsandboxed(monkeypatch, limits=LIMITS, **kwargs):
    """A Sandbox that believes bubblewrap is missing: the path that runs programs on the host."""
    real_which = shutil.which
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
        with pytest.warns(RuntimeWarning, match="UNSANDBOXED"):
            return Sandbox(limits, allow_unsandboxed=True, **kwargs)


def run_json(sandbox, program):
    result = sandbox.run_python(textwrap.dedent(program))
    assert result.status == "ok" and result.returncode == 0, result
    return json.loads(result.stdout.strip().splitlines()[-1])


# 1. Another user racing the run directory.

WATCHER = """
import os, sys, time
tmp, target, until = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
swaps = 0
while time.monotonic() < until:
    try:
        names = [n for n in os.listdir(tmp) if n.startswith("sapo-sandbox-")]
    except OSError:
        continue
    for name in names:
        for sub in ("program.py", "run/program.py"):
            link = os.path.join(tmp, name, sub + ".x")
            try:
                os.symlink(target, link)
                os.rename(link, os.path.join(tmp, name, sub))
                swaps += 1
            except OSError:
                pass
print(swaps)
"""


@needs_root
@pytest.mark.parametrize("mode", ["isolated", "unsandboxed"])
def test_another_user_cannot_make_the_trainer_write_or_expose_a_file(monkeypatch, mode):
    secret_dir = tempfile.mkdtemp()  # root-only
    target = os.path.join(secret_dir, "secret")
    with open(target, "w") as f:
        f.write("root only")
    os.chmod(target, 0o600)
    # A /tmp of this test's own (sticky, world-writable), so the watcher races only these runs.
    scratch = tempfile.mkdtemp()
    os.chmod(scratch, 0o1777)
    monkeypatch.setattr(tempfile, "tempdir", scratch)
    box = Sandbox(LIMITS) if mode == "isolated" else unsandboxed(monkeypatch)
    watcher = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", "/usr/bin/python3",
                                "-c", WATCHER, scratch, target, "60"], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            box.run_python("print('model output')")
            assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    finally:
        watcher.kill()
        watcher.communicate(timeout=10)
    with open(target) as f:
        assert f.read() == "root only"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600 and os.stat(target).st_uid == 0
    shutil.rmtree(secret_dir)
    shutil.rmtree(scratch)


# 2. RAM-backed filesystems.

FILL = """
import errno, json, os
out = {}
for place in ("/", "/dev", "/dev/shm", "/tmp", "."):
    written, error = 0, None
    try:
        for i in range(64):  # up to 64 files of 1 MiB: 64 MiB, 8 times the limit
            with open(os.path.join(place, f"fill{i}"), "wb") as f:
                f.write(b"0" * (1 << 20))
            written += 1 << 20
    except OSError as err:
        error = errno.errorcode[err.errno]
    out[place] = [written, error]
print(json.dumps(out))
"""


def test_writing_past_the_limits_fails_everywhere(sandbox):
    got = run_json(sandbox, FILL)
    assert got["/"][1] == "EROFS" and got["/dev"][1] == "EROFS", got
    for place in ("/dev/shm", "/tmp", "."):
        written, error = got[place]
        assert error == "ENOSPC" and written <= LIMITS.tmp_bytes, (place, got)


def test_an_honest_program_can_write_in_its_directory_and_tmp(sandbox):
    program = """
    import json, os
    for path in ("notes.txt", "/tmp/notes.txt", "/dev/shm/notes.txt"):
        with open(path, "w") as f:
            f.write("kept")
    print(json.dumps([open(p).read() for p in ("notes.txt", "/tmp/notes.txt", "/dev/shm/notes.txt")]))
    """
    assert run_json(sandbox, program) == ["kept"] * 3


# 3. Kernel attack surface.

ESCAPES = """
import ctypes, errno, json, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def call(name, fn):
    result = fn()
    out[name] = "ok" if result == 0 else errno.errorcode.get(ctypes.get_errno(), str(result))
    if result == 0 and name.startswith("clone"):
        os._exit(0)  # the child of a clone that should have failed
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET = 0x10000000, 0x00020000, 0x40000000
call("unshare user", lambda: libc.unshare(CLONE_NEWUSER))
call("unshare user+net+mount", lambda: libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS))
call("unshare mount", lambda: libc.unshare(CLONE_NEWNS))
call("mount", lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
call("ptrace", lambda: libc.ptrace(16, 1, None, None))
fd = os.open("/proc/self/ns/net", os.O_RDONLY)
call("setns", lambda: libc.setns(fd, 0))
call("clone newuser", lambda: libc.syscall(56, CLONE_NEWUSER | 17, None, None, None, None))
call("bpf", lambda: libc.syscall(321, 0, None, 0))
call("keyctl", lambda: libc.syscall(250, 0, 0, 0, 0, 0))
# Memory no rlimit counts (SysV IPC, memfd), and clearing the parent-death signal (a program that
# is PID 1 of its namespace would then outlive a run killed at its time limit).
call("shmget", lambda: 0 if libc.shmget(0, 1 << 20, 0o1600) >= 0 else -1)
call("msgget", lambda: 0 if libc.msgget(0, 0o1600) >= 0 else -1)
call("semget", lambda: 0 if libc.semget(0, 1, 0o1600) >= 0 else -1)
call("memfd_create", lambda: 0 if libc.memfd_create(b"x", 0) >= 0 else -1)
call("prctl PR_SET_PDEATHSIG", lambda: libc.prctl(1, 0, 0, 0, 0))
call("prctl PR_SET_NAME", lambda: libc.prctl(15, b"fine", 0, 0, 0))
if hasattr(os, "unshare"):
    try:
        os.unshare(CLONE_NEWUSER)
        out["os.unshare"] = "ok"
    except OSError as err:
        out["os.unshare"] = errno.errorcode[err.errno]
util = subprocess.run(["unshare", "-U", "true"], capture_output=True, text=True, timeout=10)
out["unshare -U"] = util.returncode
# What programs need still works: threads (clone3 refused, glibc falls back to clone) and processes.
box = []
thread = threading.Thread(target=box.append, args=(1,))
thread.start()
thread.join()
out["thread"] = box == [1]
out["subprocess"] = subprocess.run(["true"], timeout=10).returncode
print(json.dumps(out))
"""


def test_no_namespaces_mounts_or_tracing_inside(sandbox):
    got = run_json(sandbox, ESCAPES)
    for name in ("unshare user", "unshare user+net+mount", "unshare mount", "mount", "ptrace", "setns",
                 "clone newuser", "bpf", "keyctl", "os.unshare", "shmget", "msgget", "semget", "memfd_create",
                 "prctl PR_SET_PDEATHSIG"):
        assert got.pop(name, "EPERM") == "EPERM", (name, got)
    assert got == {"unshare -U": 1, "thread": True, "subprocess": 0, "prctl PR_SET_NAME": "ok"}


def test_a_program_killed_at_its_time_limit_leaves_nothing_running():
    marker = f"sapo-outlive-{os.getpid()}"
    program = (f"import ctypes, time\n# {marker}\nctypes.CDLL(None).prctl(1, 0, 0, 0, 0)\n"
               "print('ready', flush=True)\ntime.sleep(120)\n")
    result = Sandbox(Limits(wall_seconds=2.0, cpu_seconds=5, processes=64, tmp_bytes=8 << 20)).run_python(program)
    assert result.status == "timeout", result
    time.sleep(1.0)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            if b"/sandbox/program.py" in cmdline and _mentions(pid, marker):
                left.append(pid)
        except OSError:
            pass
    for pid in left:
        os.kill(int(pid), 9)
    assert not left, f"processes left running after the run: {left}"


def _mentions(pid: str, marker: str) -> bool:
    """Whether process `pid` runs the program holding `marker` (its file is inside the sandbox)."""
    try:
        with open(f"/proc/{pid}/root/sandbox/program.py") as f:
            return marker in f.read()
    except OSError:
        return False  # gone, or not one of ours


def test_a_foreign_architecture_call_kills_the_program(sandbox):
    # unshare(CLONE_NEWUSER) by its x32 number, which a filter that looked only at numbers would miss.
    program = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "print('returned', libc.syscall(0x40000000 | 272, 0x10000000), ctypes.get_errno(), flush=True)")
    result = sandbox.run_python(program)
    assert result.returncode == 128 + 31 and "returned" not in result.stdout, result  # SIGSYS


# 4. cgroups.

def test_missing_cgroup_support_is_said_once_at_start_up(caplog):
    from sapo.rewards import sandbox as module
    from sapo.rewards.sandbox_cgroup import find_base

    base, missing = find_base()
    module._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="sapo.rewards.sandbox"):
        Sandbox(LIMITS)
        Sandbox(LIMITS)
    said = [r.getMessage() for r in caplog.records if "cgroup" in r.getMessage()]
    if base is None:
        assert len(said) == 1 and missing in said[0] and "rlimits only" in said[0]
    else:
        assert said == []


def test_cgroup_detection_names_what_is_missing(tmp_path):
    from sapo.rewards.sandbox_cgroup import find_base

    cg = tmp_path / "cg"
    (cg / "trainer").mkdir(parents=True)
    (tmp_path / "mountinfo").write_text(f"30 25 0:26 / {cg} rw,relatime - cgroup2 cgroup2 rw\n")
    (tmp_path / "cgroup").write_text("0::/trainer\n")
    (cg / "trainer" / "cgroup.controllers").write_text("cpu io pids\n")
    (cg / "trainer" / "cgroup.subtree_control").write_text("")
    files = {"mountinfo": str(tmp_path / "mountinfo"), "own": str(tmp_path / "cgroup")}
    base, missing = find_base(**files)
    assert base is None and "no memory controller" in missing and str(cg / "trainer") in missing
    (cg / "trainer" / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert find_base(**files) == (str(cg / "trainer"), "")  # enabled for the children by writing subtree_control
    assert (cg / "trainer" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    (tmp_path / "mountinfo").write_text("30 25 0:26 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
    assert find_base(**files) == (None, "no cgroup v2 filesystem is mounted")


def test_a_run_cgroup_gets_its_limits_and_starts_the_run_inside(tmp_path):
    from sapo.rewards.sandbox_cgroup import RunCgroup

    run = RunCgroup(str(tmp_path), memory_bytes=1 << 30, processes=16, cpus=0.5, shell="/bin/sh")
    limits = {name: (tmp_path / run.path / name).read_text() for name in ("memory.max", "pids.max", "cpu.max")}
    assert limits == {"memory.max": str(1 << 30), "pids.max": "16", "cpu.max": "50000 100000"}
    done = subprocess.run([*run.prefix, "/bin/sh", "-c", "echo $$"], check=False, capture_output=True, text=True,
                          timeout=10)
    assert (tmp_path / run.path / "cgroup.procs").read_text().strip() == done.stdout.strip()  # the same process
    run.close()  # a plain directory with files cannot be removed: close must not raise


# 6. Cleanup that a program can break.

LEFTOVERS = {
    "3000 deep": "import os\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\nopen('f', 'w').write('x')",
    "10000 deep": "import os\nfor _ in range(10000):\n    os.mkdir('d')\n    os.chdir('d')",
    "unreadable directories": ("import os\nos.makedirs('a/b/c')\nopen('a/b/c/f', 'w').write('x')\n"
                               "os.chmod('a/b', 0)\nos.chmod('a', 0)"),
    "links to host files": ("import os\nos.symlink('{victim}', 'file')\nos.symlink('{victim_dir}', 'dir')\n"
                            "os.mkdir('sub')\nos.symlink('{victim_dir}', 'sub/dir')"),
}


@pytest.mark.parametrize("mode", ["isolated", "unsandboxed"])
@pytest.mark.parametrize("name", list(LEFTOVERS))
def test_what_a_program_leaves_behind_never_breaks_the_run(monkeypatch, tmp_path, mode, name):
    scratch = tempfile.mkdtemp()
    os.chmod(scratch, 0o755)  # the run's uid passes through it, as through /tmp
    monkeypatch.setattr(tempfile, "tempdir", scratch)
    victim_dir = tmp_path / "host"
    victim_dir.mkdir()
    (victim_dir / "keep").write_text("host data")
    (tmp_path / "file").write_text("host file")
    box = Sandbox(LIMITS) if mode == "isolated" else unsandboxed(monkeypatch)
    program = LEFTOVERS[name].format(victim=tmp_path / "file", victim_dir=victim_dir) + "\nprint('done')"
    result = box.run_python(program)
    assert result.status == "ok" and result.stdout == "done\n", result
    assert (victim_dir / "keep").read_text() == "host data" and (tmp_path / "file").read_text() == "host file"
    assert os.listdir(scratch) == []
    os.rmdir(scratch)


def test_tree_removal_restores_its_own_unreadable_directories():
    """Without root, a mode-000 directory of our own cannot be entered until its mode is restored."""
    from sapo.rewards.sandbox_fs import remove_tree

    tmp_path = Path(tempfile.mkdtemp())  # under /tmp, which another uid can pass through
    top = tmp_path / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_text("x")
    os.chmod(top / "a" / "b", 0)
    os.chmod(top / "a", 0)
    if ROOT:  # as another uid, so that permissions apply: the tree is handed to it
        for path in (tmp_path, top, top / "a", top / "a" / "b", top / "a" / "b" / "f"):
            os.chown(path, 65534, 65534)
        os.chmod(tmp_path, 0o755)
        # That uid may not read the checkout or the virtual environment (CI's lives in a 0700
        # directory): it runs a copy of the module (standard library only) with the base interpreter.
        module = tmp_path / "sandbox_fs.py"
        shutil.copyfile(remove_tree.__code__.co_filename, module)
        os.chmod(module, 0o644)
        code = ("import importlib.util as u; s = u.spec_from_file_location('fs', " + repr(str(module)) + "); "
                f"m = u.module_from_spec(s); s.loader.exec_module(m); print(m.remove_tree({str(top)!r}))")
        python = os.path.realpath(sys.executable)
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", python, "-I", "-B", "-c", code]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
        assert done.stdout.strip() == "None", done
        module.unlink()
    else:
        assert remove_tree(str(top)) is None
    assert not top.exists()
    os.rmdir(tmp_path)


# 7. Silent zeros and hangs.

def test_an_interpreter_outside_usr_runs_inside():
    prefix = tempfile.mkdtemp(prefix="sapo-python-")
    try:
        os.chmod(prefix, 0o755)
        os.mkdir(os.path.join(prefix, "bin"))
        shutil.copy2(os.path.realpath("/usr/bin/python3"), os.path.join(prefix, "bin", "python3"))
        result = Sandbox(LIMITS, python=os.path.join(prefix, "bin", "python3")).run_python("print(6 * 7)")
        assert (result.status, result.returncode, result.stdout) == ("ok", 0, "42\n"), result
    finally:
        shutil.rmtree(prefix)


def test_an_interpreter_that_cannot_run_there_fails_at_start_up(tmp_path):
    with pytest.raises(SandboxUnavailable, match="interpreter /nonexistent/python3 "):
        Sandbox(LIMITS, python="/nonexistent/python3")
    if ROOT:  # the run's uid cannot read under a root-only directory (as with a python under /root)
        hidden = tmp_path / "bin"
        hidden.mkdir()
        shutil.copy2(os.path.realpath("/usr/bin/python3"), hidden / "python3")
        with pytest.raises(SandboxUnavailable, match=f"interpreter {hidden / 'python3'} .*every user can read"):
            Sandbox(LIMITS, python=str(hidden / "python3"))


DAEMON = """
import os, sys, time
if os.fork() == 0:
    {detach}
    print(os.getpid(), flush=True)
    time.sleep(60)
    os._exit(0)
time.sleep(0.2)
print("main done", flush=True)
"""


@pytest.mark.parametrize("detach", ["pass", "os.setsid()"])
def test_an_unsandboxed_daemon_does_not_hold_the_trainer(monkeypatch, detach):
    box = unsandboxed(monkeypatch, Limits(**{**LIMITS.__dict__, "wall_seconds": 30.0}))
    results = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: results.append(box.run_python(DAEMON.format(detach=detach))), daemon=True)
    thread.start()
    thread.join(timeout=15)
    assert results, "run_python still waiting for the daemon after 15 s"
    assert time.monotonic() - started < 5
    result = results[0]
    assert result.status == "ok" and "main done" in result.stdout, result
    daemon = int(next(line for line in result.stdout.split() if line.isdigit()))
    if ROOT:  # a uid of its own: the detached daemon is found and killed too
        time.sleep(0.5)
        assert not os.path.exists(f"/proc/{daemon}") or "zombie" in Path(f"/proc/{daemon}/status").read_text()


@needs_root
def test_unsandboxed_runs_as_root_need_a_uid_each(monkeypatch):
    # With one shared uid, a daemon left by one program rewrote the next programs' files (5 of 5
    # later honest runs printed what it chose), and no sweep by uid can tell the runs apart.
    from sapo.rewards import sandbox as module

    shared = module._RunUids.__new__(module._RunUids)
    shared.first, shared.count, shared._next, shared._lock = module.NOBODY, 1, 0, threading.Lock()
    monkeypatch.setattr(module, "_RUN_UIDS", shared)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
    with pytest.raises(SandboxUnavailable, match="needs a uid of its own for each program"):
        Sandbox(LIMITS, allow_unsandboxed=True)


PID1 = """
import os, sys
from sapo.rewards.sandbox import Limits, Sandbox
box = Sandbox(Limits(wall_seconds=5))
assert os.getpid() == 1
for _ in range(20):
    assert box.run_python("print(1)").stdout == "1\\n"
box.run_python("import os, time\\nif os.fork() == 0:\\n    time.sleep(30)\\nprint(2)")
zombies = [e for e in os.listdir("/proc")
           if e.isdigit() and open(f"/proc/{e}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"]
print(len(zombies))
"""


@needs_root
def test_a_trainer_that_is_pid_1_is_left_no_zombies():
    src = os.path.dirname(os.path.dirname(__import__("sapo").__file__))
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", PID1],
                          check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": src})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0", done.stdout


def test_the_tools_found_at_start_up_are_the_ones_run(monkeypatch, tmp_path):
    tools = tempfile.mkdtemp(prefix="sapo-tools-")
    try:
        os.chmod(tools, 0o755)
        log = os.path.join(tools, "log")
        open(log, "w").close()
        os.chmod(log, 0o666)
        wrapper = os.path.join(tools, "bwrap")
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\necho run >> {log}\nexec {shutil.which('bwrap')} \"$@\"\n")
        os.chmod(wrapper, 0o755)
        monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
        box = Sandbox(LIMITS)
        before = len(Path(log).read_text().split())
        assert before >= 1
        monkeypatch.setenv("PATH", "/nonexistent")
        assert box.run_python("print(1)").stdout == "1\n"
        assert len(Path(log).read_text().split()) == before + 1
    finally:
        shutil.rmtree(tools)
