"""What the TBOX keeps of campaigns that ended, so that months of campaigns fit its eMMC.

A campaign's packages are needed only while it can still be resumed: once its end is reported
(state ``reported``) they are removed, the rest of its directory (state, traces, results: the
evidence) stays. Of the ended campaigns the newest ``tbox.keep_campaigns`` are kept, none older
than ``tbox.keep_days``; an older one is retired: its key and campaign id go into
``retired.json`` first (so a campaign sent again is still known: no reinstall, a duplicate),
then its directory is moved to ``trash/`` (one rename: the engine never sees half of it) and
removed. A kill at any line leaves a campaign either whole or in the trash, which is emptied at
the next tidy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

from agent.adapters.storage import atomic_write_json
from tbox.campaign_state import TERMINAL, CampaignRecord

__all__ = ["Retention", "RETIRED"]

log = logging.getLogger(__name__)

RETIRED = "retired.json"
MAX_RETIRED = 4096  # keys remembered; the oldest are forgotten first


class Retention:
    def __init__(self, campaigns_dir: Path, keep: int, keep_days: float) -> None:
        self.campaigns_dir, self.keep, self.max_age_s = campaigns_dir, keep, keep_days * 86400.0
        self.state_dir = campaigns_dir.parent
        self.trash = self.state_dir / "trash"
        self._retired: dict[str, str | None] | None = None

    # ---- what is remembered of retired campaigns -------------------------------------------
    def retired(self) -> dict[str, str | None]:
        """Retired campaigns: directory key -> campaign id."""
        if self._retired is None:
            try:
                doc = json.loads((self.state_dir / RETIRED).read_text())
                self._retired = {str(k): (str(v) if v is not None else None) for k, v in dict(doc["campaigns"]).items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self._retired = {}
        return self._retired

    def known(self, key: str) -> bool:
        return key in self.retired()

    def known_id(self, campaign_id: str) -> bool:
        return campaign_id in self.retired().values()

    # ---- tidying -----------------------------------------------------------------------------
    def tidy(self, records: Iterable[CampaignRecord]) -> None:
        """Packages of ended campaigns removed; the oldest ended campaigns retired; the trash emptied."""
        ended = [r for r in records if r.state in TERMINAL]
        for record in ended:
            for sub in ("packages", "media"):
                if (record.dir / sub).exists():
                    shutil.rmtree(record.dir / sub, ignore_errors=True)
                    log.info("campaign %s ended: its %s removed", record.campaign_id or record.key, sub)
        if self.trash.exists():  # what a kill left there
            shutil.rmtree(self.trash, ignore_errors=True)
        now = time.time()
        ended.sort(key=lambda r: _mtime(r.path), reverse=True)
        old = [r for n, r in enumerate(ended) if n >= self.keep or now - _mtime(r.path) > self.max_age_s]
        if old:
            self._retire(old)
        if self.trash.exists():
            shutil.rmtree(self.trash, ignore_errors=True)

    def _retire(self, records: list[CampaignRecord]) -> None:
        retired = dict(self.retired())
        for record in records:
            retired.pop(record.key, None)
            retired[record.key] = record.campaign_id
        while len(retired) > MAX_RETIRED:
            del retired[next(iter(retired))]
        atomic_write_json(self.state_dir / RETIRED, {"campaigns": retired})  # first: a campaign sent again stays known
        self._retired = retired
        self.trash.mkdir(parents=True, exist_ok=True)
        for record in records:
            os.rename(record.dir, self.trash / record.key)
            log.info("campaign %s retired (kept: the newest %d, none older than %.0f days)",
                     record.campaign_id or record.key, self.keep, self.max_age_s / 86400)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
