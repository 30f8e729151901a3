"""The common exception root of vota.

Every error a user can cause (bad configuration, a missing file, an unknown ECU) is a
``VotaError``; the command line prints its message on one line and exits non-zero.

What a state machine does with an error is told by its class, in one place:
``TryLater`` (transient: a link down, a peer busy or asleep: the same action is tried again
after a pause, within its own bounded budget), ``Refused`` (the peer or the input said no,
with a reason code: final), any other ``VotaError`` (failed: final). Anything else is a
programming error and is not retried.
"""

from __future__ import annotations

__all__ = ["VotaError", "TryLater", "Refused", "InstallRefused", "ConfigError", "UsageError", "FlashError", "TraceFormatError"]


class VotaError(Exception):
    """Root of every error vota raises on purpose."""

    exit_code = 1


class TryLater(VotaError):
    """Transient: the same action may succeed after a pause."""


class Refused(VotaError):
    """Final: the peer or the input said no; ``reason`` is the code reported, ``extra`` the evidence."""

    def __init__(self, reason: str, detail: str, **extra: object) -> None:
        self.reason, self.detail, self.extra = reason, detail, extra
        super().__init__(f"{reason}: {detail}")


class InstallRefused(Refused):
    """The gateway will not run an install manifest: why (``detail``), and the campaign it names
    (None when the manifest is too broken to say)."""

    def __init__(self, detail: str, campaign_id: str | None = None) -> None:
        super().__init__("install_refused", detail, campaign_id=campaign_id)
        self.campaign_id = campaign_id

    def __str__(self) -> str:
        return self.detail


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
