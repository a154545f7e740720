"""Run untrusted Python (model or teacher output) in a contained child process.

Used to run tests against corpus modules (:mod:`trackb_core.testrun`, for the unit_test
family's verdict), which both the dataset's strict filters and eval's execution metrics
call. Human-eval style
guards are not a sandbox (field notes §2); this one layers what a single process on
Linux can do without privileges it may not have:

- a child ``python -I`` (no PYTHON* variables, no user site) in a fresh temporary
  working folder, with a scrubbed environment (``HOME`` and ``TMPDIR`` inside it), stdin
  from /dev/null, in its own session so that the whole process group is killed on
  timeout and after it exits;
- rlimits set by the child before any untrusted line runs, soft = hard so they cannot
  be raised: address space (``memory_mb``), CPU seconds, file size, open files, core
  dumps, processes (which does not bind root: see below);
- no network: the child unshares a new user + network namespace (only a downed
  loopback), recorded as ``network_isolation="netns"``; where that is not allowed (a
  pod without user namespaces) it refuses every socket instead, ``"socket_blocked"``;
- an audit hook (:func:`sys.addaudithook`, which code cannot remove) that refuses
  process creation (``os.fork``, ``os.forkpty``, ``os.system``, ``os.posix_spawn``,
  ``os.exec*``, ``os.spawn*``, ``subprocess.Popen``, and ``_posixsubprocess``), signals
  to other processes, raising rlimits, ``ctypes`` lookups of fork/exec/socket/unshare
  style symbols, Unix-socket connections, and opening, creating, renaming, removing or
  changing files outside the working folder. RLIMIT_NPROC does not stop a fork bomb
  run as root, so this hook is what does.

Each refused action raises PermissionError in the child and is reported in
``SandboxResult.refused``. The audit hook is a guard, not a security boundary against
code written to escape it; on Kubernetes the pod adds its own (deny-all egress
NetworkPolicy, non-root user, memory limits).

``run_python`` never raises for anything the code does; ``status`` says what happened:
``ok`` (exit 0), ``failed`` (non-zero exit: an exception, a refused action, ``sys.exit``),
``timeout`` (wall-clock limit; the group was killed), ``killed`` (a signal or a resource
limit: memory, CPU, file size; ``reason`` names it), ``error`` (the sandbox itself could
not run the code).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

OUTPUT_CHARS = 20_000
MARKER = "\x1etrackb-sandbox "  # lines the child's bootstrap writes to stderr for us
MEMORY_EXIT = 113  # the bootstrap's exit code for an uncaught MemoryError

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

# Set once a child could not unshare: every later child blocks sockets without trying.
_NETNS_REFUSED = False

# Runs in the child as ``python -I -c BOOTSTRAP SPEC_JSON`` before the untrusted code.
BOOTSTRAP = r'''
import sys


def _bootstrap():
    import json, os, resource
    spec = json.loads(sys.argv[1])
    marker = spec["marker"]

    def note(text):
        os.write(2, (marker + text + "\n").encode())

    limits = {
        resource.RLIMIT_AS: spec["memory_bytes"],
        resource.RLIMIT_CPU: spec["cpu_seconds"],
        resource.RLIMIT_FSIZE: spec["file_bytes"],
        resource.RLIMIT_NOFILE: spec["open_files"],
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_NPROC: spec["processes"],
    }
    for which, value in limits.items():
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            # cannot lower below current usage (NOFILE/NPROC): keep the lowest allowed
            soft, hard = resource.getrlimit(which)
            resource.setrlimit(which, (hard, hard))

    isolation = "socket_blocked"
    if spec["try_netns"]:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(ctypes.c_int(spec["clone_flags"])) == 0:
            isolation = "netns"
    note("isolation " + isolation)

    root = os.path.realpath(spec["workdir"])
    writable = (root, "/dev/null")
    sys.dont_write_bytecode = True
    sys.path[:] = [root, *spec["python_path"], *[p for p in sys.path if p]]

    process_events = {
        "os.fork", "os.forkpty", "os.system", "os.posix_spawn", "os.posix_spawnp", "os.spawn",
        "os.exec", "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
        "resource.setrlimit", "resource.prlimit", "pty.spawn", "os.setns", "os.unshare",
    }
    # event -> (indexes of path arguments, indexes of dir_fd arguments)
    path_events = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.rename": ((0, 1), (2, 3)),
        "os.link": ((1,), (3,)), "os.symlink": ((1,), (2,)), "os.truncate": ((0,), ()),
        "os.utime": ((0,), (3,)), "shutil.rmtree": ((0,), (1,)),
        "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "os.chflags": ((0,), ()),
        "os.lchflags": ((0,), ()), "os.lchmod": ((0,), ()), "os.mkfifo": ((0,), (2,)),
        "os.mknod": ((0,), (3,)),
    }
    socket_events = {
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
        "socket.getnameinfo",
    }
    dangerous_symbols = ("fork", "vfork", "clone", "clone3", "system", "popen", "execv",
                         "execve", "execvp", "execvpe", "execl", "execle", "execlp",
                         "posix_spawn", "posix_spawnp", "socket", "connect", "kill", "unshare",
                         "setns", "ptrace", "syscall", "setrlimit", "prlimit", "prlimit64")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    noted = set()

    def refuse(what):
        if what not in noted:
            noted.add(what)
            note("refused " + what)
        raise PermissionError(f"sandbox refused {what}")

    def inside(path):
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return False  # an fd or an object: cannot tell where it points
        real = os.path.realpath(path)
        return any(real == w or real.startswith(w + os.sep) for w in writable)

    def hook(event, args):
        if event in process_events:
            refuse(event)
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writes and not isinstance(path, int) and not inside(path):
                refuse(f"open for writing: {path}")
        elif event in path_events:
            paths, dir_fds = path_events[event]
            for i in dir_fds:
                if i < len(args) and isinstance(args[i], int) and args[i] >= 0:
                    refuse(f"{event} relative to a directory descriptor")
            for i in paths:
                if i < len(args) and not inside(args[i]):
                    refuse(f"{event}: {args[i]}")
        elif event.startswith("socket."):
            if isolation == "socket_blocked" and event in socket_events:
                refuse(event)
            if event in ("socket.connect", "socket.bind", "socket.sendto") and args:
                address = args[1] if len(args) > 1 else None
                if isinstance(address, (str, bytes)):
                    refuse(event + " to a Unix socket")
        elif event == "ctypes.dlsym" and len(args) > 1:
            name = args[1] if isinstance(args[1], str) else str(args[1])
            if name.lstrip("_") in dangerous_symbols:
                refuse("ctypes symbol " + name)

    sys.addaudithook(hook)
    import _posixsubprocess

    def no_fork_exec(*args, **kwargs):
        refuse("_posixsubprocess.fork_exec")

    _posixsubprocess.fork_exec = no_fork_exec

    with open(spec["code_file"], encoding="utf-8") as handle:
        code = compile(handle.read(), "<sandbox>", "exec")
    import types
    main = types.ModuleType("__main__")
    main.__file__ = os.path.join(root, "__main__.py")
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    except MemoryError:
        sys.stdout.flush()
        note("memory")
        os._exit(spec["memory_exit"])
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass


_bootstrap()
'''


@dataclass
class SandboxResult:
    """What happened to code run by :func:`run_python` (see the module docstring)."""

    status: str  # "ok" | "failed" | "timeout" | "killed" | "error"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    network_isolation: str  # "netns" | "socket_blocked"
    reason: str = ""  # why it was killed or errored; empty for ok/failed
    refused: list[str] = field(default_factory=list)  # actions the audit hook refused
    truncated: bool = False  # stdout or stderr was cut to OUTPUT_CHARS

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _read_tail(path: Path, limit: int) -> tuple[str, bool]:
    """The first ``limit`` characters of a file (the start says what went wrong first)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limit * 4 + 1)
    except OSError:
        return "", False
    text = data.decode("utf-8", errors="replace")
    return text[:limit], len(text) > limit or len(data) > limit * 4


