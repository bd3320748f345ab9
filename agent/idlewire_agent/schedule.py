"""Weekday/time-of-day buyer caps, applied live (tc class change: sessions keep flowing).

Rules come from [[schedule.rule]] in node.toml (policy.Rule); the first rule whose days and
time window contain "now" gives the caps, otherwise the base caps of [shaping] apply. A window
whose end is not after its start wraps past midnight and belongs to the day it starts on
(fri 23:00-02:00 covers Friday night into Saturday). Times are the node's local time.

The clock is injectable (``clock=lambda: datetime(...)``) so tests can cross a boundary during a
transfer; ``Scheduler.tick()`` applies the caps of "now" when they differ from what is applied,
and ``Scheduler.run(stop)`` ticks at each boundary (and at least once a minute) until stopped.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from .policy import Rule
from .run import CommandError

log = logging.getLogger("idlewire.schedule")


def caps_at(now: dt.datetime, rules: list[Rule], base: tuple[int, int]) -> tuple[int, int]:
    """(cap_up, cap_down) in bit/s at local time ``now``."""
    minute = now.hour * 60 + now.minute
    today, yesterday = now.weekday(), (now.weekday() - 1) % 7
    for r in rules:
        if r.start < r.end:
            if today in r.days and r.start <= minute < r.end:
                return r.cap_up, r.cap_down
        elif (today in r.days and minute >= r.start) or (yesterday in r.days and minute < r.end):
            return r.cap_up, r.cap_down
    return base


def next_change(now: dt.datetime, rules: list[Rule], base: tuple[int, int]) -> dt.datetime:
    """The next minute at which the caps differ from now's (at most a week ahead)."""
    current = caps_at(now, rules, base)
    t = now.replace(second=0, microsecond=0)
    for _ in range(7 * 24 * 60):
        t += dt.timedelta(minutes=1)
        if caps_at(t, rules, base) != current:
            return t
    return now + dt.timedelta(days=7)


class Scheduler:
    """Keeps the shaper's caps on the schedule. ``apply(cap_up, cap_down)`` is Shaper.set_caps."""

    def __init__(self, rules: list[Rule], base: tuple[int, int], apply: Callable[[int, int], object],
                 clock: Callable[[], dt.datetime] = dt.datetime.now):
        self.rules, self.base, self.apply, self.clock = rules, base, apply, clock
        self.current: tuple[int, int] | None = None

    def tick(self) -> tuple[int, int]:
        """Apply the caps of now if they changed; returns them."""
        caps = caps_at(self.clock(), self.rules, self.base)
        if caps != self.current:
            log.info("buyer caps now up %.3g Mbit/s, down %.3g Mbit/s", caps[0] / 1e6, caps[1] / 1e6)
            self.apply(*caps)
            self.current = caps
        return caps

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except CommandError as exc:  # a failed tc run (one line): retried next tick
                log.warning("applying the scheduled caps failed: %s", exc)
            except Exception:  # anything else must not stop the schedule either
                log.exception("applying the scheduled caps failed")
            now = self.clock()
            wait = (next_change(now, self.rules, self.base) - now).total_seconds()
            stop.wait(max(1.0, min(wait, 60.0)))
