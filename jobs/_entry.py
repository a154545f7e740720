"""The shared body of every ``jobs.<stage>`` module."""

from __future__ import annotations

import sys


def run_command(command: str, argv: list[str] | None = None) -> int:
    """Run ``trackb <command> <argv>`` and return its exit code."""
    from trackb_core.cli import main

    try:
        main.main(args=[command, *(sys.argv[1:] if argv is None else argv)],
                  prog_name=f"python -m jobs.{command.replace('-', '_')}",
                  standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
