"""The stand-in cloud's trust platform (C2, C7): owners submit content, the platform
reviews it, and only approved content is built, encrypted for a vehicle and signed. A
bundle shared with a second vehicle keeps its ciphertext; only the content keys are
wrapped again, for that vehicle's key.

Review rules (what an OEM's content review checks before anything reaches a car): known
item classes, targets and policies; a title and an owner; sizes under the platform's
limit; a schedule that has not already ended; owner resource items always encrypted.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.core.content import CLASSES, POLICIES, BundleRejected, build_bundle, parse_schedule, sign_bundle
from agent.errors import VotaError

__all__ = ["TrustPlatform", "Submission", "ReviewRefused", "RESOURCE_TARGETS"]

RESOURCE_TARGETS = ("dlp_headlamp", "tail_light", "boot_animation")
MAX_ITEM = 16 * 1024 * 1024


class ReviewRefused(VotaError):
    def __init__(self, bundle_id: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"content {bundle_id} not approved: " + "; ".join(problems))


@dataclass
class Submission:
    spec: dict[str, Any]
    files: dict[str, bytes]
    status: str = "submitted"  # submitted | approved | refused
    problems: list[str] = field(default_factory=list)
    keys: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # item -> (content key, nonce)

    @property
    def bundle_id(self) -> str:
        return str(self.spec.get("bundle_id"))


class TrustPlatform:
    def __init__(self, key: Ed25519PrivateKey, resource_targets: tuple[str, ...] = RESOURCE_TARGETS,
                 max_item: int = MAX_ITEM) -> None:
        self.key, self.resource_targets, self.max_item = key, resource_targets, max_item
        self.submissions: dict[str, Submission] = {}

    def submit(self, spec: Mapping[str, Any], files: Mapping[str, bytes]) -> Submission:
        sub = Submission(copy.deepcopy(dict(spec)), dict(files))
        self.submissions[sub.bundle_id] = sub
        return sub

    def review(self, bundle_id: str, now: _dt.datetime | None = None) -> Submission:
        sub = self.submissions[bundle_id]
        now = now or _dt.datetime.now(_dt.timezone.utc)
        problems = []
        spec = sub.spec
        if not spec.get("title") or not spec.get("owner"):
            problems.append("a title and an owner are required")
        for item in spec.get("items", []):
            iid = item.get("id")
            if item.get("class") not in CLASSES or item.get("policy", "auto") not in POLICIES:
                problems.append(f"{iid}: unknown class or policy")
                continue
            if item["class"] == "resource":
                if item.get("target") not in self.resource_targets:
                    problems.append(f"{iid}: resource target {item.get('target')!r} is not one the platform serves")
                item["encrypt"] = True  # C7: owner resource packages are always encrypted
            if item["class"] == "software" and not item.get("version"):
                problems.append(f"{iid}: a software item needs the version it installs")
            data = sub.files.get(str(iid))
            if data is None:
                problems.append(f"{iid}: no file")
            elif len(data) > self.max_item:
                problems.append(f"{iid}: {len(data)} bytes, the platform takes at most {self.max_item}")
            try:
                schedule = parse_schedule(spec.get("config", {}), item.get("config"))
                if schedule.expiry is not None and schedule.expiry <= now:
                    problems.append(f"{iid}: expires before it could run")
            except BundleRejected as exc:
                problems.append(f"{iid}: {exc}")
        sub.problems, sub.status = problems, "refused" if problems else "approved"
        if not problems:
            sub.keys = {str(i["id"]): (os.urandom(32), os.urandom(12)) for i in spec["items"] if i.get("encrypt")}
        return sub

    def bundle_for(self, bundle_id: str, vin: str, vehicle: X25519PublicKey) -> bytes:
        """The signed bundle for one vehicle; only approved content is signed."""
        sub = self.submissions.get(bundle_id)
        if sub is None or sub.status != "approved":
            raise ReviewRefused(bundle_id, sub.problems if sub and sub.problems else ["not reviewed and approved"])
        return sign_bundle(build_bundle(sub.spec, sub.files, vehicle, vin, keys=sub.keys), self.key)
