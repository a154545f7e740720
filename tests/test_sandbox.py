"""The sandbox contains hostile code and reports what happened."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from trackb_core.sandbox import run_python


def test_plain_code_runs_with_its_files_and_output():
    result = run_python("import helper\nprint(helper.VALUE * 2)",
                        files={"helper.py": "VALUE = 21\n"}, timeout=5)
    assert result.status == "ok" and result.returncode == 0
    assert result.stdout.strip() == "42"
    assert result.isolation.meets_minimum and result.isolation.seccomp
    assert result.seconds > 0


def test_an_exception_is_a_failure_with_its_traceback():
    result = run_python("raise ValueError('boom')", timeout=5)
    assert result.status == "failed" and result.returncode == 1
    assert "ValueError: boom" in result.stderr


def test_fork_bomb_is_refused_and_the_machine_survives():
    before = len(os.listdir("/proc"))
    result = run_python("import os\nwhile True:\n    os.fork()", timeout=3)
    assert result.status == "failed"
    assert "os.fork" in result.refused
    assert len(os.listdir("/proc")) < before + 50  # no swarm of processes left behind


@pytest.mark.parametrize("snippet, refused", [
    ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
    ("import os\nos.system('true')", "os.system"),
    ("import ctypes\nctypes.CDLL(None).fork()", "ctypes symbol fork"),
    ("import os\nos.kill(os.getppid(), 9)", "os.kill"),
])
def test_other_ways_to_start_or_signal_processes_are_refused(snippet, refused):
    result = run_python(snippet, timeout=3)
    assert result.status == "failed"
    assert refused in result.refused


def test_memory_hog_is_stopped_by_the_address_space_limit():
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))",
                        timeout=3, memory_mb=256)
    assert result.status == "killed"
    assert "memory" in result.reason


def test_infinite_loop_times_out_and_is_killed():
    started = time.monotonic()
    result = run_python("while True:\n    pass", timeout=1.5)
    assert result.status == "timeout"
    assert time.monotonic() - started < 60  # killed, not left running: a hang guard


def test_a_sleeping_child_is_killed_with_its_group_on_timeout():
    result = run_python("import time\nprint('started', flush=True)\ntime.sleep(60)",
                        timeout=1.5)
    assert result.status == "timeout"
    assert result.stdout.strip() == "started"


def test_writes_outside_the_working_folder_are_refused(tmp_path):
    outside = tmp_path / "outside.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("keep")
    result = run_python(f"open({str(outside)!r}, 'w').write('x')", timeout=3)
    assert result.status == "failed" and not outside.exists()
    result = run_python(f"import os\nos.remove({str(keep)!r})", timeout=3)
    assert result.status == "failed" and keep.read_text() == "keep"
    result = run_python("import os\nos.symlink('/etc', 'here')\n"
                        "open('here/trackb-sandbox-test', 'w')", timeout=3)
    assert result.status == "failed" and not os.path.exists("/etc/trackb-sandbox-test")


def test_writes_inside_the_working_folder_work():
    result = run_python("import tempfile\nopen('a.txt', 'w').write('hi')\n"
                        "tempfile.NamedTemporaryFile().write(b'x')\nprint(open('a.txt').read())",
                        timeout=5)
    assert result.status == "ok" and result.stdout.strip() == "hi"


@pytest.fixture
def listening_server():
    """A TCP server on localhost that records whether anyone connected."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    connected = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            connected.append(True)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], connected
    stop.set()
    thread.join(2)
    server.close()


@pytest.mark.parametrize("network", ["auto", "seccomp"])
def test_no_network_in_either_mode(listening_server, network):
    port, connected = listening_server
    result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                        "timeout=1)\nprint('connected')", timeout=3, network=network)
    assert result.status == "failed"
    assert "connected" not in result.stdout and not connected
    assert "Operation not permitted" in result.stderr  # seccomp: no socket at all
    if network == "seccomp":
        assert not result.isolation.netns


def test_unix_socket_connections_are_refused():
    result = run_python("import socket\ns = socket.socket(socket.AF_UNIX)\n"
                        "s.connect('/run/some.sock')", timeout=3)
    assert result.status == "failed"
    assert "PermissionError" in result.stderr


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("TRACKB_SECRET_FOR_TEST", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))", timeout=5)
    assert result.status == "ok"
    assert "TRACKB_SECRET_FOR_TEST" not in result.stdout


def test_output_is_truncated():
    result = run_python("print('x' * 100000)", timeout=5, output_chars=1000)
    assert result.status == "ok" and len(result.stdout) == 1000 and result.truncated


def test_file_names_must_stay_inside():
    with pytest.raises(ValueError):
        run_python("pass", files={"../escape.py": ""})
    with pytest.raises(ValueError):
        run_python("pass", network="host")


def test_a_protected_process_keeps_its_environment_from_same_user_processes():
    """PR_SET_DUMPABLE 0: /proc/<pid>/environ is closed even to an unsandboxed child of the
    same user (as in a pod: no capabilities; root with CAP_SYS_PTRACE could still read)."""
    import subprocess
    import sys

    from test_sandbox_attacks import POD_WRAPPER, pod_mode_available

    if why := pod_mode_available():
        pytest.skip(why)
    read = ("import os\ntry:\n    print(open(f'/proc/{os.getppid()}/environ').read())\n"
            "except OSError as exc:\n    print('refused', exc.errno)\n")
    code = ("import os, subprocess, sys\n{protect}\n"
            "out = subprocess.run([sys.executable, '-c', {read!r}], "
            "capture_output=True, text=True).stdout\nprint(out)\n")
    env = {**os.environ, "TRACKB_CANARY": "c4n4ry"}

    def run(protect: str) -> str:
        command = ["unshare", "--user", "--map-root-user", "sh", "-c", POD_WRAPPER, "sh",
                   sys.executable, "-c", code.format(protect=protect, read=read)]
        return subprocess.run(command, capture_output=True, text=True, env=env).stdout

    assert "c4n4ry" in run("")  # without it, any same-user process reads the secret
    protected = run("from trackb_core.sandbox import protect_process\nprotect_process()")
    assert "c4n4ry" not in protected and "refused 13" in protected


def test_every_trackb_command_protects_its_process(monkeypatch):
    from click.testing import CliRunner

    from trackb_core import cli

    calls = []
    monkeypatch.setattr(cli, "protect_process", lambda: calls.append(True))
    CliRunner().invoke(cli.main, ["extract", "--help"])
    assert calls
