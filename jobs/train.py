"""Container entry: `python -m jobs.train` = `trackb train` (same options, same exit codes)."""

import sys

from jobs._entry import run_command

if __name__ == "__main__":
    sys.exit(run_command("train"))
