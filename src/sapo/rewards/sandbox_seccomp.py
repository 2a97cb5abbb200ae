"""The seccomp filter bubblewrap installs on a sandboxed program (`bwrap --seccomp FD`).

Everything is allowed except the system calls behind most container escapes and kernel
exploits, which fail with EPERM: new namespaces and mounts (the program could gain full
capabilities in a nested user namespace and reach kernel code unprivileged users never can),
tracing and reading other processes' memory, kernel modules, keyrings, BPF, perf, io_uring,
userfaultfd, memory that no rlimit counts (SysV IPC, memfd), and clearing the parent-death signal.
`clone3` fails with ENOSYS: its flags live in memory a filter cannot read, and
glibc then falls back to `clone`, whose flags are checked here.

The filter is compiled by libseccomp (through the `pyseccomp` ctypes binding), which also
kills a process that makes a system call of a foreign architecture (32-bit or x32 calls on
x86_64), so the numbers below cannot be dodged.
"""

from __future__ import annotations

import errno
import tempfile

DENIED = (
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key",
    "open_by_handle_at", "name_to_handle_at",
    "swapon", "swapoff", "reboot", "acct", "quotactl", "syslog", "lookup_dcookie", "vhangup",
    # Memory outside every rlimit: a detached SysV segment no longer counts against RLIMIT_AS
    # (one program held 2 GiB under a 512 MiB limit), nor do message queues or memfd pages.
    # The standard library's shared memory lives in /dev/shm, a bounded tmpfs here.
    "shmget", "shmat", "shmdt", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl",
    "semget", "semop", "semtimedop", "semctl", "memfd_create", "memfd_secret",
)
PR_SET_PDEATHSIG = 1  # the program is PID 1 of its namespace: clearing the signal bwrap set
# would let it outlive a run that was killed at its time limit

# clone() flags that make a namespace. (CLONE_NEWTIME, 0x80, is only taken by unshare and
# clone3; in clone() those bits are the exit signal.)
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)


class SeccompUnavailable(RuntimeError):
    pass


def compile_filter() -> bytes:
    """The filter as classic BPF, for `bwrap --seccomp`."""
    try:
        import pyseccomp as seccomp
    except ImportError as err:  # the package is missing, or libseccomp.so.2 is not on the system
        raise SeccompUnavailable(f"the sandbox needs libseccomp and its Python binding (pip install pyseccomp; "
                                 f"apt-get install libseccomp2): {err}") from err
    except (OSError, TypeError) as err:  # pyseccomp loads the library on import
        raise SeccompUnavailable(f"libseccomp cannot be loaded (apt-get install libseccomp2): {err}") from err
    deny = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED:
        try:
            rules.add_rule(deny, name)
        except OSError:
            pass  # not a system call on this architecture (libseccomp knows them all by name)
    for flag in NAMESPACE_FLAGS:
        rules.add_rule(deny, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    rules.add_rule(deny, "prctl", seccomp.Arg(0, seccomp.EQ, PR_SET_PDEATHSIG))
    with tempfile.TemporaryFile() as out:
        rules.export_bpf(out)
        out.seek(0)
        return out.read()
