"""Peak memory of extract over ten PyPI packages against verl alone (issue 15).

Each measurement runs ``trackb_core.extract.run`` in a fresh Python process, which
reports its own peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) when
it is done: one process over ``pypi:verl==0.9.1``, one over all of :data:`PACKAGES` (a
list of ten corpora, verl among them), and one that only imports the stage (the floor
every run pays). Hidden tests are off (``derive_tests=False``): deriving them runs the
corpus code in sandbox children, separate processes whose memory is bounded per module
by the sandbox, not by the number of files. The packages are fetched (pip, cached
under ``$TRACKB_CACHE``) before any measurement, so downloads are not measured either.
Goal: ten packages peak at most 1.3x verl alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

PACKAGES = (
    "pypi:verl==0.9.1",
    "pypi:requests==2.32.3",
    "pypi:click==8.1.7",
    "pypi:rich==13.9.4",
    "pypi:attrs==24.2.0",
    "pypi:jinja2==3.1.4",
    "pypi:flask==3.1.0",
    "pypi:werkzeug==3.1.3",
    "pypi:httpx==0.28.1",
    "pypi:pygments==2.18.0",
)
GOAL = 1.3

CHILD = """
import json, resource, sys, time
from trackb_core.extract import ExtractConfig, run
from trackb_core.store import LocalStore

corpus, out = json.loads(sys.argv[1]), sys.argv[2]
started = time.perf_counter()
counts = {}
if corpus is not None:
    manifest = run(ExtractConfig(corpus=corpus, derive_tests=False), LocalStore(out))
    counts = {k: manifest["counts"][k] for k in ("files", "functions", "tasks")}
print(json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": round(time.perf_counter() - started, 1), **counts}))
"""


def measure(corpus: str | list[str] | None) -> dict:
    """Run extract over ``corpus`` (None: import only) in a fresh process; its report.
    Raises RuntimeError if the process fails."""
    with tempfile.TemporaryDirectory(prefix="bench-extract-memory-") as out:
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(corpus), out],
                              capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"extract over {corpus} failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from trackb_core.corpus import resolve_corpus
    from trackb_core.errors import TrackbError

    started = time.perf_counter()
    try:
        for spec in PACKAGES:
            resolve_corpus(spec)  # fetched once, before any process is measured
    except TrackbError as exc:
        print(f"bench_extract_memory: skipped: a package is not available ({exc})")
        return
    floor = measure(None)
    alone = measure(PACKAGES[0])
    ten = measure(list(PACKAGES))
    ratio = ten["peak_rss_kb"] / alone["peak_rss_kb"]
    print(f"extract peak RSS (own process, hidden tests off; packages: "
          f"{', '.join(p.removeprefix('pypi:') for p in PACKAGES)})")
    print(f"  import only:      {floor['peak_rss_kb'] / 1024:8.1f} MiB")
    for label, result in ((f"{PACKAGES[0].removeprefix('pypi:')} alone:", alone),
                          ("ten packages:", ten)):
        print(f"  {label:<17} {result['peak_rss_kb'] / 1024:8.1f} MiB  ({result['files']} "
              f"files, {result['functions']} functions, {result['tasks']} tasks, "
              f"{result['seconds']} s)")
    verdict = "ok" if ratio <= GOAL else "ABOVE GOAL"
    print(f"  ratio ten / verl: {ratio:.2f} (goal <= {GOAL}: {verdict}); "
          f"{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
