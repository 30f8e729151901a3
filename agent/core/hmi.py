"""What the driver is told about an update (UN R156 7.2: before and after it), as states an HMI
shows: derived from the campaign events the TBOX reports, pure (events and times in, states out).

The states, in the order a campaign goes through them (docs/type-approval.md#the-driver-is-told)::

    offered               verified, prepared in the background (preparing: downloading, deploying);
                          the campaign's information, the estimated duration, what will be unavailable
    awaiting_consent      the owner's consent is needed before the install (install: confirm)
    awaiting_conditions   the install waits for the vehicle's state (unmet: the conditions, values)
    installing            progress (percent, per ECU), time_left_s, the vehicle unusable from/until
    succeeded             the new versions, the campaign's after_success text
    failed                why, and the action to take (none, retry_later, workshop), after_failure text

A campaign's ``information``, per language (``en``, ``de-AT``), each optional: ``purpose``,
``changes`` (a text or a list), ``unavailable`` (functions not available during the install),
``instructions`` (what the driver does), ``after_success``, ``after_failure``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = ["STATES", "INFORMATION_KEYS", "parse_information", "HmiTracker"]

STATES = ("offered", "awaiting_consent", "awaiting_conditions", "installing", "succeeded", "failed")
INFORMATION_KEYS = ("purpose", "changes", "unavailable", "instructions", "after_success", "after_failure")
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8}){0,2}")
_MAX_TEXT = 2000
PREPARING = ("received", "verified", "downloading", "downloaded", "deploying", "deployed")


def parse_information(doc: Any) -> dict[str, dict[str, Any]]:
    """A campaign's ``information``; ValueError says what is wrong."""
    if not isinstance(doc, dict) or not doc or len(doc) > 32:
        raise ValueError("information must map 1 to 32 languages to their texts")
    for language, texts in doc.items():
        if not isinstance(language, str) or not _LANGUAGE.fullmatch(language):
            raise ValueError(f"information: {language!r} is not a language tag (en, de-AT)")
        if not isinstance(texts, dict) or not texts or set(texts) - set(INFORMATION_KEYS):
            raise ValueError(f"information.{language} may have {', '.join(INFORMATION_KEYS)}, nothing else")
        for key, value in texts.items():
            items = value if key == "changes" and isinstance(value, list) else [value]
            if not items or not all(isinstance(v, str) and 0 < len(v) <= _MAX_TEXT and v.isprintable() for v in items):
                raise ValueError(f"information.{language}.{key} must be printable text of 1 to {_MAX_TEXT} characters"
                                 + (" (or a list of them)" if key == "changes" else ""))
    return {str(k): dict(v) for k, v in doc.items()}


@dataclass
class _Campaign:
    state: str | None = None
    install_s: float | None = None
    recovery_s: float | None = None
    unusable_from: float | None = None
    ecus: dict[str, tuple[int, int]] = field(default_factory=dict)  # ECU -> (bytes done, bytes in all)


class HmiTracker:
    """The HMI state of each campaign from its events. ``offer(campaign_id)``: what the vehicle
    knows of the verified campaign: ``information``, ``install`` (immediate, confirm) and
    ``confirmed`` (None: not known)."""

    def __init__(self, offer: Callable[[str], Mapping[str, Any] | None]) -> None:
        self.offer = offer
        self.campaigns: dict[str, _Campaign] = {}

    def event(self, body: Mapping[str, Any], now: float) -> tuple[dict[str, Any], bool] | None:
        """(the state to show, whether it is a new state rather than new progress) after the
        event ``body``; None when the event changes nothing the driver sees."""
        cid = body.get("campaign_id")
        if not isinstance(cid, str) or not cid:
            return None
        c = self.campaigns.setdefault(cid, _Campaign())
        kind = body.get("event")
        if kind == "estimate":
            c.install_s, c.recovery_s = _number(body.get("install_s")), _number(body.get("recovery_s"))
            return None
        shown: dict[str, Any] | None = None
        if kind == "state" and body.get("state") in PREPARING and body.get("state") != "received":
            shown = {"state": "offered", "preparing": body["state"], **self._offer(cid, c)}
        elif kind == "state" and body.get("state") == "installing" and c.state not in ("installing", "awaiting_conditions"):
            c.unusable_from = now
            shown = self._installing(c, now)
        elif kind == "state" and body.get("state") == "awaiting_install":
            offer = self.offer(cid) or {}
            if offer.get("install") == "confirm" and not offer.get("confirmed"):
                shown = {"state": "awaiting_consent", **self._offer(cid, c)}
        elif kind == "preconditions" and body.get("met") is False:
            shown = {"state": "awaiting_conditions", "unmet": body.get("unmet") or {},
                     "values": dict(body.get("values") or {})}
        elif kind == "progress" and body.get("stage") == "install" and isinstance(body.get("ecu"), str):
            c.ecus[body["ecu"]] = (int(body.get("done") or 0), int(body.get("total") or 0))
            if c.unusable_from is None:
                c.unusable_from = now
            shown = self._installing(c, now)
        elif kind == "finished":
            shown = self._finished(cid, body)
        if shown is None:
            return None
        new = shown["state"] != c.state
        c.state = shown["state"]
        if shown["state"] in ("succeeded", "failed"):
            self.campaigns.pop(cid, None)
        return {"campaign_id": cid, **shown}, new

    def _offer(self, cid: str, c: _Campaign) -> dict[str, Any]:
        out: dict[str, Any] = {"information": dict((self.offer(cid) or {}).get("information") or {})}
        if c.install_s is not None:
            out["duration_s"] = c.install_s
        return out

    def _installing(self, c: _Campaign, now: float) -> dict[str, Any]:
        done, total = sum(d for d, _ in c.ecus.values()), sum(t for _, t in c.ecus.values())
        out: dict[str, Any] = {"state": "installing", "percent": round(100 * done / total, 1) if total else None,
                               "ecus": {e: {"done": d, "total": t} for e, (d, t) in sorted(c.ecus.items())},
                               "unusable_from": c.unusable_from}
        if c.unusable_from is not None and c.install_s is not None:
            out["time_left_s"] = round(max(0.0, c.unusable_from + c.install_s - now), 1)
            # at worst: a late failure and its way back
            out["unusable_until"] = round(c.unusable_from + c.install_s + (c.recovery_s or 0.0), 1)
        return out

    def _finished(self, cid: str, body: Mapping[str, Any]) -> dict[str, Any]:
        texts = {lang: {k: v for k, v in t.items() if k in ("after_success", "after_failure")}
                 for lang, t in dict((self.offer(cid) or {}).get("information") or {}).items()}
        if body.get("outcome") == "success":
            return {"state": "succeeded", "versions": {e: (v or {}).get("software_version") for e, v in
                                                       dict(body.get("versions") or {}).items()},
                    "information": {lang: t["after_success"] for lang, t in texts.items() if "after_success" in t}}
        failure = dict(body.get("failure") or {})
        return {"state": "failed", "reason": failure.get("reason"), "action": _action(body, failure),
                "information": {lang: t["after_failure"] for lang, t in texts.items() if "after_failure" in t}}


def _action(body: Mapping[str, Any], failure: Mapping[str, Any]) -> str:
    """What the driver does after a failed update: none (nothing changed, or the old software is
    back), retry_later (the vehicle's state did not allow it), workshop (an ECU may be left without
    its old software)."""
    if failure.get("reason") == "preconditions" or body.get("cause") == "preconditions_not_met":
        return "retry_later"
    if failure.get("stage") in ("verify", "download", "deploy", None):
        return "none"
    return "none" if body.get("revertible") is not False else "workshop"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
