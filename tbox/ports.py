"""The TBOX campaign runner's two narrow ports, so that every state can be tested in-process
with fakes: the cloud (``agent/adapters/cloud_link.py`` is the real one) and the gateway
(``tbox/gateway_client.py``). Package downloads go through a third, one-function port
(``tbox/download.py``'s ``download`` by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

from agent.adapters.file_client import DeployResult

__all__ = ["CloudPort", "GatewayPort", "Fetch"]


class CloudPort(Protocol):
    def report(self, kind: str, body: dict[str, Any], msg_id: str | None = None) -> str:
        """Queue a report (``events``, ``inventory``, ``results``) under a stable id; sent at least once."""

    def report_trace(self, trace_id: str, trace: bytes, meta: dict[str, Any]) -> list[str]:
        """Queue a header-only trace (in parts when large); the ids of its messages."""


class GatewayPort(Protocol):
    def inventory(self) -> list[dict[str, Any]]:
        """The ECUs' versions, as the gateway collected them now (D11)."""

    def deploy(self, name: str, path: Path, sha256: str, out_dir: Path | None = None, *, resume: bool = False,
               progress: Callable[[int, int], None] | None = None) -> DeployResult:
        """Deploy one file to the gateway; its result and trace go to ``out_dir`` when given;
        ``progress(bytes sent, size)`` as it goes."""

    def install_status(self, campaign_id: str) -> tuple[int, int, int]:
        """(InstallStatus, ECUs done, ECUs in total)."""

    def start_install(self, manifest_name: str) -> None: ...

    def cancel_install(self, campaign_id: str, reason: str) -> tuple[int, int, int]:
        """Cancel the campaign's install (idempotent); the install status after the request."""

    def wait_install(self, campaign_id: str, timeout: float, poll: float = 0.5,
                     should_stop: Callable[[int, int], bool] | None = None,
                     waiting: Callable[[bool], None] | None = None) -> int:
        """Poll until the install is no longer running; its final InstallStatus. ``should_stop``
        is asked at every poll with (ECUs done, ECUs in total), ``waiting`` told whether the
        gateway waits for the vehicle's preconditions (that time does not count for ``timeout``)."""

    def read_file(self, path: str) -> bytes:
        """A file the gateway produced (results, traces, the inventory)."""

    def install_progress(self, campaign: str) -> dict[str, tuple[str, int, int]]:
        """Each ECU's (step, bytes done, bytes in all) while the install runs; empty when unknown."""

    def boot_id(self) -> bytes:
        """Changes at every start of the gateway (TryLater while it does not answer)."""

    def rxswin(self) -> dict[str, str] | None:
        """The vehicle's RXSWIN set, {regulation: RXSWIN}; None when the vehicle has no approvals."""

    def traced(self, directory: Path, name: str) -> ContextManager[None]:
        """The calls made inside, header-only traced into ``directory`` (``<name>.link.*``)."""


Fetch = Callable[..., Any]  # download(url, dest, size, sha256, *, progress, should_stop) -> DownloadInfo
