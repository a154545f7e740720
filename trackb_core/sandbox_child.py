"""The sandbox's child side: walls go up, then the untrusted code runs.

Run by :func:`trackb_core.sandbox.run_python` as ``python -I -X utf8 <this file>
SPEC_JSON`` (standard library only: trackb is not importable in the child). Before a
byte of untrusted code runs it, in this order:

1. reads the code and the spec, then scrubs ``sys.argv``;
2. sets rlimits (soft = hard): address space, CPU, file size, open files, processes,
   core dumps;
3. tries a new user + network namespace (only a downed loopback); a pod cannot;
4. **Landlock** (where the kernel offers it): read and execute only the Python
   installation, the system libraries and the ``read_roots`` it is given (a view of the
   corpus), read and write only its working folder, ``/dev/null``; no TCP bind or
   connect (ABI >= 4); no abstract Unix sockets and no signals to processes outside
   (ABI >= 6);
5. ``PR_SET_NO_NEW_PRIVS`` and a **seccomp** filter (a BPF program built here; see
   :func:`seccomp_program`): no new processes (``fork``, ``vfork``, ``clone`` without
   ``CLONE_THREAD`` or with namespace flags, ``clone3`` answers ENOSYS so threads fall
   back to ``clone``), no ``execve``/``execveat``, no sockets but
   ``socketpair(AF_UNIX)``, no ``ptrace``/``process_vm_*``/``pidfd_*``, signals only to
   itself, no namespaces, mounts, ``bpf``, ``io_uring``, keyrings, ``perf_event_open``,
   no raising rlimits, no kernel modules;
6. reports the isolation it reached as the first line on the status pipe (untrusted
   code can add lines, never remove that one) and, when ``require_minimum`` is set and
   the minimum (seccomp, plus Landlock where the kernel offers it; gVisor counts) is
   not met, exits with :data:`BELOW_MINIMUM_EXIT` without running the code;
7. installs an audit hook, a cheap first line that turns most refusals into clear
   PermissionErrors before the kernel's EPERM, and refuses loading a native extension
   module from outside the trusted roots (a ``.so`` the code wrote itself);
8. runs the code as ``__main__``; ``report_fd`` (if given) is an inherited pipe the code
   may use to hand its result to the parent.
"""

import ctypes
import errno
import json
import os
import resource
import struct
import sys

BELOW_MINIMUM_EXIT = 112
MEMORY_EXIT = 113

# -- Landlock ---------------------------------------------------------------------------
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 16, 32, 64, 128
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK, FS_MAKE_SYM = 256, 512, 1024, 2048, 4096
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

# -- seccomp ----------------------------------------------------------------------------
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_AND_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x54, 0x06
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
CLONE_THREAD = 0x00010000
CLONE_NAMESPACES = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
                    | 0x20000000 | 0x40000000 | 0x00000080)
