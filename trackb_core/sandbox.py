"""Run untrusted Python (model, teacher or corpus code) in a contained child process.

Every test trackb runs goes through :func:`run_python` (via :mod:`trackb_core.testrun`):
the dataset's strict filters, eval's execution metrics. Human-eval style guards are not
a sandbox (field notes §2); this one layers what the kernel offers an unprivileged
process, so that it holds in a pod (no user namespaces, no capabilities) as on a laptop:

- a child ``python -I`` in a fresh working folder (its cwd, ``HOME`` and ``TMPDIR``),
  with a scrubbed environment (no secret ever reaches it), stdin from /dev/null, in its
  own session so the whole process group is killed on timeout and after it exits;
- in the child, before any untrusted byte runs (:mod:`trackb_core.sandbox_child`):
  rlimits; a private network namespace where user namespaces are allowed; **Landlock**
  where the kernel offers it (read only the interpreter, libraries and the corpus view
  it is given, write only its folder, no TCP, no signals or abstract Unix sockets
  outside); ``PR_SET_NO_NEW_PRIVS`` and a **seccomp** filter (no processes, no exec, no
  sockets but ``socketpair(AF_UNIX)``, no ptrace, pidfds, namespaces, mounts, bpf,
  io_uring, keyrings; signals only to itself); then an audit hook as a cheap first line;
- the **minimum** isolation is seccomp, plus Landlock wherever the kernel offers it;
  running under gVisor (``TRACKB_SANDBOX_RUNTIME=gvisor``, set by the pod spec) counts
  as meeting it. With ``require_minimum`` the child refuses to run the code below it
  (status ``below_minimum``); :func:`probe` tells a stage before it starts;
- disk: ``RLIMIT_FSIZE`` caps each file, and the parent accounts the folder while the
  code runs and kills it past ``disk_mb`` or :data:`MAX_ENTRIES` entries (there is no
  private mount in a pod; the pod's ephemeral-storage limit is the outer wall);
- output is read back from descriptors the parent opened itself (a FIFO or a symlink
  the code leaves behind changes nothing), capped; the folder is removed iteratively, so
  a 3,000-deep tree of its making cannot break the clean-up.

Processes that hold secrets (every trackb process: :func:`protect_process` sets
``PR_SET_DUMPABLE`` 0) cannot be read through ``/proc/<pid>/environ`` or ``mem`` by a
same-user process.

``run_python`` never raises for anything the code does; ``status`` says what happened:
``ok`` (exit 0), ``failed`` (non-zero exit: an exception, a refused action,
``sys.exit``), ``timeout`` (wall-clock limit; the group was killed), ``killed`` (a
signal or a resource limit: memory, CPU, file size, disk; ``reason`` names it),
``below_minimum`` (the isolation could not reach the minimum; nothing ran), ``error``
(the sandbox itself could not run the code).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from trackb_core import sandbox_child
from trackb_core.config import StageConfig
from trackb_core.errors import ConfigError

OUTPUT_CHARS = 20_000
REPORT_BYTES = 1 << 20  # the most a run's report channel may carry
STATUS_BYTES = 64 << 10
MAX_ENTRIES = 20_000  # files and folders the code may leave in its folder
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_DUMPABLE = 4
RUNTIME_ENV = "TRACKB_SANDBOX_RUNTIME"  # "gvisor" when the pod runs under gVisor

# Set once a child could not unshare: every later child skips the try.
_NETNS_REFUSED = False


@dataclass(frozen=True)
class Isolation:
    """What walls a sandboxed run had (the child reports them before the code runs)."""

    seccomp: bool = False
    landlock: int = 0  # the Landlock ABI applied; 0: none
    landlock_offered: int = 0  # the ABI the kernel offers; 0: none
    netns: bool = False
    runtime: str | None = None  # "gvisor" when declared
    meets_minimum: bool = False

    @property
    def level(self) -> str:
        """``gvisor``, ``seccomp+landlock`` (``+netns``), ``seccomp`` or ``none``."""
        if self.runtime == "gvisor":
            return "gvisor"
        if not self.seccomp:
            return "none"
        level = "seccomp+landlock" if self.landlock else "seccomp"
        return level + ("+netns" if self.netns else "")

    def as_dict(self) -> dict:
        return {"level": self.level, "seccomp": self.seccomp, "landlock": self.landlock,
                "landlock_offered": self.landlock_offered, "netns": self.netns,
                "runtime": self.runtime, "meets_minimum": self.meets_minimum}


NO_ISOLATION = Isolation()


@dataclass
class SandboxResult:
    """What happened to code run by :func:`run_python` (see the module docstring)."""

    status: str  # ok | failed | timeout | killed | below_minimum | error
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: Isolation = NO_ISOLATION
    reason: str = ""  # why it was killed or errored; empty for ok/failed
    refused: list[str] = field(default_factory=list)  # actions the audit hook refused
    truncated: bool = False  # stdout or stderr was cut to output_chars
    report: bytes = b""  # what the code wrote to its report channel (report=True)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def protect_process() -> bool:
    """Make this process non-dumpable (``PR_SET_DUMPABLE`` 0): a same-user process,
    sandboxed code included, cannot read its environment, memory or file descriptors
    through ``/proc``. Returns False where the call does not exist (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


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


def remove_tree(path: str | Path) -> None:
    """Delete ``path`` and everything below it, however deep, never following links.

    Works one folder at a time and moves each subfolder up to the top instead of
    descending into it, so neither the path length nor the number of open descriptors
    grows with the depth. Raises nothing: what cannot be removed is left.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        top = os.open(path, flags)
    except OSError:
        return
    tag, counter = os.urandom(6).hex(), 0
    try:
        pending = [None]  # None: the top folder itself
        while pending:
            name = pending.pop()
            try:
                fd = os.dup(top) if name is None else os.open(name, flags, dir_fd=top)
            except OSError:
                continue
            try:
                os.fchmod(fd, 0o700)  # a folder the code made unreadable
            except OSError:
                pass
            try:
                with os.scandir(fd) as entries:
                    children = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            except OSError:
                children = []
            for child, is_dir in children:
                try:
                    if is_dir:
                        counter += 1
                        moved = f".trackb-rm-{tag}-{counter}"
                        os.rename(child, moved, src_dir_fd=fd, dst_dir_fd=top)
                        pending.append(moved)
                    else:
                        os.unlink(child, dir_fd=fd)
                except OSError:
                    pass
            os.close(fd)
            if name is not None:
                try:
                    os.rmdir(name, dir_fd=top)
                except OSError:
                    pass
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except OSError:
        pass


def folder_usage(path: Path, limit_bytes: int) -> tuple[int, int]:
    """``(bytes, entries)`` under ``path`` without following links; stops counting once
    either passes its limit (``limit_bytes``, :data:`MAX_ENTRIES`)."""
    used, entries, stack = 0, 0, [str(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as listing:
                for entry in listing:
                    entries += 1
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    used += info.st_blocks * 512
                    if stat.S_ISDIR(info.st_mode):
                        stack.append(entry.path)
                    if used > limit_bytes or entries > MAX_ENTRIES:
                        return used, entries
        except OSError:
            continue
    return used, entries


class _Drain(threading.Thread):
    """Reads a pipe to its end, keeping the first ``cap`` bytes (the child never blocks
    on a full pipe: the rest is read and dropped)."""

    def __init__(self, fd: int, cap: int):
        super().__init__(daemon=True)
        self.fd, self.cap, self.data, self.cut = fd, cap, bytearray(), False

    def run(self) -> None:
        try:
            while chunk := os.read(self.fd, 65536):
                room = self.cap - len(self.data)
                if room > 0:
                    self.data += chunk[:room]
                if len(chunk) > max(room, 0):
                    self.cut = True
        except OSError:
            pass
        finally:
            os.close(self.fd)


def _read_back(handle, limit: int) -> tuple[str, bool]:
    """The first ``limit`` characters the child wrote to a file we opened and handed it."""
    try:
        handle.seek(0)
        data = handle.read(limit * 4 + 1)
    except OSError:
        return "", False
    text = data.decode("utf-8", errors="replace")
    return text[:limit], len(text) > limit or len(data) > limit * 4


def _parse_isolation(line: str) -> Isolation:
    try:
        data = json.loads(line)
        return Isolation(seccomp=bool(data["seccomp"]), landlock=int(data["landlock"]),
                         landlock_offered=int(data["landlock_offered"]),
                         netns=bool(data["netns"]), runtime=data.get("runtime") or None,
                         meets_minimum=bool(data["meets_minimum"]))
    except (ValueError, KeyError, TypeError):
        return NO_ISOLATION


def run_python(code: str, *, files: dict[str, str] | None = None, timeout: float = 10.0,
               memory_mb: int = 1024, cpu_seconds: int | None = None,
               resident_mb: int | None = None,
               file_size_mb: int = 16, disk_mb: int = 64,
               open_files: int = 256, processes: int = 512,
               python_path: list[str | Path] | None = None,
               library_path: list[str | Path] | None = None,
               output_chars: int = OUTPUT_CHARS, report: bool = False,
               require_minimum: bool = True, network: str = "auto") -> SandboxResult:
    """Run ``code`` as ``__main__`` in a contained child process; never raises for what
    the code does.

    ``files`` (relative path -> text) are written into the child's working folder, which
    is first on its ``sys.path`` and deleted afterwards. ``python_path`` folders follow it
    on ``sys.path``, readable but not writable (a view of a corpus), then
    ``library_path`` folders: installed packages (a corpus's execution environment),
    read-only too, whose native extensions may load like those of trackb's own
    environment. The CPU limit
    (``RLIMIT_CPU``) is ``cpu_seconds``, by default the timeout rounded down plus two
    seconds. ``memory_mb`` caps the address space (``RLIMIT_AS``); ``resident_mb``, when
    set, also the memory actually in use: the parent reads the child's resident set
    while it runs and kills it past that (address space is not memory: CUDA torch
    reserves gigabytes it never touches). With ``report``, the code finds ``REPORT_FD``
    in its globals, a pipe whose bytes come back as ``SandboxResult.report`` (at most
    :data:`REPORT_BYTES`). ``require_minimum`` refuses to run below the minimum
    isolation; ``network="auto"`` also tries a private network namespace, ``"seccomp"``
    does not.

    Raises ValueError for a file name that is absolute or leaves the folder, or for an
    unknown ``network``.
    """
    global _NETNS_REFUSED
    if network not in ("auto", "seccomp"):
        raise ValueError(f"network must be 'auto' or 'seccomp', not {network!r}")
    relative_files = {_checked_relative(name): text for name, text in (files or {}).items()}
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="trackb-sandbox-"))
    try:
        meta = scratch / "meta"  # ours: the code and the captured output
        work = scratch / "work"  # the child's: its cwd, HOME and TMPDIR
        meta.mkdir()
        (work / "tmp").mkdir(parents=True)
        for relative, text in relative_files.items():
            target = work / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        code_file = meta / "main.py"
        code_file.write_text(str(code), encoding="utf-8")
        status_read, status_write = os.pipe()
        report_read, report_write = os.pipe() if report else (None, None)
        spec = {
            "workdir": str(work), "code_file": str(code_file),
            "read_roots": [str(Path(p).resolve())
                           for p in [*(python_path or []), *(library_path or [])]],
            "library_roots": [str(Path(p).resolve()) for p in (library_path or [])],
            "memory_bytes": int(memory_mb) * 1024 * 1024,
            "cpu_seconds": int(cpu_seconds if cpu_seconds is not None else int(timeout) + 2), "file_bytes": int(file_size_mb) * 1024 * 1024,
            "open_files": int(open_files), "processes": int(processes),
            "try_netns": network == "auto" and not _NETNS_REFUSED,
            "clone_flags": CLONE_NEWUSER | CLONE_NEWNET, "landlock": True, "seccomp": True,
            "runtime": os.environ.get(RUNTIME_ENV) or None,
            "require_minimum": bool(require_minimum),
            "status_fd": status_write, "report_fd": report_write,
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work / "tmp"),
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0"}
        keep = [fd for fd in (status_write, report_write) if fd is not None]
        drains = [_Drain(status_read, STATUS_BYTES)]
        if report_read is not None:
            drains.append(_Drain(report_read, REPORT_BYTES))
        try:
            with open(meta / "stdout", "w+b") as out, open(meta / "stderr", "w+b") as err:
                try:
                    process = subprocess.Popen(
                        [sys.executable, "-I", "-X", "utf8", sandbox_child.__file__,
                         json.dumps(spec)],
                        cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                        start_new_session=True, close_fds=True, pass_fds=keep)
                finally:
                    for fd in keep:
                        os.close(fd)
                for drain in drains:
                    drain.start()
                timed_out, killed_for = _wait(process, timeout, work, disk_mb, resident_mb)
                for drain in drains:
                    drain.join(5)
                seconds = time.monotonic() - started
                stdout, cut_out = _read_back(out, output_chars)
                stderr, cut_err = _read_back(err, output_chars)
        except OSError as exc:
            for fd in (status_read, report_read):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            return SandboxResult("error", None, "", "", time.monotonic() - started,
                                 reason=f"could not start python: {exc}")
    finally:
        remove_tree(scratch)

    notes = bytes(drains[0].data).decode("utf-8", "replace").split("\n")
    # The first line is the child's, written before any untrusted code ran; what the
    # code writes later can add lines, never replace that one.
    isolation = _parse_isolation(notes[0][len("isolation "):]) \
        if notes and notes[0].startswith("isolation ") else NO_ISOLATION
    if spec["try_netns"] and isolation.seccomp and not isolation.netns:
        _NETNS_REFUSED = True
    refused = [n.split(" ", 1)[1] for n in notes[1:] if n.startswith("refused ")]
    code_rc = process.returncode

    def result(status: str, reason: str = "") -> SandboxResult:
        return SandboxResult(status, code_rc, stdout, stderr, round(seconds, 3), isolation,
                             reason=reason, refused=refused, truncated=cut_out or cut_err,
                             report=bytes(drains[1].data) if report else b"")

    if timed_out:
        return result("timeout", f"no exit within {timeout:g} s; process group killed")
    if killed_for:
        return result("killed", killed_for)
    if not notes or not notes[0].startswith("isolation "):
        return result("error", "the sandbox did not start: " + stderr[-500:])
    if code_rc == sandbox_child.BELOW_MINIMUM_EXIT and not isolation.meets_minimum:
        return result("below_minimum", minimum_problem(isolation))
    if code_rc == sandbox_child.MEMORY_EXIT and "memory" in notes[1:]:
        return result("killed", f"memory limit ({memory_mb} MiB address space)")
    if code_rc is not None and code_rc < 0:
        signame = signal.Signals(-code_rc).name if -code_rc in signal.Signals._value2member_map_ \
            else str(-code_rc)
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit",
               "SIGKILL": "killed", "SIGSYS": "a forbidden system call",
               "SIGSEGV": "segmentation fault (often the memory limit)"}
        return result("killed", f"{signame}: {why.get(signame, 'signal')}")
    if code_rc == 0:
        return result("ok")
    return result("failed", "refused: " + ", ".join(refused) if refused else "")


def resident_kb(pid: int) -> int:
    """The resident set of process ``pid`` in KiB (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _wait(process: subprocess.Popen, timeout: float, work: Path,
          disk_mb: int, resident_mb: int | None = None) -> tuple[bool, str]:
    """Wait for the child, accounting its folder (and its resident memory, with
    ``resident_mb``); ``(timed out, why it was killed)``. The process group is killed on
    every path (the child's leftovers too)."""
    deadline = time.monotonic() + timeout
    cap = int(disk_mb) * 1024 * 1024
    timed_out, killed_for = False, ""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            try:
                process.wait(timeout=min(remaining, 0.1 if resident_mb else 0.25))
                break
            except subprocess.TimeoutExpired:
                used, entries = folder_usage(work, cap)
                if used > cap:
                    killed_for = f"disk limit ({disk_mb} MiB in its folder)"
                    break
                if entries > MAX_ENTRIES:
                    killed_for = f"disk limit (more than {MAX_ENTRIES} files and folders)"
                    break
                if resident_mb and resident_kb(process.pid) > resident_mb * 1024:
                    killed_for = f"memory limit ({resident_mb} MiB resident)"
                    break
    finally:
        _kill_group(process)
        process.wait()
    return timed_out, killed_for


def minimum_problem(isolation: Isolation) -> str:
    """Why ``isolation`` is below the minimum, in one line (empty when it is not)."""
    if isolation.meets_minimum:
        return ""
    if not isolation.seccomp:
        return ("the sandbox could not install its seccomp filter (not Linux, or a kernel "
                "without seccomp filters)")
    return (f"the kernel offers Landlock (ABI {isolation.landlock_offered}) but the sandbox "
            "could not apply it")


def probe(require_minimum: bool = True) -> Isolation:
    """The isolation a sandboxed run gets on this machine (runs ``pass``)."""
    result = run_python("pass", timeout=30, require_minimum=require_minimum)
    return result.isolation


WEAK_FLAG = "--allow-weak-sandbox"


class CodeRunOptions(StageConfig):
    """The options every stage that runs model- or teacher-written code shares."""

    allow_weak_sandbox: bool = Field(
        False, description="Run model- or teacher-written tests even where the sandbox "
        "cannot reach its minimum isolation (seccomp, plus Landlock where the kernel has "
        "it): macOS, old kernels. Only on a disposable machine with no secrets.")
    fetch_upstream_corpus: bool = Field(
        False, description="When no corpus snapshot is stored upstream, download the "
        "pypi: corpus an upstream manifest names (off: a manifest never makes trackb fetch "
        "a package; unit tests count as not executable instead).")


def stage_isolation(allow_weak: bool) -> dict:
    """What a stage about to run model-written code records of the sandbox (for its
    manifest and card): the isolation a probe run reached and whether weaker was allowed.

    Raises ConfigError, naming the problem and the opt-out flag, when the sandbox cannot
    reach its minimum here and ``allow_weak`` is False: every item would fall below it,
    and a dataset or evaluation of nothing but skipped tests would mislead.
    """
    isolation = probe(require_minimum=False)
    if not isolation.meets_minimum and not allow_weak:
        raise ConfigError(
            f"the sandbox cannot reach its minimum isolation here: {minimum_problem(isolation)} "
            f"(reached: {isolation.level}). Model-written code must not run like this on a "
            f"machine with secrets; on a disposable one, pass {WEAK_FLAG} (or set "
            "allow_weak_sandbox: true) to run it anyway")
    return {"used": True, **isolation.as_dict(), "allow_weak": bool(allow_weak)}
