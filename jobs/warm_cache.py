"""Container entry: `python -m jobs.warm_cache` = `trackb warm-cache` (same options, same exit codes)."""

import sys

from jobs._entry import run_command

if __name__ == "__main__":
    sys.exit(run_command("warm-cache"))
