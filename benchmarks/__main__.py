"""``python -m benchmarks``: run every benchmark module in this folder."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> int:
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                   if m.name.startswith("bench_"))
    if not names:
        print("benchmarks: none defined yet (the eval-speed and padding benchmarks arrive "
              "with issue 5)")
        return 0
    for name in names:
        print(f"== {name}")
        importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
