"""What arrives from the cloud, dispatched: a campaign envelope that passes the checks that need
no inventory is stored as a new campaign (state ``received``, persisted before anything else
happens) and the runner is woken, one that fails them is rejected and not kept; a
command goes to the campaign runner (``confirm_install``), to the key store (``keys_update``, a
signed key list) or to the content manager; anything
else is rejected with a reason, reported, and forgotten. The ``keys`` topic carries the
fleet's current key list, retained at the broker, so a vehicle that was offline when it was
published gets it when it connects; the list it has already (or an older one) is no news."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import queue
from pathlib import Path
from typing import Any, Callable

from agent.adapters.storage import atomic_write_bytes
from tbox.campaign_state import CampaignRecord
from tbox.content_manager import COMMANDS as CONTENT_COMMANDS
from tbox.runner import CampaignRunner

__all__ = ["Inbound", "COMMANDS"]

log = logging.getLogger(__name__)

COMMANDS = ("confirm_install",)


class Inbound:
    def __init__(self, vin: str, runner: CampaignRunner, content_submit: Callable[[dict[str, Any]], None],
                 wake_campaigns: Callable[[], None], wake_content: Callable[[], None],
                 keys: Callable[[bytes, str, bool], None] | None = None) -> None:
        self.vin, self.runner, self.keys = vin, runner, keys
        self.content_submit, self.wake_campaigns, self.wake_content = content_submit, wake_campaigns, wake_content
        self._commands: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

    @property
    def campaigns_dir(self) -> Path:
        return self.runner.campaigns_dir

    def on_message(self, kind: str, payload: bytes) -> None:
        """Called by the cloud link for every inbound message (``campaign``, ``command``, ``keys``)."""
        digest = hashlib.sha256(payload).hexdigest()[:24]
        if kind == "keys":
            if self.keys is not None:
                self.keys(payload, digest, True)
            return
        if kind == "campaign":
            directory = self.campaigns_dir / digest
            # without state.json: a store that failed part-way (a full disk), done again
            if (directory / "state.json").exists() or self.runner.retention.known(digest):
                log.info("campaign %s received again; already known", digest)
                return
            if not self.runner.precheck(payload, digest):
                return
            record = CampaignRecord(digest, directory)
            atomic_write_bytes(record.envelope_path, payload)
            record.save()  # state "received", persisted before anything else happens
            self.wake_campaigns()
            return
        try:
            doc = json.loads(payload)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError, RecursionError):
            self.runner.reject(kind, "malformed", "not a JSON object", digest)
            return
        command, vin = doc.get("command"), doc.get("vin", self.vin)
        if vin != self.vin:
            self.runner.reject(kind, "wrong_vehicle", f"command for {vin}", digest)
        elif command == "keys_update" and self.keys is not None:
            envelope = doc.get("keys")
            try:
                data = base64.b64decode(envelope, validate=True) if isinstance(envelope, str) else None
            except (binascii.Error, ValueError):
                data = None
            if data is None:
                self.runner.reject(kind, "malformed", "keys_update needs keys: the base64 of a signed key list", digest)
            else:
                self.keys(data, digest, False)
        elif command in CONTENT_COMMANDS:
            self.content_submit(doc)
            self.wake_content()
        elif command not in COMMANDS or not isinstance(doc.get("campaign_id"), str):
            self.runner.reject(kind, "malformed", f"unknown command {command!r} or no campaign_id", digest)
        else:
            self._commands.put(doc)
            self.wake_campaigns()

    def consent(self, campaign_id: str, accept: bool) -> None:
        """The driver's consent from the vehicle's HMI (tbox/hmi.py), applied like the cloud's."""
        self._commands.put({"command": "confirm_install", "campaign_id": campaign_id, "by": "hmi", "accept": accept})
        self.wake_campaigns()

    def apply_commands(self) -> None:
        """Hand queued commands to the runner (in the campaign worker's thread)."""
        while True:
            try:
                doc = self._commands.get_nowait()
            except queue.Empty:
                return
            if not self.runner.confirm(doc["campaign_id"], str(doc.get("by") or "cloud"), doc.get("accept") is not False):
                self.runner.reject("command", "unknown_campaign", f"no open campaign {doc['campaign_id']!r}",
                                   hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24],
                                   doc["campaign_id"])
