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
