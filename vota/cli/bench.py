"""``vota bench``: the whole simulated vehicle and the stand-in cloud through one campaign (or an
owner-content scenario); prints the outcome, the results table and the diagnosis."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vota.cli.tables import table

__all__ = ["cmd_bench"]


def cmd_bench(args: argparse.Namespace) -> int:
    from vota.bench import run_bench

    report = run_bench(args)
    if isinstance(report, int):
        return report
    if "campaign_id" in report:
        print_report(report, verbose=args.verbose > 0)
    return 0 if report["outcome"] == "success" else 1


def print_report(report: dict[str, Any], verbose: bool = False) -> None:
    rows = [["deploy", d["package"], d["result"], f"{d['size'] // 1024}", f"{d['duration_s']:.1f}",
             f"{d['failed_step']}: {d['reason']}" if d["result"] != "success" else ""] for d in report["deploy"]]
    rows += [["flash", f["ecu"], f["result"], f"{f['image_size'] // 1024}", f"{f['duration_s']:.1f}",
              f"{f['failed_step']}: {f['reason']}" if f["result"] != "success" else f"{f['version_before']} -> {f['version_after']}"]
             for f in report["flash"]]
    print(table(["stage", "package / ECU", "result", "KiB", "s", "detail"], rows))
    failure = report.get("failure")
    why = f" ({failure.get('reason')}: {failure.get('detail')})" if isinstance(failure, dict) else ""
    diagnosis = report.get("diagnosis") or {}
    for f in diagnosis.get("findings", [])[:3]:
        if f["stage"] == "deploy":  # a TransferData names its packet; any other request the whole package
            where = f"packet {f['packet']}" if f.get("packet") is not None else "before or after the packets"
        elif f["stage"] == "link":  # the exchanges around the transfers: the state (or inventory) and the call
            where = f"step {f['step']}" if f.get("step") else "a call on the link"
        else:
            where = f"ECU {f['packet']}"
        nrc = f" 0x{f['nrc']:02X} {f['nrc_name']}" if f.get("nrc") is not None else ""
        of = f"link calls in {f['package']}" if f["stage"] == "link" else f"{f['stage']} of {f['package']}"
        print(f"diagnosis: {f['cause']}{nrc}: {f['side']} side ({f['unit']}), {of}, "
              f"{where}, request #{f['index']} {f['request']}: {f['detail']}")
    state = diagnosis.get("vehicle_state")
    if isinstance(state, dict) and not diagnosis.get("findings"):  # the vehicle's state, not a fault
        print(f"diagnosis: preconditions_not_met in {state.get('stage')}: " + "; ".join(
            f"{k}: {v}" for k, v in sorted((state.get("unmet") or {}).items())))
    unexplained = diagnosis.get("unexplained")
    if isinstance(unexplained, dict):  # a failure no rule explains is said so, never left silent
        print(f"diagnosis: unexplained: {unexplained.get('stage')} of {unexplained.get('name')} failed at "
              f"{unexplained.get('failed_step')}: {unexplained.get('result')}; {unexplained.get('why')}")
    if report.get("install_s") is not None:
        print(f"install took {report['install_s']:.1f} s, estimated {report['estimated_install_s']:.1f} s before it started")
        estimate = report.get("estimate") or {}
        if verbose and estimate:  # the estimate's inputs: each ECU's flash and where its figures came from
            print("estimate: " + ", ".join(f"{e} {s:.1f} s ({(estimate.get('rates') or {}).get(e, '?')})"
                                           for e, s in sorted((estimate.get("per_ecu") or {}).items())))
    final = report.get("final_versions") or {}
    if final:
        print("vehicle now runs: " + ", ".join(f"{ecu} {v.get('software_version') or '?'}" for ecu, v in sorted(final.items())))
    print(f"campaign {report['campaign_id']}: {report['outcome']}{why} in {report['duration_s']:.1f} s; "
          f"{len(report['traces'])} traces; report: {Path(report['store']).parents[2] / 'report.json'}")
