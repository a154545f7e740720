"""How much extract + task building costs over just parsing the corpus (issue P1).

Over ``pypi:verl==0.9.1`` (resolved with trackb_core.corpus, cached after the first
download): the subject is what ``trackb extract`` computes, ``extract_functions`` then
``build_tasks`` for every task family (functions, signatures, docstring stripping, the
corpus-wide balanced bug mutations). The baseline is reading and ``ast.parse`` of the
same files in the same process, the floor for anything that looks at their AST.
Times are this process's CPU time (other work on a shared machine inflates wall time
unevenly); each round times the baseline and then the subject, and the median of the
rounds' ratios is reported. Goal: ratio <= 1.5.
"""

from __future__ import annotations

import ast
import statistics
import time
import warnings

CORPUS = "pypi:verl==0.9.1"
ROUNDS = 5
GOAL = 1.5


def main() -> None:
    from trackb_core.corpus import python_files, resolve_corpus
    from trackb_core.errors import TrackbError
    from trackb_core.extract import extract_functions
    from trackb_core.families import names
    from trackb_core.tasks import build_tasks

    try:
        corpus = resolve_corpus(CORPUS)
    except TrackbError as exc:
        print(f"bench_extract: skipped: {CORPUS} is not available ({exc})")
        return
    files = python_files(corpus.path)
    baseline: list[float] = []
    phases: dict[str, list[float]] = {"extract": [], "tasks": []}
    for _ in range(ROUNDS):
        started = time.process_time()
        for path in files:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ast.parse(path.read_bytes().decode("utf-8"))
        baseline.append(time.process_time() - started)

        parsed: dict = {}
        started = time.process_time()
        functions, _, _ = extract_functions(corpus.path, files, 5, 60, 1_000_000,
                                            parsed=parsed)
        middle = time.process_time()
        tasks, _ = build_tasks(functions, list(names()), 42, parsed=parsed)
        phases["extract"].append(middle - started)
        phases["tasks"].append(time.process_time() - middle)
        del parsed, functions
    totals = [a + b for a, b in zip(phases["extract"], phases["tasks"], strict=True)]
    # Each round's baseline ran right before its subject, under the same load: the
    # median of the paired ratios is steadier than a ratio of separate minimums.
    ratios = sorted(t / b for t, b in zip(totals, baseline, strict=True))
    ratio = statistics.median(ratios)
    print(f"extract+tasks over {CORPUS}: {len(files)} files -> {len(tasks)} tasks; median "
          f"{statistics.median(totals):.2f} s CPU (extract "
          f"{statistics.median(phases['extract']):.2f} s, tasks "
          f"{statistics.median(phases['tasks']):.2f} s) over {ROUNDS} rounds")
    print(f"baseline: read + ast.parse of the same files, median "
          f"{statistics.median(baseline):.2f} s CPU; ratio {ratio:.2f}x (rounds "
          f"{ratios[0]:.2f}-{ratios[-1]:.2f}x); goal <= {GOAL}x: "
          f"{'met' if ratio <= GOAL else 'NOT met'}")

if __name__ == "__main__":
    main()
