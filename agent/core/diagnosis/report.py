"""D5 (which traces to check), the verdict, and its Markdown report."""

from __future__ import annotations

from typing import Any, Mapping

from agent.core.diagnosis.checks import check_trace
from agent.core.diagnosis.model import Finding, StageInput, Verdict
from agent.core.diagnosis.rules import Rules

__all__ = ["diagnose", "render_markdown"]


_CLEAN = "the result is failed but every exchange passed the checks"


def diagnose(inputs: list[StageInput], rules: Rules, mode: str = "first", campaign_id: str | None = None,
             failure: Mapping[str, Any] | None = None) -> Verdict:
    """D5: a failed deploy -> the deploy traces of the failed packages only; otherwise the flash
    traces of every failed ECU, one after another; otherwise the failed link exchanges (the TBOX
    asking the gateway for the inventory, an install, its status, a result file); nothing failed
    -> no abnormal package.
    ``failure``: how the campaign failed, when it did. A failure no finding explains gets the
    verdict ``unexplained``, with what failed and why the traces do not show it."""
    if mode not in ("first", "all"):
        raise ValueError("mode must be first or all")
    chosen: list[StageInput] = []
    stage: str | None = None
    for stage in ("deploy", "flash", "link"):  # the link: exchanges around the transfers (inventory, install status...)
        chosen = [i for i in inputs if i.stage == stage and i.result.get("result") != "success"]
        if chosen:
            break
    else:
        stage = None
    findings: list[Finding] = []
    unanalysed: list[dict[str, str]] = []
    for item in chosen:
        if item.trace is None:
            unanalysed.append({"stage": item.stage, "name": item.name, "reason": item.trace_error or "no trace"})
            continue
        try:
            found = check_trace(item.trace, rules, item.name, mode)
        except ValueError as exc:
            unanalysed.append({"stage": item.stage, "name": item.name, "reason": str(exc)})
            continue
        if not found:
            unanalysed.append({"stage": item.stage, "name": item.name, "reason": _CLEAN})
        findings.extend(found)
    verdict = Verdict(mode, [i.name for i in chosen], stage, findings, unanalysed, campaign_id)
    if not findings and failure and failure.get("reason") == "preconditions":
        unmet: dict[str, Any] = failure["unmet"] if isinstance(failure.get("unmet"), dict) else {}
        values: dict[str, Any] = failure["values"] if isinstance(failure.get("values"), dict) else {}
        verdict.vehicle_state = {"stage": failure.get("stage"), "unmet": {str(k): str(v) for k, v in unmet.items()},
                                 "values": values, "detail": failure.get("detail")}
    elif not findings and (chosen or failure):
        verdict.unexplained = _unexplained(chosen, unanalysed, failure)
    return verdict


def _unexplained(chosen: list[StageInput], unanalysed: list[dict[str, str]],
                 failure: Mapping[str, Any] | None) -> dict[str, Any]:
    if chosen:
        item = chosen[0]
        step, reason = item.result.get("failed_step"), item.result.get("reason")
        if item.trace is None or any(u["name"] == item.name and u["reason"] != _CLEAN for u in unanalysed):
            why = next(u["reason"] for u in unanalysed if u["name"] == item.name)
            why = f"the trace cannot be analysed ({why})"
        else:
            why = (f"every exchange in the trace passed the checks: the failed step {step!r} is not in the trace "
                   f"(an exchange that is not traced), or the client stopped on its own")
        return {"stage": item.stage, "name": item.name, "failed_step": step, "result": reason, "why": why}
    f = dict(failure or {})
    return {"stage": f.get("stage"), "name": f.get("package") or f.get("ecu"), "failed_step": f.get("reason"),
            "result": f.get("detail"),
            "why": f"the campaign failed in its {f.get('stage') or 'unknown'} stage and no deploy, flash or link "
                   f"result failed: no traced exchange shows this failure"}


def render_markdown(verdict: Verdict) -> str:
    lines = [f"# Upgrade diagnosis{f' of campaign {verdict.campaign_id}' if verdict.campaign_id else ''}", ""]
    state = verdict.vehicle_state
    if state is not None and not verdict.findings:
        lines += ["## `preconditions_not_met`", "",
                  f"- the vehicle's state did not let the campaign install within its window (stage {state['stage']})", ""]
        lines += [f"- {name}: {why}" for name, why in sorted(state["unmet"].items())] or [f"- {state.get('detail')}"]
        return "\n".join(lines) + "\n"
    if not verdict.abnormal and verdict.unexplained is None:
        lines += ["No abnormal package: every deploy and flash result is a success.", ""]
        return "\n".join(lines)
    if verdict.abnormal:
        lines += [f"Abnormal in the **{verdict.stage}** stage: {', '.join(verdict.abnormal)} (mode `{verdict.mode}`).", ""]
    for f in verdict.findings:
        where = f"deploy packet {f.packet}" if f.stage == "deploy" and f.packet is not None else (
            f"ECU {f.packet}" if f.stage in ("flash", "activate") else
            f"link exchanges of {f.package}" if f.stage == "link" else f"package {f.package}")
        if f.step:
            where += f", step `{f.step}`"
        nrc = f" 0x{f.nrc:02X} {f.nrc_name}" if f.nrc is not None else ""
        lines += [
            f"## `{f.cause}`{nrc}",
            "",
            f"- **{f.side} side at fault: {f.unit}** ({f.package}, {where}, request #{f.index} `{f.request}`)",
            f"- failed check: `{f.check}`: {f.detail}",
            "",
            "```",
        ]
        for rec in f.context:
            marker = ">>" if rec["index"] == f.index else "  "
            rsp = rec["response"] or "(none)"
            dt = f"{rec['dt']} ms" if rec["dt"] is not None else ""
            extra = " ".join(f"{k}={v}" for k, v in (rec.get("x") or {}).items() if k in ("late", "other", "stray", "sent", "id", "pend"))
            lines.append(f"{marker} #{rec['index']:<5} {rec['request']:<24} {rec['length']:>6} B  ->  {rsp:<16} {dt:>10} {extra}".rstrip())
            if rec["index"] == f.index:
                lines.append(f"   ^ {f.check} failed: {f.cause}")
        lines += ["```", ""]
    u = verdict.unexplained
    if u is not None:
        lines += ["## `unexplained`", "",
                  f"- {u.get('stage')} of {u.get('name')} failed at `{u.get('failed_step')}`: {u.get('result')}",
                  f"- no rule matched: {u.get('why')}", ""]
    for u in verdict.unanalysed:
        lines.append(f"- not analysed: {u['stage']} {u['name']}: {u['reason']}")
    return "\n".join(lines) + "\n"
