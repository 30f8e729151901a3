"""The second phase of a vehicle-level campaign, one ECU at a time: activate a staged image,
roll an activated one back, discard a staged one, commit. Each is a short session of its own
with its header-only trace (stage ``activate``), written beside the flash traces:

    activate   10 03, 27 01/02, 31 01 <activate>, 11 01, (back) 22 F189, 22 F1A0: the new image runs
    rollback   10 03, 27 01/02, 31 01 <rollback>, 11 01, (back) 22 F189, 22 F1A0: the old image runs
    discard    10 03, 27 01/02, 31 01 <discard>, 10 01
    commit     10 03, 27 01/02, 31 01 <commit>, 10 01

What runs after activate and rollback is read back from the ECU (software version and SHA-256
of the active image), never assumed.
"""

from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from agent.adapters.canbus import Segment
from agent.adapters.trace_files import write_trace
from agent.adapters.uds_client import RawCodec, UdsLink, run_step
from agent.core.config import EcuConfig, GatewayConfig
from agent.core.trace import TraceHeader, TraceRecorder
from agent.errors import FlashError
from agent.protocol.ecu import DID, security_key
from agent.protocol.uds import ResetType, RoutineType, Session

__all__ = ["EcuAction", "ActionResult", "ACTIONS"]

log = logging.getLogger(__name__)

ACTIONS = ("activate", "rollback", "discard", "commit")


@dataclass
class ActionResult:
    ecu: str
    action: str
    result: str  # success | failed
    version_after: str | None = None
    sha256_after: str | None = None
    failed_step: str | None = None
    reason: str | None = None
    nrc: int | None = None
    started: str = ""
    duration_s: float = 0.0
    trace_file: str | None = None
    schema: str = field(default="vota-activation-result/1")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class EcuAction:
    def __init__(self, segment: Segment, ecu: EcuConfig, gateway: GatewayConfig, action: str,
                 expect: tuple[str, str | None] | None = None, stop: threading.Event | None = None,
                 on_step: Callable[[str, str, TraceRecorder], None] | None = None) -> None:
        """``expect``: (version, SHA-256 or None) the ECU must run after an activate or a rollback;
        ``on_step``: called with (ECU, step, the trace so far) as each step starts (the journal)."""
        self.on_step = on_step
        assert action in ACTIONS
        self.segment, self.ecu, self.gateway, self.action, self.expect = segment, ecu, gateway, action, expect
        self.stop = stop or threading.Event()
        self.recorder = TraceRecorder(TraceHeader(
            stage="activate", client="GW", server=ecu.name, packet=ecu.name, request_id=ecu.request_id,
            response_id=ecu.response_id, functional_id=ecu.functional_id, started=time.time(),
            extra={"segment": ecu.segment, "action": action}))
        self.step = ""

    @property
    def routine(self) -> int:
        return {"activate": self.ecu.activate_routine, "rollback": self.ecu.rollback_routine,
                "discard": self.ecu.discard_routine, "commit": self.ecu.commit_routine}[self.action]

    def run(self, out_dir: Path | None = None) -> ActionResult:
        started = time.time()
        result = ActionResult(self.ecu.name, self.action, "failed",
                              started=_dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"))
        ecu = self.ecu
        link = UdsLink(self.segment, ecu.request_id, ecu.response_id, name=ecu.name, recorder=self.recorder,
                       p2=ecu.p2_ms / 1000.0, p2_star=ecu.p2_star_ms / 1000.0,
                       security=lambda level, seed: security_key(ecu.security_secret, seed),
                       dids={d: RawCodec() for d in (DID.SOFTWARE_VERSION, DID.IMAGE_DIGEST)})
        try:
            self._sequence(link, result)
            result.result = "success"
        except FlashError as exc:
            result.failed_step, result.reason, result.nrc = exc.step, exc.reason, exc.nrc
            log.warning("%s: %s failed at %s: %s", ecu.name, self.action, exc.step, exc.reason)
        finally:
            link.close()
        result.duration_s = round(time.time() - started, 3)
        if out_dir is not None:
            path = out_dir / f"{ecu.name}.{self.action}.trace.jsonl"
            write_trace(path, self.recorder, result.result)
            result.trace_file = path.name
        return result

    def _do(self, step: str, action: Callable[[], Any]) -> Any:
        if self.stop.is_set():
            raise FlashError(step, "cancelled")
        if self.on_step is not None and step != self.step:
            self.on_step(self.ecu.name, step, self.recorder)
        self.step = step
        with self.recorder.step(step):  # each exchange with its step (x.step)
            return run_step(step, action, self.recorder)

    def _sequence(self, link: UdsLink, result: ActionResult) -> None:
        c = link.client
        self._do("extended_session", lambda: c.change_session(Session.extendedDiagnosticSession))
        self._do("security_access", lambda: c.unlock_security_access(self.ecu.security_level))
        self._do(self.action, lambda: self._routine(c))
        if self.action in ("discard", "commit"):
            self._do("default_session", lambda: c.change_session(Session.defaultSession))
            return
        self._do("ecu_reset", lambda: c.ecu_reset(ResetType.hardReset))
        self._wait_back(link)
        version = self._do("verify", lambda: c.read_data_by_identifier(DID.SOFTWARE_VERSION))
        digest = self._do("verify", lambda: c.read_data_by_identifier(DID.IMAGE_DIGEST))
        result.version_after = bytes(version.service_data.values[DID.SOFTWARE_VERSION]).decode("ascii", "replace")
        result.sha256_after = bytes(digest.service_data.values[DID.IMAGE_DIGEST]).hex()
        if self.expect is None:
            return
        version, sha256 = self.expect
        if result.version_after != version or (sha256 is not None and result.sha256_after != sha256):
            raise FlashError("verify", f"runs {result.version_after} ({result.sha256_after[:16]}...) after the reset, "
                                       f"expected {version}" + (f" ({sha256[:16]}...)" if sha256 else ""))

    def _routine(self, c: Any) -> Any:
        response = c.routine_control(self.routine, RoutineType.startRoutine)
        status = response.service_data.routine_status_record
        if status and status[0] != 0x00:
            raise FlashError(self.step, f"routine 0x{self.routine:04X} reported status 0x{status[0]:02X}")
        return response

    def _wait_back(self, link: UdsLink) -> None:
        if not link.wait_answering(self.gateway.reset_wait_ms / 1000.0):
            raise FlashError("ecu_reset", f"ECU did not come back within {self.gateway.reset_wait_ms} ms after reset")
