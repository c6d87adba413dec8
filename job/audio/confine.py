"""What a process that parses hostile bytes may not do, and what its parent does for it.

The decoding child (job.audio.child) is where FFmpeg's parsers meet originals from strangers.
Should a crafted file take the child over, these fences decide what it gets. Each needs no
privilege, so each works as a container's ordinary user under Docker's default seccomp
profile and on GKE; where a kernel or sandbox refuses one, the job runs on without it and the
parent says so once (`describe`).

- `protect_parent()`: the parent is not dumpable, so no process of its uid (the child) can
  read its memory or /proc/<pid>/environ, where HTTP_TOKEN and JOB_MESSAGE live.
- `confine()`, in the child before it reads the original: it drops every capability (a child
  of a root parent could otherwise override file permissions and read any process), then
  loads a seccomp filter (no_new_privs needs no privilege) that refuses, with EACCES:
  sockets of any family (so the metadata server and its service-account tokens, the
  emulators and every network peer are out of reach), io_uring (which can open sockets and
  files around the filter), opening any file for writing and every change to names, modes,
  owners and times (the child writes only into the file it opened before confining), exec,
  new processes (threads only), signals to anyone but itself, and reading other processes.
- `probe(parent)`: what is in force, tried rather than assumed: a socket, the parent's
  environ, /dev/null for writing. The parent logs the answer once.

Not fenced: reading what the uid may read (other files in the scratch folder, the model, a
mounted key file), CPU and memory within the child's limits (job.audio.child bounds them),
and what it writes on its own pipes (its answer, which the parent checks, and its stderr).
"""

import ctypes
import errno
import os
import socket

PR_SET_DUMPABLE = 4
CAP_VERSION_3 = 0x20080522
# open(2) flags that write, create or truncate (asm-generic values: x86-64 and arm64 alike)
O_WRITES = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND)
CLONE_THREAD = 0x00010000

NETWORK = ("socket", "socketpair", "io_uring_setup", "io_uring_enter", "io_uring_register")
CHANGES = (
    "creat",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "mknod",
    "mknodat",
    "chmod",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "truncate",
    "utime",
    "utimes",
    "utimensat",
    "futimesat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "open_by_handle_at",
)
PROCESSES = (
    "execve",
    "execveat",
    "fork",
    "vfork",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_open",
    "pidfd_getfd",
    "pidfd_send_signal",
    "tkill",
    "unshare",
    "setns",
)
SELF_ONLY = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")  # first argument: a pid
NOT_THERE = ("openat2", "clone3")  # arguments behind a pointer: callers fall back to the old call
PROBED = ("network", "parentEnviron", "writes")

_libc = ctypes.CDLL(None, use_errno=True)


def protect_parent() -> bool:
    """Make this process non-dumpable (PR_SET_DUMPABLE 0); False where that is refused."""
    return _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_capabilities() -> str:
    """Drop every capability of this process (always allowed: it only lowers them)."""
    none = (_CapData * 2)()
    if _libc.capset(ctypes.byref(_CapHeader(CAP_VERSION_3, 0)), none) != 0:
        return f"refused ({os.strerror(ctypes.get_errno())})"
    return "dropped"


def preload() -> None:
    """Load libseccomp before the child opens anything: pyseccomp finds it with ctypes'
    find_library, which runs ldconfig as a process of its own (a pipe and /dev/null, for a
    moment). Done first, the decoder's descriptors are only ever its answer and its files."""
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        pass  # confine() reports it when it tries the filter


def _filter():
    """The seccomp filter: everything allowed but what the module docstring lists."""
    import pyseccomp as seccomp  # loads libseccomp; ImportError/RuntimeError where it is absent

    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    rules.set_attr(seccomp.Attr.CTL_TSYNC, 1)  # every thread of the process, not just this one
    refuse = seccomp.ERRNO(errno.EACCES)

    def add(action, name, *args):
        number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
        if number != -1:  # -1: unknown to libseccomp; other negatives: not on this CPU
            rules.add_rule(action, number, *args)

    for name in NETWORK + CHANGES + PROCESSES:
        add(refuse, name)
    for name in NOT_THERE:
        add(seccomp.ERRNO(errno.ENOSYS), name)
    for name, flags in (("open", 1), ("openat", 2)):
        for bit in O_WRITES:
            add(refuse, name, seccomp.Arg(flags, seccomp.MASKED_EQ, bit, bit))
    add(refuse, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0))
    for name in SELF_ONLY:
        add(refuse, name, seccomp.Arg(0, seccomp.NE, os.getpid()))
    return rules


def confine() -> dict:
    """Fence this process in (see the module docstring); what was put in place, by fence.
    Call it before any thread starts: capabilities are per thread."""
    done = {"capabilities": drop_capabilities()}
    try:
        _filter().load()
        done["seccomp"] = "loaded"
    except (ImportError, RuntimeError, OSError) as exc:  # no libseccomp, or the kernel refused
        done["seccomp"] = f"refused ({type(exc).__name__}: {exc})"
    return done


def _tried(action) -> str:
    try:
        action()
    except OSError as exc:
        return f"refused ({errno.errorcode.get(exc.errno, exc.errno)})"
    return "open"


def probe(parent: int) -> dict:
    """What this process can still do, tried: each value is `refused (ERRNO)` or `open`."""
    return {
        "network": _tried(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
        "parentEnviron": _tried(lambda: os.close(os.open(f"/proc/{parent}/environ", os.O_RDONLY))),
        "writes": _tried(lambda: os.close(os.open(os.devnull, os.O_WRONLY))),
    }


def describe(found: dict) -> tuple[bool, str]:
    """(every fence holds, one line) for the parent's log, from the child's confine + probe."""
    held = found.get("seccomp") == "loaded" and all(
        str(found.get(name, "")).startswith("refused") for name in PROBED
    )
    return held, ", ".join(f"{name} {value}" for name, value in found.items())
