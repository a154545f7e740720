"""Errors every stage raises, each carrying the exit code its job returns.

Exit codes follow BSD ``sysexits.h`` so that a Kubernetes ``podFailurePolicy`` can
tell permanent failures (bad input or config: retrying cannot help) from transient
ones (a server that is not up yet: retrying can).
"""

from __future__ import annotations

EXIT_FAILURE = 1  # a bug or anything unexpected
EXIT_CONFIG = 64  # EX_USAGE: bad configuration or arguments (permanent)
EXIT_DATA = 65  # EX_DATAERR: input exists but is unusable (permanent)
EXIT_NO_INPUT = 66  # EX_NOINPUT: an input does not exist (permanent)
EXIT_CANT_CREATE = 73  # EX_CANTCREAT: the output store cannot be written (permanent)
EXIT_TEMPORARY = 75  # EX_TEMPFAIL: a server or store is unreachable now (retryable)
# Not sysexits: the k8s launcher's "a stage of this run failed for good" (its Job's own
# retries are spent, or its cause is permanent). The launcher Job must not retry it: a new
# launcher would only rerun the failed stage with its own retries again.
EXIT_STAGE_FAILED = 80
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM: eviction, node drain, helm upgrade, kill

PERMANENT_EXIT_CODES = (EXIT_CONFIG, EXIT_DATA, EXIT_NO_INPUT, EXIT_CANT_CREATE)


class TrackbError(Exception):
    """Base of every error trackb reports to a user as one line."""

    exit_code = EXIT_FAILURE


class ConfigError(TrackbError):
    """The configuration or a command-line value is invalid."""

    exit_code = EXIT_CONFIG


class InputError(TrackbError):
    """An input exists but cannot be used (empty corpus, corrupt file, ...)."""

    exit_code = EXIT_DATA


class MissingInputError(TrackbError):
    """An input URI names nothing."""

    exit_code = EXIT_NO_INPUT


class StoreError(TrackbError):
    """The artifact store cannot be read or written (permissions, credentials)."""

    exit_code = EXIT_CANT_CREATE


class UnavailableError(TrackbError):
    """A server (teacher, object store) cannot be reached now; retrying may help."""

    exit_code = EXIT_TEMPORARY


class Terminated(BaseException):
    """SIGTERM arrived (see :func:`raise_on_sigterm`).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it.
    """

    exit_code = EXIT_TERMINATED


def raise_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread.

    Python as a container's PID 1 has no default action for SIGTERM (the kernel does not
    kill PID 1 with it), so without a handler an eviction waits out the grace period and
    ends in SIGKILL; with it, the process unwinds (no manifest is written) and exits 143.
    A no-op outside the main thread, where signal handlers cannot be set.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)

