"""The TBOX's reports about campaigns, also appended to the vehicle's update log
(``agent/adapters/update_log.py``): what the cloud is told is what the vehicle keeps."""

from __future__ import annotations

from typing import Any

from agent.adapters.update_log import UpdateLog
from tbox.ports import CloudPort

__all__ = ["LoggedCloud", "LOGGED_KINDS"]

LOGGED_KINDS = ("events", "results", "inventory")  # a campaign's lifecycle; traces go to the cloud only


class LoggedCloud:
    """A CloudPort that logs each campaign report it passes on (once per message id)."""

    def __init__(self, cloud: CloudPort, update_log: UpdateLog) -> None:
        self.cloud, self.update_log = cloud, update_log

    def report(self, kind: str, body: dict[str, Any], msg_id: str | None = None) -> str:
        stored = self.cloud.report(kind, body, msg_id)
        if kind in LOGGED_KINDS and isinstance(body.get("campaign_id"), str):
            self.update_log.append(kind, stored, body)
        return stored

    def report_trace(self, trace_id: str, trace: bytes, meta: dict[str, Any]) -> list[str]:
        return self.cloud.report_trace(trace_id, trace, meta)

    def __getattr__(self, name: str) -> Any:  # the link's own (start, stop, connected, status...)
        return getattr(self.cloud, name)