AF_UNIX = 1
X32_SYSCALL_BIT = 0x40000000
# Syscall numbers (asm/unistd_64.h for x86_64, asm-generic/unistd.h for aarch64).
SYSCALLS = {
    "x86_64": {
        "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "clone3": 435,
        "socket": 41, "connect": 42, "accept": 43, "bind": 49, "listen": 50,
        "socketpair": 53, "accept4": 288, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "pidfd_open": 434, "pidfd_send_signal": 424,
        "pidfd_getfd": 438, "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129,
        "rt_tgsigqueueinfo": 297, "unshare": 272, "setns": 308, "mount": 165, "umount2": 166,
        "pivot_root": 155, "chroot": 161, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "bpf": 321,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "keyctl": 250, "add_key": 248, "request_key": 249, "perf_event_open": 298,
        "setrlimit": 160, "prlimit64": 302, "open_by_handle_at": 304,
        "name_to_handle_at": 303, "userfaultfd": 323, "init_module": 175,
        "finit_module": 313, "delete_module": 176, "kexec_load": 246,
        "kexec_file_load": 320, "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163,
    },
    "aarch64": {
        "clone": 220, "execve": 221, "execveat": 281, "clone3": 435, "socket": 198,
        "connect": 203, "accept": 202, "bind": 200, "listen": 201, "socketpair": 199,
        "accept4": 242, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
        "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438, "kill": 129,
        "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240,
        "unshare": 97, "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41,
        "chroot": 51, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "bpf": 280,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "keyctl": 219, "add_key": 217, "request_key": 218, "perf_event_open": 241,
        "setrlimit": 164, "prlimit64": 261, "open_by_handle_at": 265,
        "name_to_handle_at": 264, "userfaultfd": 282, "init_module": 105,
        "finit_module": 273, "delete_module": 106, "kexec_load": 104,
        "kexec_file_load": 294, "reboot": 142, "swapon": 224, "swapoff": 225, "acct": 89,
    },
}
DENIED = ("fork", "vfork", "execve", "execveat", "socket", "connect", "accept", "accept4",
          "bind", "listen", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open",
          "pidfd_send_signal", "pidfd_getfd", "unshare", "setns", "mount", "umount2",
          "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig",
          "fsmount", "fspick", "mount_setattr", "bpf", "io_uring_setup", "io_uring_enter",
          "io_uring_register", "keyctl", "add_key", "request_key", "perf_event_open",
          "setrlimit", "open_by_handle_at", "name_to_handle_at", "userfaultfd",
          "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
          "reboot", "swapon", "swapoff", "acct")
# Signals: only to this process (its pid is the first argument).
SELF_ONLY = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")


def _insn(code, k, jt=0, jf=0):
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def seccomp_program(machine, pid):
    """The BPF filter (bytes of ``struct sock_filter``) for ``machine``, letting the
    process signal only ``pid`` (itself). None for an architecture it does not know."""
    numbers = SYSCALLS.get(machine)
    if numbers is None:
        return None
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    nr_at, arg_at = 0, (lambda i: 16 + 8 * i)  # offsets in struct seccomp_data
    program = [_insn(BPF_LD_W_ABS, 4),  # arch
               _insn(BPF_JEQ_K, AUDIT_ARCH[machine], 1, 0),
               _insn(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),  # another ABI (int 0x80)
               _insn(BPF_LD_W_ABS, nr_at)]
    if machine == "x86_64":  # the x32 ABI: same numbers with bit 30 set
        program += [_insn(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1), _insn(BPF_RET_K, deny)]
    for name in DENIED:
        if name in numbers:
            program += [_insn(BPF_JEQ_K, numbers[name], 0, 1), _insn(BPF_RET_K, deny)]
    # clone3 passes its flags in memory the filter cannot read: ENOSYS makes glibc fall
    # back to clone, whose flags it can.
    program += [_insn(BPF_JEQ_K, numbers["clone3"], 0, 1),
                _insn(BPF_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS)]

    def argument_is(nr, index, mask, value):
        """Allow syscall ``nr`` when ``arg[index] & mask == value``, else deny."""
        block = [_insn(BPF_LD_W_ABS, arg_at(index))]
        if mask != 0xFFFFFFFF:
            block.append(_insn(BPF_AND_K, mask))
        block += [_insn(BPF_JEQ_K, value, 0, 1), _insn(BPF_RET_K, SECCOMP_RET_ALLOW),
                  _insn(BPF_RET_K, deny)]
        return [_insn(BPF_JEQ_K, nr, 0, len(block)), *block]

    # A thread (CLONE_THREAD) in no new namespace; every other clone is a process.
    program += argument_is(numbers["clone"], 0, CLONE_THREAD | CLONE_NAMESPACES,
                           CLONE_THREAD)
    program += argument_is(numbers["socketpair"], 0, 0xFFFFFFFF, AF_UNIX)
    for name in SELF_ONLY:
        program += argument_is(numbers[name], 0, 0xFFFFFFFF, pid)
    # prlimit64 reads limits (getrlimit) with a NULL new limit; it may not set them.
    block = [_insn(BPF_LD_W_ABS, arg_at(2)), _insn(BPF_JEQ_K, 0, 0, 3),
             _insn(BPF_LD_W_ABS, arg_at(2) + 4), _insn(BPF_JEQ_K, 0, 0, 1),
             _insn(BPF_RET_K, SECCOMP_RET_ALLOW), _insn(BPF_RET_K, deny)]
    program += [_insn(BPF_JEQ_K, numbers["prlimit64"], 0, len(block)), *block]
    program.append(_insn(BPF_RET_K, SECCOMP_RET_ALLOW))
    return b"".join(program)


