"""The common exception root of vota.

Every error a user can cause (bad configuration, a missing file, an unknown ECU) is a
``VotaError``; the command line prints its message on one line and exits non-zero.
"""

from __future__ import annotations

__all__ = ["VotaError", "ConfigError", "UsageError", "FlashError", "TraceFormatError"]


class VotaError(Exception):
    """Root of every error vota raises on purpose."""

    exit_code = 1


class UsageError(VotaError):
    """The command line or its input files are wrong (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file is missing, unreadable or has a wrong key or value."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


class FlashError(VotaError):
    """A flash step failed; carries the step and the evidence (NRC, timeout, ...)."""

    def __init__(self, step: str, reason: str, nrc: int | None = None) -> None:
        self.step = step
        self.reason = reason
        self.nrc = nrc
        super().__init__(f"{step}: {reason}")


class TraceFormatError(VotaError):
    """A trace file cannot be read: truncated, garbage or an unknown format version."""
