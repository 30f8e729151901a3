"""The TBOX <-> gateway link beyond file transfer (``files``): gateway routines and records.

    31 01 0301 manifest                  start installing per the install manifest (a deployed file)
    31 03 0301 [campaign]                install status: 71 03 0301 SS DDDD TTTT (SS: 00 none, 01 running,
                                         02 succeeded, 03 failed, 04 refused, 05 staged and waiting for the
                                         vehicle's preconditions, 06 cancelled; DDDD of TTTT ECUs done)
    31 01 0302                           collect the ECU inventory (0x78 meanwhile), then ReadFile inventory.json
    31 01 0304 campaign                  cancel that campaign's install (the TBOX ended the campaign): journaled at
                                         once (a restart does not resume it, a later manifest for it is refused),
                                         what it staged discarded; answered with the status record of 31 03 0301
                                         (01 while it winds down: ask again; 06 cancelled, 02/03 it had ended
                                         before, 00 it never started). Idempotent.
    31 01 0303 op ecu 00 arg             owner content on an ECU behind the gateway:
        op 01 store <file>, 02 show <file>, 03 stop, 04 read <did:2>, 05 delete <file>
        ->  71 01 0303 SS data           SS 00 done (data: a DID's value), 01 refused, 02 no answer (reason in ASCII)
    22 F1B0                              the gateway's boot id: 62 F1B0 + 8 bytes drawn at each start (a TBOX
                                         whose deploy broke off tells a restarted gateway from a faulty one)
    27 01 / 27 02 key                    SecurityAccess, when deploy.security_secret is set: a 16-byte seed,
                                         the key HMAC-SHA256(secret, "vota-deploy" + seed) (32 bytes); until
                                         then 0x38 and every routine answer 0x33; 3 wrong keys lock it for
                                         deploy.lockout_s (0x36, then 0x37), also across a gateway restart

Install manifest (JSON, deployed like a package, then named in routine 0x0301)::

    {"format": "vota-install", "version": 1, "campaign_id": "c-0001", "activation": "atomic",
     "jobs": [{"ecu": "vcu", "package": "vcu-2.0.0.bin", "version": "2.0.0", "order": 0}],
     "proof": {"campaign": "<base64 of the signed campaign envelope>"}}

``activation`` (per_ecu when absent) and ``order`` (0 when absent) are what gateway/install.py follows;
with ``"preconditions": {"ecu": "bcm", "min_soc": 30, ..., "install_s": 185.0, "until": <epoch>}`` it
reads the vehicle's state from that ECU while it stages and before each activation, and waits
(status 0x05) before activating while they do not hold (agent/core/preconditions.py: Gate).
``proof`` is what the gateway checks the install against before it erases anything (gateway/verify.py):
the signed campaign, or for a software item of owner content ``{"content": {"manifest": <b64>,
"signature": <b64>, "item": <id>}}``, the signed bundle manifest and the item; plus ``"keys":
[<b64>, ...]``, the signed key lists the TBOX has taken (agent/core/roles.py), which the gateway
takes too before it checks the signatures.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from agent.errors import InstallRefused
from agent.protocol.files import is_name

__all__ = ["deploy_key", "INSTALL_ROUTINE", "INVENTORY_ROUTINE", "CONTENT_ROUTINE", "CANCEL_ROUTINE", "InstallStatus",
           "ContentOp", "RelayStatus",
           "encode_install_status", "decode_install_status", "encode_content_request", "decode_content_request",
           "InstallJob", "InstallManifest", "encode_manifest", "parse_manifest", "INVENTORY_FILE", "STATUS_RECORD_LENGTH",
           "BOOT_ID_DID", "SECURED_SERVICES", "AUTH_TRAILER", "session_key", "secure_request", "open_request"]

INSTALL_ROUTINE = 0x0301
INVENTORY_ROUTINE = 0x0302
CONTENT_ROUTINE = 0x0303
CANCEL_ROUTINE = 0x0304
BOOT_ID_DID = 0xF1B0
INVENTORY_FILE = "inventory.json"
LINK_RESULT_SCHEMA = "vota-link-result/1"  # the result beside a trace of stage link (exchanges around the transfers)
STATUS_RECORD_LENGTH = 5


class InstallStatus(IntEnum):
    NONE = 0x00
    RUNNING = 0x01
    SUCCEEDED = 0x02
    FAILED = 0x03
    REFUSED = 0x04  # the manifest could not be used
    WAITING = 0x05  # staged, waiting for the vehicle's preconditions before activating (<campaign>/preconditions.json)
    CANCELLED = 0x06  # the TBOX cancelled it: what it staged was discarded (<campaign>/summary.json says what)


class ContentOp(IntEnum):
    STORE = 0x01
    SHOW = 0x02
    STOP = 0x03
    READ_DID = 0x04
    DELETE = 0x05


class RelayStatus(IntEnum):
    DONE = 0x00
    REFUSED = 0x01  # the ECU (or the gateway) said no: trying again will not help
    SILENT = 0x02  # the ECU did not answer (asleep, unplugged): worth trying later


def deploy_key(secret: str, seed: bytes) -> bytes:
    """The deploy link's SecurityAccess key: HMAC-SHA256 over the seed, all 32 bytes."""
    return hmac.new(secret.encode(), b"vota-deploy" + seed, hashlib.sha256).digest()


