"""What an install manifest asks for, turned into the plan the gateway runs, or refused.

Pure: the caller parses the manifest (``agent/protocol/link.py``), takes the key lists it carries
(``gateway/installer.py``) and reads the deployed files it names; ``build_plan`` checks every job
against the vehicle's ECUs, the deployed files and the signed documents (``gateway/verify.py``),
and returns the plan, or raises one ``InstallRefused`` with the campaign and the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import Mapping

from agent.core.config import VehicleConfig
from agent.core.preconditions import Gate, parse_gate, tightest
from agent.core.rxswin import Change
from agent.errors import InstallRefused
from agent.protocol.images import ImageError
from agent.protocol.link import InstallJob, InstallManifest
from gateway.jobs import Awaited, DeltaImage, FlashJob
from gateway.verify import Approved, Trust, check_install

__all__ = ["InstallPlan", "build_plan", "files_named"]


@dataclass(frozen=True)
class InstallPlan:
    campaign_id: str
    jobs: tuple[tuple[int, FlashJob], ...]  # (install order, job), in the campaign's order
    activation: str = "per_ecu"
    # a pipelined install: a job's package may still be on its way; it is waited for just before
    # its ECU is flashed (gateway/arrivals.py)
    arriving: bool = False
    gate: Gate | None = None  # the vehicle's state the install needs (gateway/install.py)
    rxswin: tuple[Change, ...] = ()  # what the signed campaign changes of the vehicle's RXSWIN set (gateway/rxswin.py)

    def groups(self) -> list[list[FlashJob]]:
        orders = sorted({order for order, _ in self.jobs})
        return [[job for order, job in self.jobs if order == o] for o in orders]

    def in_order(self) -> list[FlashJob]:
        return [job for _, job in sorted(self.jobs, key=lambda oj: oj[0])]


def files_named(manifest: InstallManifest) -> list[str]:
    """The deployed files the manifest's jobs name (full images and deltas)."""
    return [name for job in manifest.jobs for name in (job.package, job.delta) if name is not None]


def build_plan(manifest: InstallManifest, images: Mapping[str, bytes], trust: Trust, config: VehicleConfig) -> InstallPlan:
    """The plan of a manifest whose every job is known and signed; ``images``: the deployed files
    it names that are on the gateway (by name)."""
    cid = manifest.campaign_id
    for job in manifest.jobs:
        if job.ecu not in config.ecus:
            raise InstallRefused(f"unknown ECU {job.ecu!r}", cid)
        if manifest.arriving:
            continue  # a pipelined install: each job waits for its file (gateway/arrivals.py)
        if job.delta is not None and job.delta not in images:
            raise InstallRefused(f"delta {job.delta!r} was not deployed", cid)
        if job.package not in images and job.delta is None:
            raise InstallRefused(f"package {job.package!r} was not deployed", cid)
    gate = _gate(manifest, config)
    approved = check_install(manifest, images, trust, set(config.ecus))
    jobs = tuple((job.order, _unpacked(_job(job, images, approved), config, cid)) for job in manifest.jobs)
    return InstallPlan(cid, jobs, manifest.activation, manifest.arriving, gate, approved.rxswin)


def _gate(manifest: InstallManifest, config: VehicleConfig) -> Gate | None:
    """The preconditions the install runs under: the manifest's, held to the vehicle's own floor
    (``tbox.preconditions`` of the same vehicle.yaml: no manifest lowers them), the safe state when
    a safety-relevant ECU is in it; the vehicle's own when the manifest carries none although the
    vehicle has an ECU that reports its state (the gateway decides for itself)."""
    cid = manifest.campaign_id
    gate = parse_gate(manifest.preconditions, cid) if manifest.preconditions is not None else None
    floor = config.tbox.preconditions if config.tbox is not None else None
    safe = any(config.ecus[j.ecu].safety_relevant for j in manifest.jobs if j.ecu in config.ecus)
    if gate is None and floor is not None and floor.ecu is not None:
        gate = Gate(floor, 0.0, time.time() + floor.window_s)
    if gate is not None and floor is not None:
        gate = dataclasses.replace(gate, conditions=tightest(floor, gate.conditions, safe_state=safe))
    if gate is not None and gate.conditions.ecu not in config.ecus:
        raise InstallRefused(f"preconditions: unknown ECU {gate.conditions.ecu!r}", cid)
    return gate


def _unpacked(job: FlashJob, config: VehicleConfig, cid: str) -> FlashJob:
    """An image container read into its segments now: a damaged one is refused before any ECU is touched."""
    try:
        return job.unpacked(config.ecu(job.ecu))
    except ImageError as exc:
        raise InstallRefused(str(exc), cid) from None


def _matches(data: bytes | None, size: int, sha256: str) -> bool:
    return data is not None and len(data) == size and hashlib.sha256(data).hexdigest() == sha256


def _job(job: InstallJob, images: Mapping[str, bytes], approved: Approved) -> FlashJob:
    """A verified job: its full image when it was deployed, the delta to it when one was, or the
    signed file it waits for (a pipelined install)."""
    signed = approved.packages.get(job.ecu)
    delta = None
    if signed is not None and job.delta is not None and signed.delta is not None:
        d = signed.delta
        if not _matches(images.get(job.delta), d.size, d.sha256):  # a pipelined install: still on its way
            awaited = Awaited(d.name, d.size, d.sha256, signed.size, signed.sha256, d.base_sha256, d.image_crc32)
            return FlashJob(job.ecu, b"", job.version, job.package, guard_rollback=True, awaited=awaited,
                            image_auth=signed.image_auth)
        delta = DeltaImage(images[job.delta], d.base_sha256, signed.size, signed.sha256, d.image_crc32, job.delta)
    elif signed is not None and not _matches(images.get(job.package), signed.size, signed.sha256):
        awaited = Awaited(signed.name, signed.size, signed.sha256, signed.size, signed.sha256)
        return FlashJob(job.ecu, b"", job.version, job.package, guard_rollback=True, awaited=awaited,
                        image_auth=signed.image_auth)
    auth = signed.image_auth if signed is not None else None
    return FlashJob(job.ecu, images.get(job.package, b""), job.version, job.package, guard_rollback=True, delta=delta,
                    image_auth=auth)