def _checked_relative(name: str) -> Path:
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"sandbox file name must be a relative path inside it: {name!r}")
    return relative


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, *, files: dict[str, str] | None = None, timeout: float = 10.0,
               memory_mb: int = 1024, file_size_mb: int = 16, open_files: int = 256,
               processes: int = 512, python_path: list[str | Path] | None = None,
               output_chars: int = OUTPUT_CHARS, network: str = "auto") -> SandboxResult:
    """Run ``code`` as ``__main__`` in a contained child process; never raises for what
    the code does.

    ``files`` (relative path -> text) are written into the child's working folder, which
    is first on its ``sys.path`` and deleted afterwards. ``python_path`` folders follow it
    on ``sys.path``, readable but not writable (a corpus, for sibling imports). The CPU
    limit is the timeout rounded down plus two seconds. ``network="auto"`` tries a network
    namespace and falls back to refusing sockets; ``"socket_blocked"`` skips the try.

    Raises ValueError for a file name that is absolute or leaves the folder, or for an
    unknown ``network``.
    """
    global _NETNS_REFUSED
    if network not in ("auto", "socket_blocked"):
        raise ValueError(f"network must be 'auto' or 'socket_blocked', not {network!r}")
    relative_files = {_checked_relative(name): text for name, text in (files or {}).items()}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="trackb-sandbox-") as scratch:
        meta = Path(scratch) / "meta"  # ours: the code and the captured output
        work = Path(scratch) / "work"  # the child's: its cwd, HOME and TMPDIR
        meta.mkdir()
        (work / "tmp").mkdir(parents=True)
        for relative, text in relative_files.items():
            target = work / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        code_file = meta / "main.py"
        code_file.write_text(str(code), encoding="utf-8")
        spec = {
            "marker": MARKER, "workdir": str(work), "code_file": str(code_file),
            "python_path": [str(p) for p in (python_path or [])],
            "memory_bytes": int(memory_mb) * 1024 * 1024,
            "cpu_seconds": int(timeout) + 2, "file_bytes": int(file_size_mb) * 1024 * 1024,
            "open_files": int(open_files), "processes": int(processes),
            "try_netns": network == "auto" and not _NETNS_REFUSED, "clone_flags": CLONE_NEWUSER | CLONE_NEWNET,
            "memory_exit": MEMORY_EXIT,
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work / "tmp"),
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0"}
        stdout_path, stderr_path = meta / "stdout", meta / "stderr"
        try:
            with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
                process = subprocess.Popen(
                    [sys.executable, "-I", "-X", "utf8", "-c", BOOTSTRAP, json.dumps(spec)],
                    cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True, close_fds=True)
                timed_out = False
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(process)  # the child's leftovers too, on every path
                    process.wait()
        except OSError as exc:
            return SandboxResult("error", None, "", "", time.monotonic() - started,
                                 "socket_blocked", reason=f"could not start python: {exc}")
        seconds = time.monotonic() - started
        stdout, cut_out = _read_tail(stdout_path, output_chars)
        raw_err, cut_err = _read_tail(stderr_path, output_chars + 4096)

    notes = [line[len(MARKER):] for line in raw_err.split("\n") if line.startswith(MARKER)]
    stderr = "\n".join(line for line in raw_err.split("\n")
                       if not line.startswith(MARKER))[:output_chars]
    isolation = next((n.split(" ", 1)[1] for n in notes if n.startswith("isolation ")),
                     "socket_blocked")
    if spec["try_netns"] and isolation == "socket_blocked" and notes:
        _NETNS_REFUSED = True
    refused = [n.split(" ", 1)[1] for n in notes if n.startswith("refused ")]
    code_rc = process.returncode

    def result(status: str, reason: str = "") -> SandboxResult:
        return SandboxResult(status, code_rc, stdout, stderr, round(seconds, 3), isolation,
                             reason=reason, refused=refused, truncated=cut_out or cut_err)

    if timed_out:
        return result("timeout", f"no exit within {timeout:g} s; process group killed")
    if not notes:
        return result("error", "the sandbox bootstrap did not start: " + stderr[-500:])
    if code_rc == MEMORY_EXIT and "memory" in notes:
        return result("killed", f"memory limit ({memory_mb} MiB address space)")
    if code_rc is not None and code_rc < 0:
        signame = signal.Signals(-code_rc).name if -code_rc in signal.Signals._value2member_map_ \
            else str(-code_rc)
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit",
               "SIGKILL": "killed", "SIGSEGV": "segmentation fault (often the memory limit)"}
        return result("killed", f"{signame}: {why.get(signame, 'signal')}")
    if code_rc == 0:
        return result("ok")
    return result("failed", "refused: " + ", ".join(refused) if refused else "")


def network_isolation_available() -> bool:
    """True if a child can get its own network namespace here (a quick probe)."""
    return run_python("pass", timeout=10).network_isolation == "netns"

