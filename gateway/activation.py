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

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agent.adapters.canbus import Segment
from agent.adapters.storage import best_effort
from agent.adapters.uds_sequence import Peer, StepResult, UdsSequence
from agent.core.config import EcuConfig, GatewayConfig
from agent.core.faults import FaultCounter
from agent.core.trace import TraceHeader, TraceRecorder
from agent.errors import FlashError
from agent.protocol.ecu import DID
from agent.protocol.uds import ResetType, Session

__all__ = ["EcuAction", "ActionResult", "ACTIONS"]

ACTIONS = ("activate", "rollback", "discard", "commit")


@dataclass
class ActionResult(StepResult):
    ecu: str
    action: str
    version_after: str | None = None
    sha256_after: str | None = None
    schema: str = field(default="vota-activation-result/1")


class EcuAction(UdsSequence[ActionResult]):
    trace_steps = True  # each exchange with its step (x.step)

    def __init__(self, segment: Segment, ecu: EcuConfig, gateway: GatewayConfig, action: str,
                 expect: tuple[str, str | None] | None = None, stop: threading.Event | None = None,
                 on_step: Callable[[str, str, TraceRecorder], None] | None = None,
                 fault_counter: FaultCounter | None = None) -> None:
        """``expect``: (version, SHA-256 or None) the ECU must run after an activate or a rollback;
        ``on_step``: called with (ECU, step, the trace so far) as each step starts (the journal);
        ``fault_counter``: the activate-stage client faults, counted across the install's actions."""
        assert action in ACTIONS
        header = TraceHeader(stage="activate", client="GW", server=ecu.name, packet=ecu.name, request_id=ecu.request_id,
                             response_id=ecu.response_id, functional_id=ecu.functional_id, started=time.time(),
                             extra={"segment": ecu.segment, "action": action})
        journal = (lambda step: on_step(ecu.name, step, self.recorder)) if on_step is not None else None
        super().__init__(segment, Peer.ecu(ecu, ecu.flash_profile.version.did, DID.IMAGE_DIGEST), header, retries=gateway.retries,
                         late_grace_s=gateway.late_response_grace_ms / 1000.0, stop=stop, on_step=journal,
                         fault_counter=fault_counter)
        self.ecu, self.gateway, self.action, self.expect = ecu, gateway, action, expect
        self.out_dir: Path | None = None

    @property
    def routine_id(self) -> int:
        return {"activate": self.ecu.activate_routine, "rollback": self.ecu.rollback_routine,
                "discard": self.ecu.discard_routine, "commit": self.ecu.commit_routine}[self.action]

    def new_result(self) -> ActionResult:
        return ActionResult(ecu=self.ecu.name, action=self.action)

    def run(self, out_dir: Path | None = None) -> ActionResult:  # type: ignore[override]
        self.out_dir = out_dir
        return super().run()

    def finished(self, result: ActionResult) -> None:
        if self.out_dir is not None:  # evidence: a full disk does not stop a discard or a rollback
            path = self.out_dir / f"{self.ecu.name}.{self.action}.trace.jsonl"
            best_effort(lambda: self.write_trace(path, result), f"{self.ecu.name}: the {self.action} trace")

    def sequence(self, result: ActionResult) -> None:
        c = self.client
        self.step("extended_session", lambda: c.change_session(Session.extendedDiagnosticSession))
        self.step("security_access", lambda: c.unlock_security_access(self.ecu.security_level))
        self.routine(self.action, self.routine_id)
        if self.action in ("discard", "commit"):
            self.step("default_session", lambda: c.change_session(Session.defaultSession))
            return
        self.step("ecu_reset", lambda: c.ecu_reset(ResetType.hardReset))
        self.wait_back("ecu_reset", self.gateway.reset_wait_ms / 1000.0)
        spec = self.ecu.flash_profile.version
        version = self.step("verify", lambda: c.read_data_by_identifier(spec.did))
        digest = self.step("verify", lambda: c.read_data_by_identifier(DID.IMAGE_DIGEST))
        result.version_after = spec.decode(bytes(version.service_data.values[spec.did]))
        result.sha256_after = bytes(digest.service_data.values[DID.IMAGE_DIGEST]).hex()
        if self.expect is None:
            return
        version, sha256 = self.expect
        if result.version_after != version or (sha256 is not None and result.sha256_after != sha256):
            raise FlashError("verify", f"runs {result.version_after} ({result.sha256_after[:16]}...) after the reset, "
                                       f"expected {version}" + (f" ({sha256[:16]}...)" if sha256 else ""))
