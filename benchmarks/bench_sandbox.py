"""What a sandboxed run costs over spawning a bare interpreter (issue 10).

The subject is one :func:`trackb_core.sandbox.run_python` of ``pass``: the working
folder, the child's rlimits, namespace attempt, Landlock rules, seccomp filter and audit
hook, the output read back and the folder removed. The baseline is ``python -I -c pass``
spawned with :func:`subprocess.run` in the same process, the floor of any child
interpreter. Each round times the baseline, then the subject (wall clock: spawning is
mostly waiting on the kernel); the median of the rounds' paired ratios is reported, in
host mode and in pod mode (no user namespaces, no capabilities: the measurement runs
again under ``unshare --user`` + ``setpriv``, where the machine allows it). Goal: <= 3x.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time

ROUNDS = 25
GOAL = 3.0
POD_WRAPPER = ("echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv "
               "--bounding-set=-all --inh-caps=-all --no-new-privs \"$@\"")


def measure() -> dict:
    """``{"bare_ms", "sandbox_ms", "ratio", "ratios", "isolation"}`` over ROUNDS rounds."""
    from trackb_core.sandbox import run_python

    run_python("pass")  # warm the page cache and the network-namespace probe
    bare, boxed, ratios = [], [], []
    level = ""
    for _ in range(ROUNDS):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)
        middle = time.perf_counter()
        result = run_python("pass")
        ended = time.perf_counter()
        level = result.isolation.level
        bare.append(middle - started)
        boxed.append(ended - middle)
        ratios.append((ended - middle) / (middle - started))
    return {"bare_ms": statistics.median(bare) * 1000,
            "sandbox_ms": statistics.median(boxed) * 1000,
            "ratio": statistics.median(ratios), "low": min(ratios), "high": max(ratios),
            "isolation": level}


def _report(mode: str, numbers: dict) -> None:
    print(f"sandbox, {mode} mode ({numbers['isolation']}): median {numbers['sandbox_ms']:.1f} ms "
          f"per run vs {numbers['bare_ms']:.1f} ms for a bare `python -I -c pass`; ratio "
          f"{numbers['ratio']:.2f}x (rounds {numbers['low']:.2f}-{numbers['high']:.2f}x); "
          f"goal <= {GOAL}x: {'met' if numbers['ratio'] <= GOAL else 'NOT met'}")


def main() -> None:
    _report("host", measure())
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        print("sandbox, pod mode: skipped: unshare and setpriv are not installed")
        return
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c", POD_WRAPPER, "sh",
         sys.executable, "-c", "import json, benchmarks.bench_sandbox as b; "
         "print(json.dumps(b.measure()))"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"sandbox, pod mode: skipped: {proc.stderr.strip()[-300:]}")
        return
    _report("pod", json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
