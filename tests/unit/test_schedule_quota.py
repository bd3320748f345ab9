"""Schedules (which caps when, boundaries, wrap past midnight) and the quota keeper (periods, state)."""

import datetime as dt
import json

import pytest
from idlewire_agent.policy import MBIT, Quota, Rule
from idlewire_agent.quota import QuotaKeeper, period_start
from idlewire_agent.schedule import Scheduler, caps_at, next_change

WEEKDAYS = (0, 1, 2, 3, 4)
RULES = [Rule(WEEKDAYS, 8 * 60, 23 * 60, 5 * MBIT, 5 * MBIT),
         Rule(tuple(range(7)), 60, 7 * 60, 80 * MBIT, 80 * MBIT),
         Rule((4,), 23 * 60 + 30, 2 * 60, 1 * MBIT, 2 * MBIT)]  # Friday 23:30 into Saturday 02:00
BASE = (20 * MBIT, 30 * MBIT)
MON = dt.datetime(2026, 11, 23)  # a Monday


@pytest.mark.parametrize(("when", "caps"), [
    (MON.replace(hour=6, minute=59), (80 * MBIT, 80 * MBIT)),
    (MON.replace(hour=7, minute=59), BASE),
    (MON.replace(hour=8), (5 * MBIT, 5 * MBIT)),
    (MON.replace(hour=22, minute=59), (5 * MBIT, 5 * MBIT)),
    (MON.replace(hour=23), BASE),
    (MON.replace(hour=0, minute=30), BASE),
    (MON + dt.timedelta(days=5, hours=10), BASE),  # Saturday 10:00: the weekday rule does not apply
    (MON + dt.timedelta(days=4, hours=23, minutes=45), (1 * MBIT, 2 * MBIT)),  # Friday night
    (MON + dt.timedelta(days=5, hours=0, minutes=30), (1 * MBIT, 2 * MBIT)),  # ... into Saturday
    (MON + dt.timedelta(days=6, hours=0, minutes=30), BASE),  # but not Saturday into Sunday
])
def test_caps_at(when, caps):
    assert caps_at(when, RULES, BASE) == caps


def test_next_change():
    assert next_change(MON.replace(hour=7, minute=10, second=20), RULES, BASE) == MON.replace(hour=8)
    assert next_change(MON.replace(hour=8), RULES, BASE) == MON.replace(hour=23)


def test_scheduler_applies_only_changes():
    applied = []
    now = [MON.replace(hour=7, minute=59)]
    s = Scheduler(RULES, BASE, lambda up, down: applied.append((up, down)), clock=lambda: now[0])
    s.tick()
    s.tick()
    now[0] = MON.replace(hour=8)
    s.tick()
    assert applied == [BASE, (5 * MBIT, 5 * MBIT)]


@pytest.mark.parametrize(("today", "day", "start"), [
    (dt.date(2026, 11, 20), 1, dt.date(2026, 11, 1)),
    (dt.date(2026, 11, 14), 15, dt.date(2026, 10, 15)),
    (dt.date(2026, 11, 15), 15, dt.date(2026, 11, 15)),
    (dt.date(2026, 3, 5), 31, dt.date(2026, 2, 28)),  # February has no 31st: its last day
    (dt.date(2026, 3, 31), 31, dt.date(2026, 3, 31)),
    (dt.date(2026, 1, 3), 10, dt.date(2025, 12, 10)),
])
def test_period_start(today, day, start):
    assert period_start(today, day) == start


def test_quota_keeper_closes_once_refuses_and_persists(tmp_path):
    calls = []
    now = [dt.datetime(2026, 11, 20, 12)]
    state = tmp_path / "quota.json"
    q = Quota(monthly_bytes=1000, reset_day=21, max_sessions=2)
    k = QuotaKeeper(q, state, on_exhausted=calls.append, clock=lambda: now[0])
    assert k.admit(1) == (True, "")
    assert k.admit(2) == (False, "node is at its limit of 2 concurrent sessions")
    assert k.add_usage(400, 500) is False and calls == []
    assert k.add_usage(60, 40) is True and len(calls) == 1
    assert k.add_usage(10, 10) is False and len(calls) == 1  # called once
    ok, why = k.admit(0)
    assert not ok and why == "monthly quota of 1e-06 GB reached; it resets on 2026-11-21"
    assert json.loads(state.read_text()) == {"period_start": "2026-10-21", "used_up": 470, "used_down": 550,
                                             "exhausted": True}
    assert not list(tmp_path.glob(".quota.json.*"))  # no temp file left behind
    again = QuotaKeeper(q, state, clock=lambda: now[0])
    assert again.exhausted and again.used == 1020 and not again.admit(0)[0]
    now[0] = dt.datetime(2026, 11, 21, 0, 0)
    assert again.admit(0) == (True, "") and again.used == 0 and again.remaining() == 1000
    with pytest.raises(ValueError):
        again.add_usage(-1, 0)


def test_no_quota_never_closes(tmp_path):
    k = QuotaKeeper(Quota(monthly_bytes=0), tmp_path / "q.json", on_exhausted=lambda r: 1 / 0)
    assert k.add_usage(10**15, 10**15) is False and k.remaining() is None and k.admit(0)[0]
