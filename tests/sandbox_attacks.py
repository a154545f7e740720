"""Hostile code against the sandbox, each attack with the evidence that it failed.

Run as a script (``python tests/sandbox_attacks.py OUT.json``): it plays a trackb
process holding secrets (a canary in its environment, in a fake ``~/.aws``, in token
files), opens listeners (TCP, UDP, a Unix socket path, an abstract Unix socket), makes
files outside the sandbox to protect, then runs every attack through
:func:`trackb_core.sandbox.run_python` (or, for verdict attacks, the unit_test
family's verdict) and checks the evidence: no file outside, no byte at a listener, no
canary in any output, itself alive, no sandbox folder left behind. It writes one JSON
record per attack. ``tests/test_sandbox_attacks.py`` runs it in host mode and in pod
mode (no user namespaces, no capabilities), as a subprocess: an attack that killed its
parent would show as a missing record.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

CANARY = "canary-" + secrets.token_hex(8)


class Listener:
    """TCP, UDP, Unix path and abstract Unix listeners recording every byte received."""

    def __init__(self, folder: Path):
        self.hits: list[str] = []
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(16)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.unix_path = str(folder / "listener.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        self.unix.listen(16)
        self.abstract_name = "\0trackb-attack-" + secrets.token_hex(4)
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind(self.abstract_name)
        self.abstract.listen(16)
        for server in (self.tcp, self.udp, self.unix, self.abstract):
            server.settimeout(0.1)
            threading.Thread(target=self._serve, args=(server,), daemon=True).start()

    def _serve(self, server: socket.socket) -> None:
        while True:
            try:
                if server.type == socket.SOCK_DGRAM:
                    data, _ = server.recvfrom(65536)
                    self.hits.append(f"udp:{len(data)}")
                    continue
                conn, _ = server.accept()
                self.hits.append(f"{server.family.name}:connected")
                conn.settimeout(0.5)
                try:
                    data = conn.recv(65536)
                    if data:
                        self.hits.append(f"{server.family.name}:{len(data)} bytes")
                finally:
                    conn.close()
            except (TimeoutError, OSError):
                continue


def attacks(env: dict) -> list[tuple[str, str, dict]]:
    """``(name, code, expectations)``; ``expectations`` may hold ``file`` (a path that
    must not exist afterwards), ``untouched`` (a file whose bytes and mode must not
    change), ``listener`` (the listeners receive nothing), ``canary`` (it reaches no
    output; checked for every attack), ``status`` (the statuses allowed), ``output``
    (text that must appear: the wall's own answer), ``no_output`` (text that must not)."""
    o = env["outside"]
    victim = env["victim"]
    home_aws = env["aws_credentials"]
    libc = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    touch = f"open({o + '/pwned'!r}, 'w').write('x')"
    return [
        ("fork", f"import os\nif os.fork() == 0:\n    {touch}\n    os._exit(0)\n",
         {"file": o + "/pwned"}),
        ("os.system", f"import os\nos.system('touch {o}/pwned')", {"file": o + "/pwned"}),
        ("subprocess", f"import subprocess\nsubprocess.run(['touch', '{o}/pwned'])",
         {"file": o + "/pwned"}),
        ("posix_spawn", f"import os\nos.posix_spawn('/usr/bin/touch', ['touch', "
                        f"'{o}/pwned'], {{}})", {"file": o + "/pwned"}),
        ("reimported _posixsubprocess.fork_exec",
         "import sys, importlib\nsys.modules.pop('_posixsubprocess', None)\n"
         "import _posixsubprocess as p\nimport os\nr, w = os.pipe()\n"
         f"p.fork_exec([b'/usr/bin/touch', b'{o}/pwned'], [b'/usr/bin/touch'], True, (), "
         "None, None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, "
         "None, True)\n", {"file": o + "/pwned"}),
        ("ctypes syscall fork",
         libc + f"pid = libc.syscall(57)\nif pid == 0:\n    {touch}\n    libc.syscall(60, 0)\n"
         "print('fork returned', pid, ctypes.get_errno())", {"file": o + "/pwned"}),
        ("ctypes syscall clone",
         libc + f"pid = libc.syscall(56, 17, 0, 0, 0, 0)\nif pid == 0:\n    {touch}\n"
         "    libc.syscall(60, 0)\n", {"file": o + "/pwned"}),
        ("multiprocessing",
         f"import multiprocessing as m\ndef go():\n    {touch}\n"
         "p = m.Process(target=go)\np.start()\np.join()", {"file": o + "/pwned"}),
        ("a thread outliving the code",
         f"import threading, time\ndef go():\n    time.sleep(0.5)\n    {touch}\n"
         "threading.Thread(target=go).start()", {"file": o + "/pwned"}),
        ("setsid daemon",
         f"import os\nif os.fork() == 0:\n    os.setsid()\n    import time\n"
         f"    time.sleep(2)\n    {touch}\n", {"file": o + "/pwned"}),
        ("write outside", touch, {"file": o + "/pwned"}),
        ("os.open with dir_fd",
         f"import os\nfd = os.open({o!r}, os.O_RDONLY)\n"
         "os.write(os.open('pwned', os.O_CREAT | os.O_WRONLY, dir_fd=fd), b'x')",
         {"file": o + "/pwned"}),
        ("hard link then write",
         f"import os\nos.link({victim!r}, 'mine')\nopen('mine', 'w').write('pwned')",
         {"untouched": victim}),
        ("rename out of the folder",
         f"import os\nos.rename({victim!r}, 'stolen')", {"untouched": victim}),
        ("chmod outside", f"import os\nos.chmod({victim!r}, 0o777)", {"untouched": victim}),
        ("truncate outside", f"import os\nos.truncate({victim!r}, 0)", {"untouched": victim}),
        ("write through /proc/self/root",
         f"open('/proc/self/root' + {o + '/pwned'!r}, 'w').write('x')", {"file": o + "/pwned"}),
        ("symlink then write",
         f"import os\nos.symlink({o + '/pwned'!r}, 'link')\nopen('link', 'w').write('x')",
         {"file": o + "/pwned"}),
        ("write to /dev/shm", "open('/dev/shm/trackb-pwned', 'w').write('x')",
         {"file": "/dev/shm/trackb-pwned"}),
        ("read ~/.aws/credentials", f"print(open({home_aws!r}).read())", {"canary": True}),
        ("read the parent's environment",
         "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())", {"canary": True}),
        ("read the parent's memory",
         "import os, re\npid = os.getppid()\n"
         "maps = open(f'/proc/{pid}/maps').read().splitlines()\n"
         "mem = open(f'/proc/{pid}/mem', 'rb')\n"
         "for line in maps:\n    a, b = (int(x, 16) for x in line.split()[0].split('-'))\n"
         "    try:\n        mem.seek(a)\n        print(mem.read(min(b - a, 1 << 20)))\n"
         "    except OSError:\n        pass", {"canary": True}),
        ("read a service-account token", f"print(open({env['sa_token']!r}).read())",
         {"canary": True}),
        ("read an IRSA / Pod Identity token", f"print(open({env['irsa_token']!r}).read())",
         {"canary": True}),
        ("list the home folder", f"import os\nprint(os.listdir({env['home']!r}))",
         {"canary": True}),
        ("TCP connect", f"import socket\ns = socket.create_connection(('127.0.0.1', "
                        f"{env['tcp']}), timeout=1)\ns.sendall(b'x')", {"listener": True}),
        ("UDP sendto", f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                       f"s.sendto(b'x', ('127.0.0.1', {env['udp']}))", {"listener": True}),
        ("Unix socket, path as bytearray",
         f"import socket\ns = socket.socket(socket.AF_UNIX)\n"
         f"s.connect(bytearray({env['unix']!r}.encode()))\ns.sendall(b'x')",
         {"listener": True}),
        ("abstract Unix socket",
         f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({env['abstract']!r})\n"
         "s.sendall(b'x')", {"listener": True}),
        ("raw socket", "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_RAW, 1)\n"
                       "print('OPENED')", {"no_output": "OPENED"}),
        ("ctypes socket and connect",
         libc + "import struct\nfd = libc.socket(2, 1, 0)\n"
         f"addr = struct.pack('!HH4s8x', 2, {env['tcp']}, bytes([127, 0, 0, 1]))\n"
         "addr = struct.pack('<H', 2) + addr[2:]\n"
         "print('fd', fd, libc.connect(fd, addr, 16))\nlibc.write(fd, b'x', 1)",
         {"listener": True, "output": "fd -1 -1"}),
        ("kill the parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", {}),
        ("kill the parent through ctypes",
         libc + "import os\nprint(libc.syscall(62, os.getppid(), 9))", {}),
        ("kill every process (-1)", libc + "print(libc.syscall(62, -1, 9))", {}),
        ("pidfd_open and pidfd_send_signal to the parent",
         libc + "import os\nfd = libc.syscall(434, os.getppid(), 0)\n"
         "print(fd, libc.syscall(424, fd, 9, None, 0))", {}),
        ("ptrace the parent", libc + "import os\nprint(libc.syscall(101, 16, os.getppid(), 0, 0))",
         {}),
        ("unshare and mount", libc + "print(libc.syscall(272, 0x10000000 | 0x20000))\n"
                                     "print(libc.mount(b'none', b'.', b'tmpfs', 0, None))", {}),
        ("io_uring_setup", libc + "import ctypes\nbuf = ctypes.create_string_buffer(120)\n"
                                  "print(libc.syscall(425, 8, buf))", {"no_output": "\n3\n"}),
        ("raise the rlimits back", "import resource\nresource.setrlimit(resource.RLIMIT_AS, "
                                   "(resource.RLIM_INFINITY, resource.RLIM_INFINITY))", {}),
        ("a native module written by the code",
         "open('evil.cpython-311-x86_64-linux-gnu.so', 'wb').write(b'\\x7fELF')\nimport evil",
         {}),
        ("memory exhaustion", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))",
         {"status": ("killed", "failed")}),
        ("disk exhaustion, one big file",
         "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))",
         {"status": ("killed", "failed"), "output": "File too large"}),
        ("disk exhaustion, many files",
         "i = 0\nwhile True:\n    open(f'f{i}', 'w').write('x' * 4000)\n    i += 1",
         {"status": ("killed",)}),
        ("thread exhaustion",
         "import threading, time\nthreads = []\nwhile True:\n"
         "    t = threading.Thread(target=time.sleep, args=(60,))\n    t.start()\n"
         "    threads.append(t)", {"status": ("killed", "failed", "timeout")}),
        ("output flood", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
         {"status": ("killed", "timeout", "failed"), "output": "File too large"}),
        ("a FIFO and a symlink where output is read",
         "import os\nos.mkfifo('stdout')\nos.symlink('/etc/passwd', 'stderr')\n"
         "os.mkfifo('../meta/stdout')", {}),
        ("a 3,000-deep tree", "import os\nfor _ in range(3000):\n    os.mkdir('d')\n"
                              "    os.chdir('d')\nopen('leaf', 'w').write('x')", {}),
        ("ignoring SIGTERM and spinning",
         "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass",
         {"status": ("timeout", "killed")}),
        ("write into the corpus view",
         f"import os\nopen(os.path.join({env['view_file_dir']!r}, 'util.py'), 'w')"
         ".write('pwned')", {"untouched": env["corpus_util"]}),
    ]