def install_seccomp(libc, machine):
    """Apply the filter; True on success. NO_NEW_PRIVS must be set already."""
    program = seccomp_program(machine, os.getpid())
    if program is None:
        return False
    count = len(program) // 8
    buffer = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = SockFprog(count, ctypes.addressof(buffer))
    result = libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0)
    return result == 0


def landlock_abi(libc):
    """The kernel's Landlock ABI version, 0 where it has none (or refuses it)."""
    version = libc.syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                           ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def install_landlock(libc, abi, read_roots, read_files, write_roots):
    """Restrict this process to the given paths (see the module docstring); True on
    success. Paths that do not exist are skipped."""
    fs = (FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_READ_DIR | FS_REMOVE_DIR
          | FS_REMOVE_FILE | FS_MAKE_CHAR | FS_MAKE_DIR | FS_MAKE_REG | FS_MAKE_SOCK
          | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM)
    if abi >= 2:
        fs |= FS_REFER
    if abi >= 3:
        fs |= FS_TRUNCATE
    if abi >= 5:
        fs |= FS_IOCTL_DEV
    net = (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    attr = struct.pack("=QQQ", fs, net, scoped)[:size]
    ruleset = libc.syscall(LANDLOCK_CREATE_RULESET, ctypes.c_char_p(attr),
                           ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    write = fs & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK | FS_EXECUTE | FS_IOCTL_DEV)
    rules = [(path, read) for path in read_roots] + [(path, FS_READ_FILE) for path in read_files]
    rules += [(path, write | FS_READ_FILE | FS_READ_DIR) for path in write_roots]
    rules.append(("/dev/null", FS_READ_FILE | FS_WRITE_FILE | (fs & FS_TRUNCATE)))
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if not os.path.isdir(path):
                access &= FILE_RIGHTS
            rule = struct.pack("=Qi", access & fs, fd)
            if libc.syscall(LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                            ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.c_char_p(rule),
                            ctypes.c_uint32(0)) != 0:
                return False
        finally:
            os.close(fd)
    try:
        return libc.syscall(LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset),
                            ctypes.c_uint32(0)) == 0
    finally:
        os.close(ruleset)


