"""``vota bench --content SPEC``: an owner-content scenario on the whole simulated vehicle.

The cloud's trust platform reviews the content, builds it for the bench vehicle (owner
resource items encrypted for the vehicle's key) and signs it; the cloud offers it and
plays the owner's request; the TBOX runs it on a simulated clock that starts shortly
before the content's first start and covers its schedule in ``--content-seconds``. The
report lists every state change each item went through, at which simulated time.
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.adapters.config_files import load_yaml
from agent.adapters.storage import atomic_write_bytes
from agent.core.content import BundleRejected, parse_schedule
from agent.errors import UsageError

__all__ = ["load_content_spec", "content_keys", "content_clock", "run_content", "FINAL"]

FINAL = ("expired", "failed", "declined", "superseded")


def load_content_spec(path: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    spec = load_yaml(path)
    if not isinstance(spec, dict) or not isinstance(spec.get("items"), list) or not spec.get("bundle_id"):
        raise UsageError(f"{path}: expected a content spec with a bundle_id and an items list (see configs/content/)")
    files = {}
    for item in spec["items"]:
        if not isinstance(item, dict) or "source" not in item or "id" not in item:
            raise UsageError(f"{path}: every item needs an id and a source file")
        source = Path(path).parent / str(item["source"])
        try:
            files[str(item["id"])] = source.read_bytes()
        except OSError as exc:
            raise UsageError(f"{source}: cannot read item file ({exc.strerror})") from None
    return spec, files


def content_keys(out: Path) -> tuple[Ed25519PrivateKey, X25519PrivateKey]:
    """The trust platform's signing key and the bench vehicle's content key pair."""
    platform, vehicle = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    atomic_write_bytes(out / "keys" / "platform.pub", platform.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    atomic_write_bytes(out / "keys" / "vehicle.key", vehicle.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return platform, vehicle


def _first_moment(schedule: Any) -> _dt.datetime | None:
    """When the item could first run: its start, or its window's opening that day."""
    if schedule.start is None:
        return None
    if schedule.window is None:
        return schedule.start  # type: ignore[no-any-return]
    local = schedule.start.astimezone(schedule.tz)
    opening = _dt.datetime.combine(local.date(), schedule.window[0], tzinfo=schedule.tz)
    return max(opening, schedule.start)  # type: ignore[no-any-return]


def content_clock(spec: dict[str, Any], seconds: float) -> tuple[_dt.datetime, float]:
    """Simulated start (half an hour before an item could first run) and rate (the span up to
    the last expiry in ``seconds``); the real clock when the content has no dates."""
    try:
        schedules = [parse_schedule(spec.get("config", {}), i.get("config")) for i in spec["items"]]
    except BundleRejected as exc:
        raise UsageError(f"content spec: {exc}") from None
    firsts = [m for m in (_first_moment(s) for s in schedules) if m is not None]
    ends = [s.expiry for s in schedules if s.expiry is not None]
    if not firsts:
        return _dt.datetime.now(_dt.timezone.utc), 1.0
    begin = min(firsts) - _dt.timedelta(minutes=30)
    if not ends:
        return begin, 1.0
    span = (max(ends) - begin).total_seconds() + 600
    return begin, max(1.0, span / max(seconds, 1.0))


def run_content(cloud: Any, vin: str, spec: dict[str, Any], files: dict[str, bytes], begin: _dt.datetime,
                timeout: float) -> dict[str, Any]:
    trust = cloud.trust
    trust.submit(spec, files)
    reviewed = trust.review(str(spec["bundle_id"]), now=begin)
    if reviewed.status != "approved":
        print(f"cloud: content {spec['bundle_id']} not approved: {'; '.join(reviewed.problems)}", flush=True)
        return {"outcome": "refused", "problems": reviewed.problems, "items": {}}
    bundle_id = str(spec["bundle_id"])
    cloud.offer_content(bundle_id, vin)
    print(f"cloud: content {bundle_id} reviewed, signed and offered ({len(spec['items'])} items)", flush=True)
    ends = {}  # item -> the statuses that end its part of the scenario
    for item in spec["items"]:
        if item.get("policy", "auto") == "auto":
            endless = parse_schedule(spec.get("config", {}), item.get("config")).expiry is None
            ends[str(item["id"])] = FINAL + (("active",) if endless else ())
    seen, requested = 0, False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = cloud.content_events(vin, bundle_id)
        for e in events[seen:]:
            what = e.get("item") or "bundle"
            why = f" ({e.get('reason')}: {e.get('detail')})" if e.get("reason") else ""
            print(f"  {e.get('at', '')[:16]:<16}  {what}: {e['status']}{why}", flush=True)
            if e.get("status") == "offered" and not e.get("item") and not requested:
                cloud.request_content(vin, bundle_id)  # the owner taps "download" on the phone
                print("  owner: requested the content", flush=True)
                requested = True
        seen = len(events)
        state = cloud.content_state(vin, bundle_id)
        if state.get("bundle") == "failed":
            break
        if state.get("bundle") == "downloaded" and all(state.get(i) in done for i, done in ends.items()):
            break
        time.sleep(0.2)
    events = cloud.content_events(vin, bundle_id)
    items: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e.get("item"):
            items.setdefault(e["item"], []).append({"status": e["status"], "at": e.get("at"),
                                                    **({"reason": e["reason"]} if e.get("reason") else {})})
    state = cloud.content_state(vin, bundle_id)
    failed = state.get("bundle") == "failed" or any(s == "failed" for s in state.values())
    return {"bundle_id": bundle_id, "outcome": "failed" if failed else "success" if state.get("bundle") == "downloaded" else "timeout",
            "bundle": state.get("bundle"), "items": items}
