"""Owner content items on their schedule: each tick asks the pure schedule core
(``agent/core/schedule.py``) what must start, stop or be undone now, runs it through the
item's executor (``tbox/content_exec.py``), backs off when the ECU does not answer, and reports
every change. Part of the content manager (``tbox/content_manager.py``)."""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from agent.core.config import ContentConfig
from agent.core.content import Bundle, BundleRejected, Item
from agent.core.schedule import ItemState, is_night, tick
from agent.errors import Refused, TryLater, VotaError
from tbox.content_exec import Executor, Job
from tbox.content_state import ENDED, RUNNING, BundleRecord, ItemRecord

__all__ = ["ItemScheduling", "SENSOR_CACHE_S", "RETRY_MAX_S"]

log = logging.getLogger(__name__)

SENSOR_CACHE_S = 5.0  # a light-sensor reading serves this long
RETRY_MAX_S = 60.0  # the longest pause before an executor action is tried again


class ItemScheduling:
    """The schedule-running half of the content manager (a mixin: it uses the manager's
    configuration, executors, stored bundles and reports)."""

    config: ContentConfig
    executors: dict[str, Executor]
    now: Callable[[], _dt.datetime]
    light: Callable[[], bytes] | None
    _lux: tuple[float, float | None]
    _backoff: dict[tuple[Path, str], float]

    def _bundle(self, directory: Path) -> Bundle:
        raise NotImplementedError

    def _plain(self, directory: Path, bundle: Bundle, item: Item) -> bytes:
        raise NotImplementedError

    def _report_item(self, doc: BundleRecord, item: Item, entry: ItemRecord, at: _dt.datetime | None = None,
                     **extra: Any) -> None:
        raise NotImplementedError

    # ---- the schedule -------------------------------------------------------------------------
    def _night(self, item: Item, now: _dt.datetime) -> bool:
        if item.schedule.mode == "any":
            return False
        if self.light is not None and time.monotonic() - self._lux[0] > SENSOR_CACHE_S:
            try:
                raw = self.light()
                lux: float | None = float(int.from_bytes(raw[:2], "big")) if len(raw) >= 2 else None
            except VotaError as exc:
                log.info("light sensor not available (%s); day and night from the clock", exc)
                lux = None
            self._lux = (time.monotonic(), lux)
        dusk, dawn = (_dt.time.fromisoformat(t) for t in self.config.night)
        return is_night(now.astimezone(item.schedule.tz), self._lux[1], self.config.night_below_lux, dusk, dawn)

    def _job(self, directory: Path, state: BundleRecord, item: Item) -> Job:
        bundle = self._bundle(directory)
        return Job(bundle.bundle_id, bundle.bundle_version, item, state.items[item.id],
                   lambda: self._plain(directory, bundle, item),
                   lambda: ((directory / "manifest.json").read_bytes(), (directory / "manifest.sig.json").read_bytes()))

    def _run(self, directory: Path, state: BundleRecord, item: Item, action: str) -> str | None:
        """Run one executor action: the item's status after a start, "" after a stop or a
        revert, None when it is to be tried again later (the ECU did not answer: backing off,
        for as long as the item's schedule wants the action)."""
        executor = self.executors.get(item.cls)
        entry = state.items[item.id]
        key = (directory, item.id)
        if time.monotonic() < self._backoff.get(key, 0.0):
            return None
        try:
            if executor is None:
                raise Refused("unsupported", f"no executor for {item.cls} items")
            job = self._job(directory, state, item)
            status = executor.start(job) if action == "start" else ""
            if action == "stop":
                executor.stop(job)
            elif action == "revert":
                executor.revert(job)
            entry.retries = 0
            self._backoff.pop(key, None)
            return status
        except TryLater as exc:
            entry.retries += 1
            self._backoff[key] = time.monotonic() + min(RETRY_MAX_S, 0.5 * 2 ** min(entry.retries, 8))
            log.warning("content %s/%s %s: %s; will retry", directory.name, item.id, action, exc)
            return None
        except BundleRejected as exc:
            raise Refused(exc.reason, str(exc)) from None

    def _revert(self, directory: Path, state: BundleRecord, item: Item) -> None:
        """Undo an active item now, or at a later tick when its ECU does not answer."""
        if self._run(directory, state, item, "revert") is None:
            state.items[item.id].revert_pending = True

    def _tick(self, directory: Path, state: BundleRecord) -> None:
        bundle = self._bundle(directory)
        now = self.now()
        changed = False
        for item in bundle.items:
            entry = state.items[item.id]
            old = entry.status
            extra: dict[str, Any] = {}
            try:
                if entry.revert_pending:
                    if self._run(directory, state, item, "revert") is not None:
                        entry.revert_pending = False
                        changed = True
                    continue
                if old == "installing":
                    executor = self.executors.get(item.cls)
                    polled = executor.poll(self._job(directory, state, item)) if executor is not None else None
                    if polled is None:
                        continue
                    entry.status, extra = polled
                elif old in RUNNING and entry.wanted and (directory / "items" / f"{item.id}.bin").exists():
                    current = ItemState(item.id, old, entry.policy, entry.accepted, entry.ran)
                    new, actions = tick({item.id: current}, {item.id: item.schedule}, now, self._night(item, now))
                    target = new[item.id].status
                    for action in actions:
                        kind = action.action
                        if kind in ("start", "stop", "revert"):
                            after = self._run(directory, state, item, kind)
                            if after is None:  # try again at a later tick
                                target = "scheduled" if old == "offered" else old
                            elif kind == "start":
                                target = after
                                entry.ran = True
                    entry.status = target
                    changed = changed or bool(actions)  # retries counted are kept too
                else:
                    continue
            except Refused as exc:
                entry.status = "failed"
                extra = {"reason": exc.reason, "detail": exc.detail, **exc.extra}
            if entry.status != old:
                if entry.status == "failed":
                    entry.reason = extra.get("reason")
                self._report_item(state, item, entry, at=now, **extra)
                changed = True
                log.info("content %s/%s: %s -> %s", directory.name, item.id, old, entry.status)
        if changed:
            state.save()
            self._prune(directory, state)

    def _prune(self, directory: Path, state: BundleRecord) -> None:
        """A bundle whose items have all ended keeps its manifest and state, not its files."""
        if all(e.status in ENDED or not e.wanted for e in state.items.values()):
            shutil.rmtree(directory / "items", ignore_errors=True)
