"""Reads the inputs of a diagnosis from disk (the I/O edge of ``agent/diagnosis.py``):
a bench ``--out`` directory, a TBOX campaign directory, a gateway results directory, or
any directory holding deploy/flash results with their traces."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from agent.adapters.config_files import load_yaml
from agent.adapters.trace_files import read_trace
from agent.core.diagnosis import Rules, StageInput, parse_rules
from agent.core.trace import parse_trace
from agent.errors import TraceFormatError, UsageError

__all__ = ["load_inputs", "load_rules", "DEFAULT_RULES", "inputs_from_store"]

DEFAULT_RULES = "agent/core/diagnosis/rules.yaml"  # shipped inside the package, read with importlib.resources


def load_rules(path: str | Path | None = None) -> Rules:
    """The rules in ``path``, else the default rules that ship with the package (also in a wheel)."""
    if path:
        return parse_rules(load_yaml(path), str(path))
    text = resources.files("agent.core.diagnosis").joinpath("rules.yaml").read_text(encoding="utf-8")
    return parse_rules(yaml.safe_load(text), DEFAULT_RULES)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _trace(path: Path) -> tuple[Any, str | None]:
    if not path.exists():
        return None, f"{path.name}: trace missing"
    try:
        return read_trace(path), None
    except TraceFormatError as exc:
        return None, str(exc)


def _campaign_dir(root: Path) -> tuple[Path, str | None]:
    """A bench directory points at its campaign's TBOX directory; anything else is walked."""
    report = _json(root / "report.json")
    if isinstance(report, dict) and report.get("campaign_id"):
        for state in (root / "tbox" / "campaigns").glob("*/state.json"):
            doc = _json(state)
            if isinstance(doc, dict) and doc.get("campaign_id") == report["campaign_id"]:
                return state.parent, str(report["campaign_id"])
    state = _json(root / "state.json")
    if isinstance(state, dict) and state.get("campaign_id"):
        return root, str(state["campaign_id"])
    return root, None


ACTIONS = ("activate", "commit", "discard", "rollback")


def failed_action(result: Any) -> str | None:
    """The activation-phase action an ECU failed at (``failed_step`` ``"commit: ..."``): it is
    analysed on that action's trace, not its flash; None when it failed elsewhere or did not."""
    if not isinstance(result, dict) or result.get("result") == "success":
        return None
    action, colon, _ = str(result.get("failed_step") or "").partition(":")
    return action if colon and action in ACTIONS else None


def load_inputs(path: str | Path) -> tuple[list[StageInput], str | None, list[dict[str, str]]]:
    """(inputs, campaign id if known, files that could not be read)."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory of results and traces")
    base, campaign_id = _campaign_dir(root)
    found: dict[tuple[str, str], tuple[float, StageInput]] = {}
    problems: list[dict[str, str]] = []
    for result_path in sorted(base.rglob("*.result.json")):
        doc = _json(result_path)
        if not isinstance(doc, dict) or "result" not in doc:
            problems.append({"stage": "?", "name": result_path.name, "reason": "unreadable result file"})
            continue
        schema = str(doc.get("schema", ""))
        if schema.startswith("vota-deploy-result"):
            stage, name = "deploy", str(doc.get("package"))
            trace_path = result_path.parent / (doc.get("trace_file") or f"{name}.deploy.trace.jsonl")
        elif schema.startswith("vota-link-result"):
            stage, name = "link", str(doc.get("name"))
            trace_path = result_path.parent / (doc.get("trace_file") or f"{name}.link.trace.jsonl")
        elif schema.startswith("vota-flash-result"):
            stage, name = "flash", str(doc.get("ecu"))
            action = failed_action(doc)
            trace_path = result_path.parent / (f"{name}.{action}.trace.jsonl" if action is not None
                                               else doc.get("trace_file") or f"{name}.trace.jsonl")
        else:
            continue
        trace, error = _trace(trace_path)
        stamp = result_path.stat().st_mtime
        key = (stage, name)
        if key not in found or found[key][0] < stamp:
            found[key] = (stamp, StageInput(stage, name, doc, trace, error))
    if not found and not problems:
        raise UsageError(f"{root}: no deploy, flash or link results found")
    order = {"deploy": 0, "flash": 1}
    inputs = [v for _, v in sorted(found.values(), key=lambda item: (order.get(item[1].stage, 2), item[1].name))]
    return inputs, campaign_id, problems


def campaign_failure(path: str | Path) -> dict[str, Any] | None:
    """How the campaign of a TBOX campaign directory (``state.json``) or a bench directory
    (``report.json``) failed, when it did."""
    for name in ("state.json", "report.json"):
        doc = _json(Path(path) / name)
        if isinstance(doc, dict) and isinstance(doc.get("failure"), dict):
            return dict(doc["failure"])
    return None


def inputs_from_store(results: list[dict[str, Any]], traces_dir: Path, campaign_id: str) -> list[StageInput]:
    """Inputs from what the cloud stored: result reports and reassembled traces."""
    out = []
    for body in results:
        stage = body.get("stage")
        name = str(body.get("package") if stage == "deploy" else body.get("name") if stage == "link" else body.get("ecu"))
        kind = (failed_action(body.get("result") or {}) if stage == "flash" else None) or stage
        path = traces_dir / f"{campaign_id}.{kind}.{name}.jsonl"
        trace: Any = None
        error: str | None = f"{path.name}: trace not received"
        if path.exists():
            try:
                trace, error = parse_trace(path.read_text(), path.name), None
            except (TraceFormatError, OSError, UnicodeDecodeError) as exc:
                trace, error = None, str(exc)
        out.append(StageInput(str(stage), name, body.get("result") or {}, trace, error))
    return out