def verdict_attacks(env: dict) -> list[tuple[str, str]]:
    """Unit tests written to be counted as passing the original and killing the mutant
    without testing anything."""
    module_path = env["corpus"] + "/shop/maths.py"
    return [
        ("a forged report on the report channel", (
            "import json, os, sys\nfrom shop.maths import clamp\n\n"
            "def test_forge():\n"
            "    fd = sys.modules['__main__'].REPORT_FD\n"
            "    os.write(fd, (json.dumps({'stage': 'ran', 'results': [['test_forge', "
            "'passed', '']], 'skipped': []}) + '\\n').encode())\n"
            "    os._exit(0)\n    assert False\n")),
        ("a forged report line on stdout", (
            "import json, os\nfrom shop.maths import clamp\n\ndef test_forge():\n"
            "    print('\\x1etrackb-tests ' + json.dumps({'stage': 'ran', 'results': "
            "[['test_forge', 'passed', '']], 'skipped': []}), flush=True)\n"
            "    os._exit(0)\n    assert False\n")),
        ("comparing the module with the corpus copy", (
            "import os\nimport shop.maths as m\nfrom shop.maths import clamp\n\n"
            "def test_same_as_corpus():\n"
            "    here = open(m.__file__).read()\n"
            "    for path in list(m.__spec__.submodule_search_locations or []) + "
            f"[os.path.dirname(m.__file__), {os.path.dirname(module_path)!r}]:\n"
            "        pass\n"
            f"    assert here == open({module_path!r}).read()\n")),
        ("comparing with the copy found through the package path", (
            "import os, shop\nimport shop.maths as m\n\n"
            "def test_same_as_corpus():\n"
            "    here = open(m.__file__).read()\n"
            "    copies = [os.path.join(p, 'maths.py') for p in shop.__path__]\n"
            "    copies = [c for c in copies if os.path.exists(c) and c != m.__file__]\n"
            "    assert copies and all(open(c).read() == here for c in copies)\n")),
    ]


