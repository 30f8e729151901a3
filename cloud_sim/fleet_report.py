"""The fleet summary (cloud_sim/fleet.py) as Markdown and as one self-contained HTML page with
charts (inline SVG: it opens in any browser, offline, with no script).

Failures are failed campaigns; a campaign that waited for its preconditions (a deferral) is
counted apart: it may have installed afterwards, failed because its window closed (reason
``preconditions``), or still be waiting.
"""

from __future__ import annotations

import collections
import html
from typing import Any, Callable

__all__ = ["summary_markdown", "summary_html", "sections"]

Tables = dict[str, list[dict[str, Any]]]
Section = tuple[str, list[tuple[str, int]], int]  # title, (value, count) most common first, the total shares are of

_COLORS = ["#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
           "#393b79", "#637939"]


def _nrc(r: dict[str, Any]) -> str:
    return f"0x{r['nrc']:02X} {r.get('nrc_name') or ''}".strip() if isinstance(r.get("nrc"), int) else "none"


def _where(r: dict[str, Any]) -> str:
    """The ECU (flash, activation), the package (deploy) or the TBOX state (link) that failed,
    whichever side was at fault; the stage the vehicle waited in for its preconditions."""
    return f"{r['stage']}: {r.get('package') or r.get('unit')}"


def _count(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any], top: int = 15) -> list[tuple[str, int]]:
    return [(str(v), n) for v, n in collections.Counter(key(r) for r in rows).most_common(top)]


def _headline(t: Tables, vehicles: int) -> list[str]:
    camps, fails, waiting = t["campaigns"], t["findings"], t["waiting"]
    deferred = [r for r in camps if r.get("deferrals")]
    lost = sum(1 for r in camps if r.get("failure_reason") == "preconditions")
    return [
        f"{vehicles} vehicles; {len(camps)} finished campaigns on {len({r['vin'] for r in camps})} of them",
        f"{len(fails)} failed ({100.0 * len(fails) / max(1, len(camps)):.1f} %) on {len({r['vin'] for r in fails})} vehicles",
        f"{len(deferred)} waited for their preconditions first (deferrals, not failures): "
        f"{sum(1 for r in deferred if r.get('outcome') == 'success')} installed afterwards, "
        f"{lost} failed because their window closed; {len(waiting)} waiting now",
    ]


def _per_campaign(t: Tables) -> list[list[str]]:
    runs = collections.Counter(r["campaign_id"] for r in t["campaigns"])
    failed = collections.Counter(r["campaign_id"] for r in t["findings"])
    deferred = collections.Counter(r["campaign_id"] for r in t["campaigns"] if r.get("deferrals"))
    return [[cid, str(n), str(failed[cid]), f"{100.0 * failed[cid] / n:.1f} %", str(deferred[cid])]
            for cid, n in runs.most_common(15)]


def sections(t: Tables) -> list[Section]:
    """Every count of the summary: failures by unit, cause, step, NRC, ECU, cluster and day;
    deferrals by condition."""
    rows = t["findings"]
    n = len(rows)
    deferred = [r for r in t["campaigns"] + t["waiting"] if r.get("deferred_by")]
    return [
        ("By where it failed (ECU, package, link state)", _count(rows, _where), n),
        ("By the unit at fault (side)", _count(rows, lambda r: f"{r['stage']}: {r['unit']} ({r['side']})"), n),
        ("By cause", _count(rows, lambda r: r["cause"]), n),
        ("By step", _count(rows, lambda r: r.get("step") or "(the programming sequence)"), n),
        ("By NRC", _count(rows, _nrc), n),
        ("By ECU part number and software before", _count(
            [r for r in rows if r.get("part_number")],
            lambda r: f"{r['part_number']} {r.get('software_before') or '?'} (supplier {r.get('supplier_software') or '?'})"), n),
        ("Clusters of identical findings (cause, unit, request, NRC)", _count(
            rows, lambda r: f"{r['cause']} at {r['unit']} `{r.get('request')}` {r.get('nrc_name') or ''}".strip()), n),
        ("Failures per day", sorted(_count(rows, lambda r: (r.get("finished_at") or "unknown")[:10], 10_000)), n),
        ("Deferrals by unmet condition", _count([{"c": c} for r in deferred for c in str(r["deferred_by"]).split(",")],
                                                lambda r: r["c"]), len(deferred)),
    ]