# ---- authenticated requests, in the spirit of AUTOSAR SecOC (docs/security.md#authenticated-requests-on-the-backbone)
# After SecurityAccess both sides hold a session key, HMAC-SHA256(secret, "vota-secoc-v1" + seed).
# Every request of these services then ends with freshness (4 bytes, a counter that rises with each
# request of the session, big-endian) and a MAC (the first 8 bytes of HMAC-SHA256(session key,
# freshness + the request)); the gateway takes a request only with a valid MAC and a freshness
# above the last one it took in the session.
SECURED_SERVICES = frozenset({0x31, 0x36, 0x37, 0x38})
AUTH_TRAILER = 12  # freshness 4 + MAC 8
_MAC_LENGTH = 8


def session_key(secret: str, seed: bytes) -> bytes:
    return hmac.new(secret.encode(), b"vota-secoc-v1" + seed, hashlib.sha256).digest()


def _mac(key: bytes, freshness: bytes, request: bytes) -> bytes:
    return hmac.new(key, freshness + request, hashlib.sha256).digest()[:_MAC_LENGTH]


def secure_request(key: bytes, freshness: int, request: bytes) -> bytes:
    """The request with its freshness and MAC appended."""
    fresh = freshness.to_bytes(4, "big")
    return request + fresh + _mac(key, fresh, request)


def open_request(key: bytes, last: int, data: bytes) -> tuple[bytes, int] | str:
    """(the request without its authenticator, its freshness), or why it is refused."""
    if len(data) <= AUTH_TRAILER:
        return "no authenticator"
    request, fresh, mac = data[:-AUTH_TRAILER], data[-AUTH_TRAILER:-_MAC_LENGTH], data[-_MAC_LENGTH:]
    if not hmac.compare_digest(mac, _mac(key, fresh, request)):
        return "MAC does not verify"
    freshness = int.from_bytes(fresh, "big")
    if freshness <= last:
        return f"freshness {freshness} not above {last}: a replay"
    return request, freshness


def encode_install_status(status: int, done: int, total: int) -> bytes:
    return bytes((status,)) + done.to_bytes(2, "big") + total.to_bytes(2, "big")


def decode_install_status(record: bytes) -> tuple[int, int, int] | None:
    """(status, ECUs done, ECUs in total), or None when the record's layout is wrong."""
    if len(record) != STATUS_RECORD_LENGTH:
        return None
    return record[0], int.from_bytes(record[1:3], "big"), int.from_bytes(record[3:5], "big")


def encode_content_request(op: int, ecu: str, arg: bytes = b"") -> bytes:
    return bytes((op,)) + ecu.encode("ascii") + b"\x00" + arg


