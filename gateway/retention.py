"""What the gateway keeps of installs that ended, so that months of campaigns fit its storage.

Packages are needed while an install can still use them: a resumed install, and the second round
the TBOX starts when an ECU refused its delta (the same campaign again, every package named
anew). So an install's packages (and its manifest) are removed as soon as it succeeded or was
cancelled; those of one that failed, when the next install of another campaign starts, never one
that install names. Of the results (``<results>/<campaign>/``: journal, traces, summary) the
newest ``gateway.keep_results`` ended installs are kept, none older than ``gateway.keep_days``;
an older one is moved to ``trash/`` (one rename) and removed. Owner content the gateway keeps in
the same directory is never touched: only files an install manifest names are removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from agent.errors import InstallRefused
from agent.protocol.files import PARTIAL_SUFFIXES
from agent.protocol.link import InstallStatus, parse_manifest
from gateway.plan import files_named

__all__ = ["release_packages", "tidy", "MANIFEST_COPY"]

log = logging.getLogger(__name__)

MANIFEST_COPY = "install-manifest.json"  # the manifest an install runs, kept beside its journal


def _named(results: Path) -> tuple[str, list[str]] | None:
    """(campaign, the files its manifest names, the manifest's own included), or None."""
    try:
        manifest = parse_manifest((results / MANIFEST_COPY).read_bytes())
    except (OSError, InstallRefused):
        return None
    return manifest.campaign_id, [*files_named(manifest), f"install-{manifest.campaign_id}.json"]


def release_packages(package_dir: Path, results: Path, keep: frozenset[str] = frozenset()) -> int:
    """Remove the packages the install in ``results`` was given (none named in ``keep``); how many."""
    named = _named(results)
    removed = 0
    for name in (named[1] if named else []):
        if name in keep:
            continue
        for path in [package_dir / name, *(package_dir / f"{name}{suffix}" for suffix in PARTIAL_SUFFIXES)]:
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("%s not removed: %s", path, exc)
    return removed


def _ended(results_dir: Path, current: str | None) -> list[tuple[float, Path, int]]:
    ended = []
    try:
        entries = list(results_dir.iterdir())
    except OSError:
        return []
    for directory in entries:
        status = directory / "install.json"
        if directory.name == current or not status.is_file():
            continue
        try:
            code = int(json.loads(status.read_text()).get("code", 0))
            ended.append((status.stat().st_mtime, directory, code))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return [e for e in ended if e[2] not in (InstallStatus.RUNNING, InstallStatus.WAITING)]


def tidy(package_dir: Path, results_dir: Path, current: str | None, keep_names: frozenset[str], keep: int,
         keep_days: float) -> None:
    """At the start of ``current``'s install: the packages of every ended install removed (but
    those ``current`` names), the oldest results retired."""
    trash = results_dir / ".trash"
    shutil.rmtree(trash, ignore_errors=True)
    ended = sorted(_ended(results_dir, current), reverse=True)
    for _, directory, _ in ended:
        release_packages(package_dir, directory, keep_names)
    now = time.time()
    old = [d for n, (at, d, _) in enumerate(ended) if n >= keep or now - at > keep_days * 86400.0]
    for directory in old:
        trash.mkdir(exist_ok=True)
        try:
            os.rename(directory, trash / directory.name)
        except OSError as exc:
            log.warning("results of %s not retired: %s", directory.name, exc)
            continue
        log.info("results of install %s retired (kept: the newest %d, none older than %.0f days)", directory.name, keep,
                 keep_days)
    shutil.rmtree(trash, ignore_errors=True)
