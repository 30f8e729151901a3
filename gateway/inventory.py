"""Version collection (D11): read every ECU's identification DIDs into an inventory."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.adapters.canbus import Segment
from agent.adapters.trace_files import write_link_trace
from agent.adapters.uds_client import RawCodec, UdsLink, describe_failure
from agent.core.config import EcuConfig, VehicleConfig
from agent.core.trace import TraceHeader, TraceRecorder
from agent.protocol.ecu import DID, StagedImage, decode_staged_image
from agent.protocol.uds import Nrc
from gateway.buses import Buses

__all__ = ["collect_versions", "EcuImages", "read_images"]


@dataclass(frozen=True)
class EcuImages:
    """What an ECU runs and holds staged, read back from it (None: it did not say)."""

    version: str | None
    sha256: str | None
    staged: StagedImage | None

    def runs(self, version: str, sha256: str) -> bool:
        return self.version == version and self.sha256 == sha256

    def holds_staged(self, version: str, sha256: str) -> bool:
        return self.staged is not None and self.staged.sha256 == sha256 and self.staged.version == version


def read_images(config: VehicleConfig, buses: Buses, name: str, p2: float = 0.5) -> EcuImages:
    """F189, F1A0 and F1A1 of one ECU, on one link, holding the ECU (a resumed install asks
    each ECU where it is before deciding what to do with it)."""
    ecu = config.ecu(name)
    values: dict[int, bytes | None] = {}
    spec = ecu.flash_profile.version
    dids = (spec.did, DID.IMAGE_DIGEST, DID.STAGED_IMAGE)
    with buses.ecu(name, "read images") as segment, \
            UdsLink(segment, ecu.request_id, ecu.response_id, name=ecu.name, p2=p2,
                    dids={d: RawCodec() for d in dids}) as link:
        for did in dids:
            for _ in range(3):  # a busy or just-reset ECU gets a second chance
                try:
                    values[did] = bytes(link.client.read_data_by_identifier(did).service_data.values[did])
                    break
                except Exception:  # noqa: BLE001 - unknown stays None; the caller decides
                    values[did] = None
                    time.sleep(0.1)
    version, digest, staged = (values.get(d) for d in dids)
    return EcuImages(None if version is None else spec.decode(version),
                     None if digest is None else digest.hex(),
                     None if staged is None else decode_staged_image(staged))


def _read_ecu(segment: Segment, ecu: EcuConfig, p2: float, trace_dir: Path | None = None) -> dict[str, Any]:
    """One ECU's identification. With ``trace_dir``, the reads are traced (stage ``link``, step
    ``inventory``) into ``<trace_dir>/<ecu>.link.trace.jsonl`` with its result beside it, and the
    entry names the trace (``trace_file``, relative to the directory above ``trace_dir``)."""
    entry: dict[str, Any] = {"ecu": ecu.name, "segment": ecu.segment, "request_id": ecu.request_id, "response_id": ecu.response_id}
    version = ecu.flash_profile.version
    wanted = {**DID.INVENTORY, "software_version": version.did}
    dids = {did: RawCodec() for did in (*wanted.values(), DID.IMAGE_DIGEST)}
    recorder = None if trace_dir is None else TraceRecorder(TraceHeader(
        stage="link", client="GW", server=ecu.name, packet=ecu.name, request_id=ecu.request_id,
        response_id=ecu.response_id, functional_id=ecu.functional_id, started=time.time(), extra={"segment": ecu.segment}))
    with UdsLink(segment, ecu.request_id, ecu.response_id, name=ecu.name, p2=p2, dids=dids, recorder=recorder) as link, \
            link.step("inventory"):
        nrc = _read_dids(link, entry, wanted, version.decode)
    answered = [r for r in (entry.get("errors") or {}).values() if "timeout" not in str(r)]
    entry["reachable"] = entry.get("software_version") is not None or bool(answered)
    if entry.get("software_version") is None and answered:
        entry["mode"] = "boot"  # it answers but tells no application version: its bootloader runs
    if trace_dir is not None and recorder is not None:
        _write_trace(trace_dir, ecu.name, recorder, entry, nrc)
    return entry


def _write_trace(trace_dir: Path, name: str, recorder: TraceRecorder, entry: dict[str, Any], nrc: int | None) -> None:
    errors = entry.get("errors") or {}
    key, reason = next(iter(errors.items())) if errors else (None, None)
    path = write_link_trace(trace_dir, name, recorder, (f"inventory: {key}", str(reason), nrc) if key else None,
                            name=f"inventory-{name}")
    entry["trace_file"] = f"{trace_dir.name}/{path.name}"


def _tolerated(link: UdsLink) -> None:
    rec = link.connection.recorder
    if rec is not None and rec.current is not None:
        rec.current.extra["tolerated"] = True


def _read_dids(link: UdsLink, entry: dict[str, Any], wanted: dict[str, int], decode_version: Any) -> int | None:
    """Fills ``entry``; the NRC of the first read refused, if any."""
    first_nrc = None
    for key, did in wanted.items():
        try:
            value = bytes(link.client.read_data_by_identifier(did).service_data.values[did])
            if did == DID.BOOT_SOFTWARE and value[:1] == b"\x01":
                value = value[1:]  # numberOfModules (one module), then its identification
            entry[key] = decode_version(value) if key == "software_version" else value.decode("ascii", "replace")
        except Exception as exc:  # noqa: BLE001 - a silent ECU is reported, not fatal
            entry[key] = None
            reason, nrc = describe_failure(exc)
            if nrc == Nrc.RequestOutOfRange and key != "software_version":
                _tolerated(link)  # an identification DID this ECU does not have: said, not a failure
                entry.setdefault("unsupported", []).append(key)
                continue
            entry.setdefault("errors", {})[key] = reason
            first_nrc = first_nrc if first_nrc is not None else nrc
            if "timeout" in reason:
                break
    if entry.get("software_version") is not None:  # F1A0: the SHA-256 of the image it runs
        try:
            entry["image_sha256"] = bytes(link.client.read_data_by_identifier(DID.IMAGE_DIGEST)
                                          .service_data.values[DID.IMAGE_DIGEST]).hex()
        except Exception as exc:  # noqa: BLE001 - informative only
            entry["image_sha256"] = None
            reason, nrc = describe_failure(exc)
            if nrc == Nrc.RequestOutOfRange:
                _tolerated(link)
                entry.setdefault("unsupported", []).append("image_sha256")
                return first_nrc
            entry.setdefault("errors", {})["image_sha256"] = reason
            first_nrc = first_nrc if first_nrc is not None else nrc
    return first_nrc


def _per_segment(config: VehicleConfig, names: list[str], work: Any, buses: Buses | None = None) -> dict[str, Any]:
    ecus = [config.ecu(n) for n in names]
    by_segment: dict[str, list[EcuConfig]] = {}
    for ecu in ecus:
        by_segment.setdefault(ecu.segment, []).append(ecu)
    out: dict[str, Any] = {}
    owner = buses if buses is not None else Buses(config)

    errors: list[BaseException] = []

    def run(seg_ecus: list[EcuConfig]) -> None:
        try:
            for ecu in seg_ecus:
                with owner.ecu(ecu.name, "version read") as segment:
                    out[ecu.name] = work(segment, ecu)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread (a bus that does not open)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seg_ecus,)) for seg_ecus in by_segment.values()]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        if buses is None:
            owner.shutdown()
    if errors:
        raise errors[0]
    return {n: out[n] for n in names if n in out}


def collect_versions(config: VehicleConfig, names: list[str] | None = None, p2: float = 0.5,
                     buses: Buses | None = None, trace_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every named ECU's identification, one thread per segment; ``trace_dir``: see ``_read_ecu``."""
    names = names or list(config.ecus)
    found = _per_segment(config, names, lambda seg, ecu: _read_ecu(seg, ecu, p2, trace_dir), buses)
    return [found[n] for n in names]