def decode_content_request(record: bytes) -> tuple[int, str, bytes] | None:
    """(op, ECU name, argument), or None when the record's layout is wrong."""
    if len(record) < 3 or b"\x00" not in record[1:]:
        return None
    ecu, _, arg = record[1:].partition(b"\x00")
    return record[0], ecu.decode("ascii", "replace"), arg


@dataclass(frozen=True)
class InstallJob:
    ecu: str
    package: str
    version: str
    order: int = 0
    delta: str | None = None  # the deployed patch to this image (its file name), sent when the ECU runs its base


@dataclass(frozen=True)
class InstallManifest:
    campaign_id: str
    jobs: tuple[InstallJob, ...]
    activation: str = "per_ecu"  # or atomic: stage every ECU, then activate them in order, roll back on failure
    proof: dict[str, Any] | None = None  # the signed documents the gateway verifies the install against
    arriving: bool = False  # packages may still be on their way: each job waits for its own (gateway/arrivals.py)
    # the vehicle's state the install needs, checked again while staging and before each activation
    # (agent/core/preconditions.py: Gate)
    preconditions: dict[str, Any] | None = None


def encode_manifest(manifest: InstallManifest) -> bytes:
    doc: dict[str, Any] = {"format": "vota-install", "version": 1, "campaign_id": manifest.campaign_id, "activation": manifest.activation,
           "jobs": [{"ecu": j.ecu, "package": j.package, "version": j.version, "order": j.order,
                     **({"delta": j.delta} if j.delta else {})} for j in manifest.jobs]}
    if manifest.proof is not None:
        doc["proof"] = manifest.proof
    if manifest.arriving:
        doc["arriving"] = True
    if manifest.preconditions is not None:
        doc["preconditions"] = manifest.preconditions
    return json.dumps(doc, indent=1).encode()


def parse_manifest(data: bytes) -> InstallManifest:
    """The manifest; InstallRefused says why it cannot be used (no I/O: whether packages exist is
    the caller's)."""
    try:
        doc: Any = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InstallRefused(f"malformed manifest ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != "vota-install" or doc.get("version") != 1:
        raise InstallRefused("not a vota-install version 1 manifest")
    campaign = doc.get("campaign_id")
    if not is_name(campaign):
        raise InstallRefused("bad campaign_id")
    raw = doc.get("jobs")
    if not isinstance(raw, list) or not raw:
        raise InstallRefused("no jobs", campaign)
    jobs = []
    for job in raw:
        if not isinstance(job, dict) or not all(isinstance(job.get(k), str) for k in ("ecu", "package", "version")):
            raise InstallRefused("malformed manifest (a job needs ecu, package and version strings)", campaign)
        if not is_name(job["package"]):
            raise InstallRefused(f"package {job['package']!r} was not deployed", campaign)
        order = job.get("order", 0)
        if not isinstance(order, int) or isinstance(order, bool) or not 0 <= order <= 999:
            raise InstallRefused("malformed manifest (order must be an integer from 0 to 999)", campaign)
        delta = job.get("delta")
        if delta is not None and not is_name(delta):
            raise InstallRefused(f"delta {delta!r} was not deployed", campaign)
        jobs.append(InstallJob(job["ecu"], job["package"], job["version"], order, delta))
    activation = doc.get("activation", "per_ecu")
    if activation not in ("per_ecu", "atomic"):
        raise InstallRefused("malformed manifest (activation must be per_ecu or atomic)", campaign)
    proof = doc.get("proof")
    if proof is not None and not isinstance(proof, dict):
        raise InstallRefused("malformed manifest (proof must be an object)", campaign)
    arriving = doc.get("arriving", False)
    if not isinstance(arriving, bool):
        raise InstallRefused("malformed manifest (arriving must be true or false)", campaign)
    preconditions = doc.get("preconditions")
    if preconditions is not None and not isinstance(preconditions, dict):
        raise InstallRefused("malformed manifest (preconditions must be an object)", campaign)
    return InstallManifest(str(campaign), tuple(jobs), activation, proof, arriving, preconditions)