def summary_markdown(t: Tables, vehicles: int) -> str:
    out = ["# Fleet diagnosis", "", *[f"- {line}" for line in _headline(t, vehicles)], "", "## By campaign", "",
           "| campaign | vehicles | failed | failure rate | deferred |", "| --- | ---: | ---: | ---: | ---: |"]
    out += ["| " + " | ".join(row) + " |" for row in _per_campaign(t)]
    for title, counts, total in sections(t):
        out += ["", f"## {title}", "", "| value | count | share |", "| --- | ---: | ---: |"]
        out += [f"| {value} | {n} | {100.0 * n / max(1, total):.1f} % |" for value, n in counts]
    return "\n".join(out) + "\n"


def _table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _causes_per_ecu(rows: list[dict[str, Any]]) -> str:
    """Horizontal stacked bars: one per ECU (package, link state), a segment per cause."""
    units = [u for u, _ in _count(rows, _where, 15)]
    causes = [c for c, _ in _count(rows, lambda r: r["cause"], len(_COLORS))]
    counts = collections.Counter((_where(r), r["cause"]) for r in rows)
    most = max([sum(counts[(u, c)] for c in causes) for u in units] or [1])
    width, label, bar = 560, 200, 22
    parts = []
    for i, unit in enumerate(units):
        y, x = 10 + i * (bar + 6), float(label)
        parts.append(f'<text x="{label - 6}" y="{y + 16}" text-anchor="end">{html.escape(unit)}</text>')
        for j, cause in enumerate(causes):
            w = width * counts[(unit, cause)] / most
            if w:
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{_COLORS[j]}">'
                             f"<title>{html.escape(unit)}: {html.escape(cause)} {counts[(unit, cause)]}</title></rect>")
                x += w
        parts.append(f'<text x="{x + 4:.1f}" y="{y + 16}">{sum(counts[(unit, c)] for c in causes)}</text>')
    legend_y = 20 + len(units) * (bar + 6)
    for j, cause in enumerate(causes):
        parts.append(f'<rect x="{label + (j % 3) * 190}" y="{legend_y + (j // 3) * 20}" width="12" height="12" '
                     f'fill="{_COLORS[j]}"/><text x="{label + 16 + (j % 3) * 190}" y="{legend_y + 11 + (j // 3) * 20}">'
                     f"{html.escape(cause)}</text>")
    height = legend_y + 20 * (len(causes) // 3 + 1) + 10
    return f'<svg class="chart" width="{label + width + 60}" height="{height}" role="img">{"".join(parts)}</svg>'


def _timeline(t: Tables) -> str:
    """Vertical bars per day: finished campaigns (grey) and failed ones (red)."""
    runs = collections.Counter((r.get("finished_at") or "unknown")[:10] for r in t["campaigns"])
    fails = collections.Counter((r.get("finished_at") or "unknown")[:10] for r in t["findings"])
    days = sorted(set(runs) | set(fails))[-60:]
    most = max([runs[d] or fails[d] for d in days] or [1])
    step, height = max(8, min(40, 720 // max(1, len(days)))), 160
    parts = []
    for i, day in enumerate(days):
        x = 40 + i * step
        for count, color in ((max(runs[day], fails[day]), "#bbbbbb"), (fails[day], "#d62728")):
            h = height * count / most
            parts.append(f'<rect x="{x}" y="{10 + height - h:.1f}" width="{step - 2}" height="{h:.1f}" fill="{color}">'
                         f"<title>{day}: {fails[day]} failed of {runs[day]}</title></rect>")
        if i % max(1, len(days) // 8) == 0:
            parts.append(f'<text x="{x}" y="{height + 28}">{day}</text>')
    parts.append(f'<text x="0" y="20">{most}</text>')
    return f'<svg class="chart" width="{60 + step * len(days) + 80}" height="{height + 40}" role="img">{"".join(parts)}</svg>'


def summary_html(t: Tables, vehicles: int) -> str:
    body = ["<h1>Fleet diagnosis</h1><ul>", *[f"<li>{html.escape(line)}</li>" for line in _headline(t, vehicles)], "</ul>",
            "<h2>Causes per ECU</h2>", _causes_per_ecu(t["findings"]),
            "<h2>Campaigns and failures per day</h2>", _timeline(t),
            "<h2>By campaign</h2>", _table(["campaign", "vehicles", "failed", "failure rate", "deferred"], _per_campaign(t))]
    for title, counts, total in sections(t):
        body += [f"<h2>{html.escape(title)}</h2>",
                 _table(["value", "count", "share"], [[v, str(n), f"{100.0 * n / max(1, total):.1f} %"] for v, n in counts])]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}td:nth-child(n+2){text-align:right}"
             ".chart text{font-size:12px}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Fleet diagnosis</title>'
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