def trusted_roots():
    """Folders holding the interpreter, its standard library, installed packages and the
    system libraries they load: readable and executable in the sandbox."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    roots.update(p for p in sys.path if p and os.path.isdir(p))
    roots.update(("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib",
                  "/usr/share/zoneinfo"))
    return sorted({os.path.realpath(r) for r in roots if os.path.isdir(r)})


def _set_limits(spec):
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


def main():
    spec = json.loads(sys.argv[1])
    sys.argv[:] = ["<sandbox>"]
    status_fd = spec["status_fd"]

    def note(text):
        try:
            os.write(status_fd, (text + "\n").encode())
        except OSError:
            pass

    with open(spec["code_file"], encoding="utf-8") as handle:
        source = handle.read()
    _set_limits(spec)
    libc = ctypes.CDLL(None, use_errno=True)
    netns = bool(spec["try_netns"]) and libc.unshare(ctypes.c_int(spec["clone_flags"])) == 0
    machine = os.uname().machine
    offered = landlock_abi(libc) if spec["landlock"] else 0
    root = os.path.realpath(spec["workdir"])
    landlock = 0
    if offered:
        if install_landlock(libc, offered, [*trusted_roots(), *spec["read_roots"]],
                            ["/etc/ld.so.cache", "/dev/urandom", "/dev/zero",
                             "/etc/localtime", f"/proc/{os.getpid()}/status"], [root]):
            landlock = offered
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    seccomp = bool(spec["seccomp"]) and install_seccomp(libc, machine)
    gvisor = spec["runtime"] == "gvisor"
    meets = gvisor or (seccomp and (landlock > 0 or offered == 0))
    note("isolation " + json.dumps({
        "seccomp": seccomp, "landlock": landlock, "landlock_offered": offered,
        "netns": netns, "runtime": spec["runtime"], "meets_minimum": meets}, sort_keys=True))
    if spec["require_minimum"] and not meets:
        os._exit(BELOW_MINIMUM_EXIT)
    _run(spec, source, root, note)


def _run(spec, source, root, note):
    """The audit hook, then the code as ``__main__``."""
    trusted = tuple(r + os.sep for r in [*trusted_roots(), *spec.get("library_roots", [])])
    writable = (root, "/dev/null")
    sys.dont_write_bytecode = True
    sys.path[:] = [root, *spec["read_roots"], *[p for p in sys.path if p]]

    process_events = {
        "os.fork", "os.forkpty", "os.system", "os.posix_spawn", "os.posix_spawnp", "os.spawn",
        "os.exec", "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
        "resource.setrlimit", "resource.prlimit", "pty.spawn", "os.setns", "os.unshare",
    }
    dangerous_symbols = ("fork", "vfork", "clone", "clone3", "system", "popen", "execv",
                         "execve", "execvp", "execvpe", "execl", "execle", "execlp",
                         "posix_spawn", "posix_spawnp", "kill", "unshare", "setns", "ptrace",
                         "pidfd_send_signal", "pidfd_open")
    # event -> (indexes of path arguments, indexes of dir_fd arguments)
    path_events = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.rename": ((0, 1), (2, 3)),
        "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)), "os.truncate": ((0,), ()),
        "os.utime": ((0,), (3,)), "shutil.rmtree": ((0,), (1,)),
        "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "os.chflags": ((0,), ()),
        "os.lchflags": ((0,), ()), "os.lchmod": ((0,), ()), "os.mkfifo": ((0,), (2,)),
        "os.mknod": ((0,), (3,)),
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    noted = set()

    def refuse(what):
        if what not in noted:
            noted.add(what)
            note("refused " + what)
        raise PermissionError(f"sandbox refused {what}")

    def inside(path):
        if isinstance(path, (bytes, bytearray, memoryview)):
            path = os.fsdecode(bytes(path))
        if not isinstance(path, str):
            return False  # an fd or an object: cannot tell where it points
        real = os.path.realpath(path)
        return any(real == w or real.startswith(w + os.sep) for w in writable)

    def hook(event, args):
        if event in process_events:
            refuse(event)
        if event == "import" and len(args) > 1 and isinstance(args[1], str) \
                and args[1].endswith((".so", ".pyd")) \
                and not os.path.realpath(args[1]).startswith(trusted):
            refuse(f"loading the native module {args[1]}")
        if event == "ctypes.dlsym" and len(args) > 1 \
                and str(args[1]).lstrip("_") in dangerous_symbols:
            refuse(f"ctypes symbol {args[1]}")
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

    sys.addaudithook(hook)
    import types
    code = compile(source, "<sandbox>", "exec")
    main = types.ModuleType("__main__")
    main.__file__ = os.path.join(root, "__main__.py")
    main.__builtins__ = __builtins__
    if spec["report_fd"] is not None:
        main.REPORT_FD = spec["report_fd"]
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    except MemoryError:
        sys.stdout.flush()
        note("memory")
        os._exit(MEMORY_EXIT)
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    main()