CORPUS_MATHS = '''"""A tiny module of the corpus."""


def clamp(value, low, high):
    """Clamp value into [low, high]."""
    if value < low:
        return low
    if value > high:
        return high
    return value
'''


def _environment(root: Path) -> dict:
    home = root / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(f"[default]\naws_secret_access_key={CANARY}\n")
    (root / "serviceaccount").mkdir()
    (root / "serviceaccount" / "token").write_text(CANARY)
    (root / "irsa-token").write_text(CANARY)
    outside = root / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me\n")
    corpus = root / "corpus"
    (corpus / "shop").mkdir(parents=True)
    (corpus / "shop" / "__init__.py").write_text("")
    (corpus / "shop" / "maths.py").write_text(CORPUS_MATHS)
    (corpus / "shop" / "util.py").write_text("HELPER = 1\n")
    return {"home": str(home), "aws_credentials": str(home / ".aws" / "credentials"),
            "sa_token": str(root / "serviceaccount" / "token"),
            "irsa_token": str(root / "irsa-token"), "outside": str(outside),
            "victim": str(victim), "corpus": str(corpus),
            "corpus_util": str(corpus / "shop" / "util.py")}


def _check(name: str, result, expect: dict, env: dict, before: dict, listener: Listener,
           seen: int) -> list[str]:
    problems = []
    if "file" in expect and os.path.lexists(expect["file"]):
        problems.append(f"{expect['file']} exists")
        os.unlink(expect["file"])
    if "untouched" in expect:
        path = expect["untouched"]
        now = (Path(path).read_bytes(), os.stat(path).st_mode) if os.path.exists(path) \
            else None
        if now != before[path]:
            problems.append(f"{path} changed")
    if listener.hits[seen:]:
        problems.append(f"the listeners received {listener.hits[seen:]}")
    texts = [result.stdout, result.stderr, result.report.decode("utf-8", "replace")]
    if any(CANARY in text for text in texts):
        problems.append("the canary reached the output")
    if expect.get("no_output") and any(expect["no_output"] in t for t in texts):
        problems.append(f"{expect['no_output']!r} in the output")
    if "status" in expect and result.status not in expect["status"]:
        problems.append(f"status {result.status} ({result.reason})")
    if expect.get("output") and not any(expect["output"] in t for t in texts):
        problems.append(f"{expect['output']!r} not in the output")
    if expect.get("listener") and result.status == "ok" and not expect.get("output"):
        problems.append("the connection attempt did not fail")
    if result.status == "error":
        problems.append(f"the sandbox failed: {result.reason}")
    return problems


