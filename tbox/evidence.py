"""``vota evidence CAMPAIGN`` on the vehicle: a campaign's type-approval evidence gathered from
the TBOX's state directory (the update log, the campaign's directory) into one signed pack
(``agent/adapters/evidence_pack.py``), signed with the vehicle's report key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.adapters.update_log import LOG_FILE
from agent.core.evidence import summarize
from agent.errors import UsageError, VotaError

__all__ = ["gather"]

MAX_FILE = 64 << 20  # a campaign's traces and results; its packages are not evidence (their digests are signed)
LEFT_OUT = ("packages",)


def gather(state_dir: Path, campaign_id: str) -> dict[str, bytes]:
    """The pack's files for ``campaign_id``; UsageError when this vehicle knows no such campaign."""
    try:
        log = (state_dir / LOG_FILE).read_bytes()
    except FileNotFoundError:
        log = b""
    except OSError as exc:
        raise UsageError(f"{state_dir / LOG_FILE}: cannot read the update log ({exc.strerror})") from None
    lines, entries = [], []
    for raw in log.splitlines(keepends=True):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue  # a torn last line: verify_log names it in the pack's check
        if isinstance(entry, dict) and entry.get("campaign_id") == campaign_id:
            lines.append(raw)
            entries.append(entry)
    record = _campaign_dir(state_dir, campaign_id)
    if not entries and record is None:
        raise UsageError(f"no campaign {campaign_id!r} in {state_dir} (its update log nor its campaigns)")
    files: dict[str, bytes] = {"update-log.jsonl": log, "campaign-log.jsonl": b"".join(lines)}
    if record is not None:
        for path in sorted(record.rglob("*")):
            rel = path.relative_to(record)
            if path.is_file() and not path.is_symlink() and rel.parts[0] not in LEFT_OUT and path.stat().st_size <= MAX_FILE:
                files[f"campaign/{rel.as_posix()}"] = path.read_bytes()
    summary = summarize(entries, campaign_id)
    if summary["outcome"] not in (None, "success") and summary["diagnosis"] is None and record is not None:
        summary["diagnosis"] = _diagnose(record, campaign_id, summary.get("failure"))
    summary["kept"] = record is not None  # false: the campaign's directory was removed by retention
    files["summary.json"] = json.dumps(summary, indent=1, sort_keys=True).encode()
    return files


def _campaign_dir(state_dir: Path, campaign_id: str) -> Path | None:
    for state in sorted((state_dir / "campaigns").glob("*/state.json")):
        try:
            if json.loads(state.read_text()).get("campaign_id") == campaign_id:
                return state.parent
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _diagnose(record: Path, campaign_id: str, failure: Any) -> dict[str, Any]:
    """The vehicle did not diagnose it (``tbox.diagnose`` off): done now, on its results and traces."""
    from agent.adapters.diagnosis_files import load_inputs, load_rules
    from agent.core.diagnosis import diagnose

    try:
        inputs, _, problems = load_inputs(record)
    except VotaError:
        inputs, problems = [], []
    verdict = diagnose(inputs, load_rules(), "first", campaign_id, failure if isinstance(failure, dict) else None)
    verdict.unanalysed.extend(problems)
    return verdict.to_json()
