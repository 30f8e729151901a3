"""What the TBOX reports about a campaign's deploy and install: each result with its trace,
the gateway's activation-phase traces, and interruptions. Every report has a stable id, so a
TBOX that reports again after a restart is deduplicated by the cloud."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from agent.adapters.file_client import DeployResult
from agent.adapters.storage import atomic_write_bytes, atomic_write_json
from agent.errors import TryLater
from tbox.campaign_state import CampaignRecord
from tbox.ports import CloudPort, GatewayPort

__all__ = ["CampaignReports"]

log = logging.getLogger(__name__)


class CampaignReports:
    def __init__(self, cloud: CloudPort, gateway: GatewayPort) -> None:
        self.cloud, self.gateway = cloud, gateway

    def stage(self, record: CampaignRecord, stage: str, unit: str, result: dict[str, Any], trace: Path,
              meta: dict[str, Any]) -> None:
        """One deploy or flash result (``<campaign>.<stage>.<unit>.result``) and its trace."""
        cid = record.campaign_id
        self.cloud.report("results", {"campaign_id": cid, "stage": stage, **meta, "result": result},
                          msg_id=f"{cid}.{stage}.{unit}.result")
        if trace.exists():
            self.cloud.report_trace(f"{cid}.{stage}.{unit}", trace.read_bytes(), {"campaign_id": cid, "stage": stage, **meta})

    def link_failures(self, record: CampaignRecord) -> None:
        """The failed exchanges with the gateway around the transfers (``link/``), each result
        with its trace, for a campaign that ended failed: the cloud diagnoses them too."""
        for path in sorted((record.dir / "link").glob("*.link.result.json")):
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(doc, dict) or doc.get("result") != "failed":
                continue
            name = str(doc.get("name"))
            self.stage(record, "link", name, doc, path.parent / f"{name}.link.trace.jsonl", {"name": name})

    def deploy_interrupted(self, record: CampaignRecord, result: DeployResult, out: Path, n: int) -> None:
        """The ``n``-th deploy of a package cut off by a gateway restart: an event and its trace."""
        cid, name = record.campaign_id, result.package
        self.cloud.report("events", {"event": "interrupted", "campaign_id": cid, "stage": "deploy", "package": name,
                                     "failed_step": result.failed_step, "reason": result.reason,
                                     "failed_packet": result.failed_packet},
                          msg_id=f"{cid}.deploy.{name}.interrupted-{n}")
        trace = out / f"{name}.deploy.trace.jsonl"
        if trace.exists():
            self.cloud.report_trace(f"{cid}.deploy.{name}.interrupted-{n}", trace.read_bytes(),
                                    {"campaign_id": cid, "stage": "deploy", "package": name, "interrupted": n})

    def install_results(self, record: CampaignRecord, results: list[dict[str, Any]]) -> list[str]:
        """Each ECU's flash result from the gateway's summary, kept under ``flash/`` with its trace
        and its activation-phase traces (activate, rollback, discard, commit, interrupted), and
        reported; the failures, one line each."""
        cid, out = record.campaign_id, record.dir / "flash"
        failed = []
        for r in results:
            ecu = r["ecu"]
            trace = out / f"{ecu}.trace.jsonl"
            data = self._read(cid, r.get("trace_file"))
            if data is not None:
                atomic_write_bytes(trace, data)
            atomic_write_json(out / f"{ecu}.result.json", {**r, "trace_file": trace.name if trace.exists() else None})
            self.stage(record, "flash", ecu, r, trace, {"ecu": ecu})
            for action in r.get("actions") or []:
                name = action.get("trace_file")
                data = self._read(cid, name)
                if data is None:
                    continue
                atomic_write_bytes(out / name, data)
                key = str(action.get("id") or action["action"])
                self.cloud.report_trace(f"{cid}.{key}.{ecu}", data,
                                        {"campaign_id": cid, "stage": "activate", "ecu": ecu, "action": action["action"]})
            if r["result"] != "success":
                failed.append(f"{ecu}: {r['failed_step']}: {r['reason']}")
        return failed

    def _read(self, cid: str | None, name: Any) -> bytes | None:
        """A file of this campaign's install on the gateway; None when there is none or it cannot be read."""
        if not isinstance(name, str) or not name:
            return None
        try:
            return self.gateway.read_file(f"{cid}/{name}")
        except TryLater as exc:
            log.warning("%s not available: %s", name, exc)
            return None
