"""A campaign's evidence pack: one archive (tar.gz) with a signed manifest, checked offline.

    evidence-<campaign>/manifest.json    {"schema": "vota-evidence/1", "campaign_id", "vin", "made",
                                          "signer": <key id>, "files": {name: {"sha256", "size"}},
                                          "clauses": [[clause, asks, where], ...]}
    evidence-<campaign>/manifest.sig     base64 Ed25519 signature over manifest.json as stored
    evidence-<campaign>/<name>           every file the manifest names: summary.json, and from the vehicle
                                         update-log.jsonl, campaign-log.jsonl, campaign/... (results, traces,
                                         the signed campaign), or from the cloud's store reports.jsonl (each
                                         report as the vehicle signed it) and traces/

``verify_pack`` checks the signature, every file against its digest (none missing, none added),
the update log's chain and signatures, and that each of the campaign's entries is in that log
as written. The archive is read defensively (regular files inside its directory only, bounded).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.adapters.storage import atomic_write_bytes
from agent.adapters.update_log import verify_log_data
from agent.core.evidence import CLAUSES
from agent.core.roles import key_id
from agent.core.signed_report import check_report

__all__ = ["write_pack", "verify_pack", "SCHEMA"]

SCHEMA = "vota-evidence/1"
MAX_PACK = 1 << 30
MAX_MEMBERS = 100_000


def write_pack(out: Path, campaign_id: str, vin: str | None, files: Mapping[str, bytes],
               key: Ed25519PrivateKey | None) -> dict[str, Any]:
    """Write the pack (atomically); its manifest."""
    manifest = {"schema": SCHEMA, "campaign_id": campaign_id, "vin": vin,
                "made": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "signer": key_id(key.public_key()) if key is not None else None,
                "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                          for name, data in sorted(files.items())},
                "clauses": [list(c) for c in CLAUSES]}
    raw = json.dumps(manifest, indent=1, sort_keys=True).encode()
    members = {"manifest.json": raw, **dict(files)}
    if key is not None:
        members["manifest.sig"] = base64.b64encode(key.sign(raw)) + b"\n"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"evidence-{campaign_id}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, int(_dt.datetime.now().timestamp())
            tar.addfile(info, io.BytesIO(data))
    atomic_write_bytes(out, buffer.getvalue())
    return manifest


def _read(path: Path) -> dict[str, bytes]:
    """The archive's files by name within its one top directory; ValueError when it is not a pack."""
    if path.stat().st_size > MAX_PACK:
        raise ValueError(f"larger than {MAX_PACK >> 20} MiB")
    out: dict[str, bytes] = {}
    top = None
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for n, member in enumerate(tar):
                if n >= MAX_MEMBERS:
                    raise ValueError(f"more than {MAX_MEMBERS} members")
                head, _, name = member.name.partition("/")
                top = top or head
                if (not member.isfile() or head != top or not name or name.startswith("/")
                        or ".." in name.split("/")):
                    raise ValueError(f"{member.name!r}: not a file inside the pack's directory")
                handle = tar.extractfile(member)
                assert handle is not None
                out[name] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"not a readable archive ({exc})") from None
    return out


def verify_pack(path: Path, key: Ed25519PublicKey | None,
                vehicle_key: Ed25519PublicKey | None = None) -> dict[str, Any]:
    """``{"ok", "campaign_id", "files", "problems"}``: every problem found, the first first. A pack
    from the cloud's store carries the vehicle's reports instead of its log: each is checked
    against ``vehicle_key`` when given."""
    problems: list[str] = []
    try:
        members = _read(path)
    except ValueError as exc:
        return {"ok": False, "campaign_id": None, "files": 0, "problems": [f"{path}: {exc}"]}
    raw = members.pop("manifest.json", None)
    try:
        manifest = json.loads(raw) if raw is not None else None
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or not isinstance(manifest.get("files"), dict):
        return {"ok": False, "campaign_id": None, "files": 0, "problems": ["no vota-evidence/1 manifest.json"]}
    signature = members.pop("manifest.sig", None)
    if key is not None:
        try:
            key.verify(base64.b64decode(signature or b""), raw or b"")
        except (InvalidSignature, ValueError):
            problems.append("manifest.sig does not verify with the key given: the pack was changed or signed by another")
    elif signature is None:
        problems.append("the pack is not signed")
    listed = manifest["files"]
    for name in sorted(set(listed) | set(members)):
        entry, data = listed.get(name), members.get(name)
        if data is None:
            problems.append(f"{name}: named by the manifest, missing")
        elif not isinstance(entry, dict):
            problems.append(f"{name}: in the archive, not in the manifest")
        elif hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            problems.append(f"{name}: its SHA-256 is not the manifest's: changed")
    if "reports.jsonl" in members:
        problems += _report_problems(members["reports.jsonl"], manifest, vehicle_key)
    else:
        problems += _log_problems(members, key)
    return {"ok": not problems, "campaign_id": manifest.get("campaign_id"), "vin": manifest.get("vin"),
            "files": len(listed), "problems": problems}


def _report_problems(reports: bytes, manifest: Mapping[str, Any], vehicle_key: Ed25519PublicKey | None) -> list[str]:
    """The vehicle's reports as the cloud stored them: each of the pack's vehicle and campaign,
    and (with its key) signed by the vehicle."""
    problems = []
    keys = {key_id(vehicle_key): vehicle_key} if vehicle_key is not None else None
    for number, line in enumerate(reports.splitlines(), 1):
        try:
            doc = json.loads(line)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict):
            problems.append(f"reports.jsonl line {number}: not a report")
            continue
        if doc.get("vin") != manifest.get("vin") or doc["body"].get("campaign_id") != manifest.get("campaign_id"):
            problems.append(f"reports.jsonl line {number}: another vehicle's or campaign's report")
        elif keys is not None:
            why = check_report(doc, str(doc.get("vin")), str(doc.get("type")), keys)
            if why is not None:
                problems.append(f"reports.jsonl line {number}: {why}")
    return problems


def _log_problems(members: Mapping[str, bytes], key: Ed25519PublicKey | None) -> list[str]:
    log, extract = members.get("update-log.jsonl"), members.get("campaign-log.jsonl")
    if log is None or extract is None:
        return ["the update log or the campaign's entries are missing"]
    found = verify_log_data(log, key)
    problems = []
    if not found["ok"]:
        b = found["broken"]
        problems.append(f"update-log.jsonl: broken at line {b['line']}: {b['why']}")
    lines = set(log.splitlines())
    if any(line not in lines for line in extract.splitlines()):
        problems.append("campaign-log.jsonl: an entry is not in the update log as written")
    return problems