# Attacks whose evidence a run without any sandbox must show (the control): the checks
# above are only worth something if they see an attack that works. Never the ones that
# signal processes or exhaust the machine.
CONTROL = ("write outside", "os.open with dir_fd", "chmod outside", "truncate outside",
           "symlink then write", "read ~/.aws/credentials", "read a service-account token", "read an IRSA / Pod Identity token",
           "TCP connect", "UDP sendto", "Unix socket, path as bytearray",
           "abstract Unix socket", "ctypes syscall fork", "subprocess", "os.system",
           "write into the corpus view")


class _Unsandboxed:
    """What :func:`run_python` returns, for code run in a plain child process."""

    def __init__(self, proc):
        self.status = "ok" if proc.returncode == 0 else "failed"
        self.stdout, self.stderr, self.report, self.reason = proc.stdout, proc.stderr, b"", ""


def _run_unsandboxed(code: str, cwd: Path):
    import subprocess

    return _Unsandboxed(subprocess.run([sys.executable, "-c", code], cwd=cwd, text=True,
                                       capture_output=True, timeout=20))


def run(out: Path, control: bool = False) -> None:
    from trackb_core.families.unit_test import unit_test_verdict
    from trackb_core.sandbox import protect_process, run_python
    from trackb_core.testrun import corpus_view

    protect_process()  # as every trackb process does: it holds secrets
    root = Path(tempfile.mkdtemp(prefix="trackb-attacks-"))
    scratch = root / "tmp"
    scratch.mkdir()
    os.environ["TMPDIR"] = str(scratch)
    tempfile.tempdir = str(scratch)
    env = _environment(root)
    os.environ["HOME"] = env["home"]
    os.environ["TRACKB_TEST_SECRET"] = CANARY
    os.environ["AWS_SECRET_ACCESS_KEY"] = CANARY
    listener = Listener(root)
    env.update(tcp=listener.tcp.getsockname()[1], udp=listener.udp.getsockname()[1],
               unix=listener.unix_path, abstract=listener.abstract_name)
    view = corpus_view(Path(env["corpus"]), "shop/maths.py")
    env["view_file_dir"] = str(view / "shop")
    records = []
    for name, code, expect in attacks(env):
        if control and name not in CONTROL:
            continue
        before = {p: (Path(p).read_bytes(), os.stat(p).st_mode)
                  for p in (env["victim"], env["corpus_util"])}
        seen = len(listener.hits)
        if control:
            (scratch / "control").mkdir(exist_ok=True)
            result = _run_unsandboxed(code, scratch / "control")
        else:
            result = run_python(code, timeout=3, memory_mb=256, disk_mb=16,
                                file_size_mb=8, python_path=[view])
        time.sleep(0.6 if "outliving" in name or "daemon" in name else 0.05)
        problems = _check(name, result, expect, env, before, listener, seen)
        records.append({"attack": name, "status": result.status, "reason": result.reason,
                        "isolation": None if control else result.isolation.as_dict(),
                        "problems": problems, "stderr": result.stderr[-300:]})
        if control:
            os.chmod(env["victim"], 0o644)
            Path(env["victim"]).write_text("keep me\n")
            Path(env["corpus_util"]).write_text("HELPER = 1\n")
    if control:
        out.write_text(json.dumps(records, indent=1))
        return
    item = {"id": "shop.maths.clamp-unit_test", "category": "unit_test",
            "source_function": CORPUS_MATHS.split("\n\n\n", 1)[1],
            "source_file": "shop/maths.py", "function_name": "clamp", "qualname": "clamp",
            "line": 4, "end_line": 10,
            "buggy_source": CORPUS_MATHS.split("\n\n\n", 1)[1].replace(
                "if value < low:", "if value <= low:")}
    for name, tests in verdict_attacks(env):
        verdict = unit_test_verdict(f"```python\n{tests}\n```", item, Path(env["corpus"]),
                                    timeout=5)
        forged = verdict["passes_original"] is True and verdict["kills_mutant"] is True
        records.append({"attack": name, "status": verdict["status"],
                        "reason": verdict["reason"], "isolation": verdict.get("isolation"),
                        "problems": ["counted as passing the original and killing the "
                                     "mutant"] if forged else []})
    leftovers = [p.name for p in scratch.iterdir() if p.name.startswith("trackb-sandbox-")]
    records.append({"attack": "(clean-up)", "status": "ok", "reason": "",
                    "problems": [f"left behind: {leftovers}"] if leftovers else []})
    records.append({"attack": "(parent alive)", "status": "ok", "reason": str(os.getpid()),
                    "problems": []})
    out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    run(Path(sys.argv[1]), control="--control" in sys.argv[2:])
