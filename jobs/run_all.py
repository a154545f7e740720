"""Container entry: `python -m jobs.run_all` = `trackb run-all` (same options, same exit codes)."""

import sys

from jobs._entry import run_command

if __name__ == "__main__":
    sys.exit(run_command("run-all"))
