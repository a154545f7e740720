"""Write the platform presets: helm/trackb/ci/<name>-values.yaml and
jobs/configs/cluster-<name>.yaml, from the one table in trackb_core/k8s/presets.py.

    python scripts/gen_presets.py           # (re)write them
    python scripts/gen_presets.py --check   # exit 1 if any would change (CI, tests)
"""

from __future__ import annotations

import argparse
import sys

from trackb_core.k8s.presets import ROOT, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1, naming the stale files, instead of writing")
    args = parser.parse_args(argv)
    stale = [path for path, text in outputs().items()
             if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run `make presets`)", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(outputs()[path], encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
