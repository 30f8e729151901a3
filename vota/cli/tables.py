"""Plain-text tables for the command line's results."""

from __future__ import annotations

from typing import Any

__all__ = ["table", "format_flash_table"]


def table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in out)


def format_flash_table(rows: list[dict[str, Any]]) -> str:
    head = ["ECU", "result", "version", "before", "after", "KiB", "s", "KiB/s", "trace B", "trace %", "failed step / reason"]
    lines = []
    for r in rows:
        kib = r["image_size"] / 1024
        rate = r["bytes_transferred"] / 1024 / r["duration_s"] if r["duration_s"] else 0.0
        why = f"{r['failed_step']}: {r['reason']}" if r["result"] != "success" else ""
        lines.append([r["ecu"], r["result"], r["version"], r["version_before"] or "?", r["version_after"] or "-",
                      f"{kib:.0f}", f"{r['duration_s']:.1f}", f"{rate:.1f}", str(r["trace_bytes"]),
                      f"{100 * r['trace_fraction']:.2f}", why])
    return table(head, lines)
