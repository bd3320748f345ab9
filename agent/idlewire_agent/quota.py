"""Monthly quota and the session limit: admission of new sessions, closing at the quota.

State (``quota.json`` in the agent's state directory) is written atomically (temp file, fsync,
rename) so a restart or a power cut keeps the month's usage and the "exhausted" verdict:

    {"period_start": "2026-11-01", "used_up": 123, "used_down": 456, "exhausted": false}

The period starts on ``reset_day`` of each month (29-31 fall on the last day of shorter months);
when the clock passes into a new period the usage starts over and sessions are admitted again.

The session manager:
  * asks ``admit(open_sessions)`` before opening a session: (True, "") or (False, reason);
  * reports metered bytes with ``add_usage(up, down)`` (ledger deltas, never negative);
  * gives ``on_exhausted``: called once, outside the lock, when the quota is reached, with the
    reason; it closes open sessions gracefully and writes their final receipts.
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import logging
import os
import threading
from collections.abc import Callable

from .keys import write_atomic
from .policy import Quota

log = logging.getLogger("idlewire.quota")


def period_start(today: dt.date, reset_day: int) -> dt.date:
    """The first day of the quota period that contains ``today``."""

    def start_in(year: int, month: int) -> dt.date:
        return dt.date(year, month, min(reset_day, calendar.monthrange(year, month)[1]))

    s = start_in(today.year, today.month)
    if today >= s:
        return s
    year, month = (today.year, today.month - 1) if today.month > 1 else (today.year - 1, 12)
    return start_in(year, month)


def atomic_write_json(path: str | os.PathLike, data: dict) -> None:
    write_atomic(path, json.dumps(data, sort_keys=True))


class QuotaKeeper:
    def __init__(self, quota: Quota, state_path: str | os.PathLike, *,
                 on_exhausted: Callable[[str], object] | None = None,
                 clock: Callable[[], dt.datetime] = dt.datetime.now):
        self.quota, self.path, self.clock = quota, os.fspath(state_path), clock
        self.on_exhausted = on_exhausted
        self.lock = threading.Lock()
        self.period = period_start(clock().date(), quota.reset_day)
        self.used_up = self.used_down = 0
        self.exhausted = False
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path) as f:
                st = json.load(f)
            start = dt.date.fromisoformat(st["period_start"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return
        if start == self.period:
            self.used_up, self.used_down = int(st["used_up"]), int(st["used_down"])
            self.exhausted = bool(st["exhausted"])

    def _save(self) -> None:
        atomic_write_json(self.path, {"period_start": self.period.isoformat(), "used_up": self.used_up,
                                      "used_down": self.used_down, "exhausted": self.exhausted})

    def _roll(self) -> None:
        start = period_start(self.clock().date(), self.quota.reset_day)
        if start != self.period:
            log.info("quota period %s begins: usage starts over", start)
            self.period, self.used_up, self.used_down, self.exhausted = start, 0, 0, False
            self._save()

    @property
    def used(self) -> int:
        return self.used_up + self.used_down

    def remaining(self) -> int | None:
        """Bytes left this period, None without a quota."""
        if not self.quota.monthly_bytes:
            return None
        return max(0, self.quota.monthly_bytes - self.used)

    def admit(self, open_sessions: int) -> tuple[bool, str]:
        """May one more session open now?"""
        with self.lock:
            self._roll()
            if self.exhausted:
                return False, (f"monthly quota of {self.quota.monthly_bytes / 1e9:g} GB reached; "
                               f"it resets on {self._next_reset().isoformat()}")
            if open_sessions >= self.quota.max_sessions:
                return False, f"node is at its limit of {self.quota.max_sessions} concurrent sessions"
            return True, ""

    def _next_reset(self) -> dt.date:
        return period_start(self.period + dt.timedelta(days=32), self.quota.reset_day)

    def add_usage(self, up: int, down: int) -> bool:
        """Count metered bytes; True when this call reached the quota (and on_exhausted was called)."""
        if up < 0 or down < 0:
            raise ValueError("usage deltas are never negative")
        with self.lock:
            self._roll()
            self.used_up += up
            self.used_down += down
            reached = bool(self.quota.monthly_bytes) and not self.exhausted and self.used >= self.quota.monthly_bytes
            if reached:
                self.exhausted = True
            self._save()
        if reached:
            reason = f"monthly quota of {self.quota.monthly_bytes / 1e9:g} GB reached"
            log.warning("%s: closing open sessions", reason)
            if self.on_exhausted:
                self.on_exhausted(reason)
        return reached
