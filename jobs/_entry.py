"""The shared body of every ``jobs.<stage>`` module."""

from __future__ import annotations

import os
import sys


def run_command(command: str, argv: list[str] | None = None) -> int:
    """Run ``trackb <command> <argv>`` and return its exit code.

    A pod of a partitioned step's Indexed Job runs one part: its completion index and
    the Job's list of parts (environment, see trackb_core.k8s.jobspec.pod_partition)
    become ``--partition``, so the one ConfigMap serves every pod.
    """
    from trackb_core.cli import main

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args += _partition_args(os.environ)
        main.main(args=[command, *args],
                  prog_name=f"python -m jobs.{command.replace('-', '_')}",
                  standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def _partition_args(environ) -> list[str]:
    """``["--partition", I]`` in a pod of a partitioned step, else nothing. Raises
    SystemExit 64 (the config is wrong) for an environment that names no part."""
    from trackb_core.errors import ConfigError
    from trackb_core.k8s.jobspec import PARTITIONS_ENV, pod_partition

    if not environ.get(PARTITIONS_ENV):
        return []
    try:
        part = pod_partition(environ)
    except ConfigError as exc:
        print(f"trackb: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    return ["--partition", str(part)]
