"""The latency source's logic (idle.LatencyEstimator) against synthetic RTT sequences, and in a
closed loop with a model of a home line: a bufferbloated FIFO that the owner and the buyers
share. The real thing (namespaces, miniupnpd, iperf3) is tests/net/test_home.py; the timings on
it are bench/idle.py's. Here the goal of issue 17 is asserted on the logic alone: the cap
follows the owner within 3 s, down and back."""

from __future__ import annotations

import random

import pytest
from idlewire_agent import idle

LINES = (10e6, 40e6)
BASE = (8e6, 30e6)
FLOOR = (0.25e6, 1e6)
THR = 15.0


def bounded(caps):
    return tuple(max(lo, min(hi, c)) for c, lo, hi in zip(caps, FLOOR, BASE, strict=True))


def drive(est, rounds, caps=BASE, t0=0.0, step=0.25):
    """Feed `rounds` ({host: ms|None} each) one every `step` s; returns the caps after each."""
    out = []
    for k, rtts in enumerate(rounds):
        caps = bounded(est.feed(t0 + k * step, rtts, caps, LINES))
        out.append(caps)
    return out


def three(ms_a, ms_b=None, ms_c=None):
    return {"r1": ms_a, "r2": ms_a if ms_b is None else ms_b, "r3": ms_a if ms_c is None else ms_c}


def test_idle_line_with_jitter_keeps_the_configured_caps():
    rng = random.Random(1)
    est = idle.LatencyEstimator(THR)
    caps = drive(est, [three(*(20 + rng.uniform(-3, 3) for _ in range(3))) for _ in range(200)])
    assert caps[-1] == BASE and min(c[1] for c in caps) == BASE[1]


def test_one_late_round_is_not_load_two_of_three_are():
    """A busy node's one late wake-up (every reflector late in one round) costs nothing; the same
    delay in 2 of 3 rounds is congestion and cuts both caps."""
    est = idle.LatencyEstimator(THR)
    caps = drive(est, [three(20)] * 8 + [three(60)] + [three(20)] * 8)
    assert all(c == BASE for c in caps)
    caps = drive(est, [three(60), three(20), three(60)], caps=caps[-1], t0=10)
    assert caps[-1][1] < 0.8 * BASE[1] and caps[-1][0] < 0.8 * BASE[0]


def test_one_reflector_in_trouble_is_not_load():
    """One of three reflectors 100 ms later for good (its route changed): the median is calm."""
    est = idle.LatencyEstimator(THR)
    caps = drive(est, [three(20)] * 8 + [three(20, 120, 20)] * 40)
    assert caps[-1] == BASE


def test_deeper_delay_cuts_deeper():
    cuts = []
    for ms in (20 + THR * 1.1, 20 + THR * 4):
        est = idle.LatencyEstimator(THR)
        caps = drive(est, [three(20)] * 4 + [three(ms)] * 2)
        cuts.append(caps[-1][1] / BASE[1])
    assert cuts[0] == pytest.approx(0.75, abs=0.02) and cuts[1] == pytest.approx(0.5)


def test_a_queue_standing_at_a_third_of_the_threshold_for_a_second_is_a_full_line():
    """Under the threshold all along: 2 rounds at 0.5x it, 2 calm ones, 2 more, ... cost nothing,
    and so does a queue standing just under a third of it; 3 of 4 rounds at 0.5x cut both caps
    x0.6 (CUT_STANDING)."""
    est = idle.LatencyEstimator(THR)
    standing, calm, low = three(20 + 0.5 * THR), three(20), three(20 + 0.3 * THR)
    caps = drive(est, [calm] * 4 + [standing, standing, calm, calm] * 3 + [low] * 8 + [standing, calm, standing])
    assert all(c == BASE for c in caps)
    caps = drive(est, [standing], caps=caps[-1], t0=10)
    assert caps[-1] == pytest.approx(tuple(c * idle.CUT_STANDING for c in BASE))


def test_after_a_cut_the_queue_gets_time_to_drain():
    """Congestion in every round: one cut per 2 rounds (the window starts afresh), not one per round."""
    est = idle.LatencyEstimator(THR)
    caps = drive(est, [three(20)] * 4 + [three(20 + 4 * THR)] * 6)
    assert [round(c[1] / BASE[1], 3) for c in caps[4:]] == [1, 0.5, 0.5, 0.25, 0.25, 0.125]


def test_baseline_follows_a_lower_rtt_at_once_and_a_higher_one_slowly():
    est = idle.LatencyEstimator(THR)
    drive(est, [three(50)] * 4 + [three(20)] * 4)
    assert est.baseline["r1"] == pytest.approx(20, abs=0.01)
    drive(est, [three(30)] * 40, t0=10)  # 10 s of a 10 ms higher RTT
    assert 21 < est.baseline["r1"] < 25


def test_losses_of_known_reflectors_count_as_late_unknown_ones_are_ignored():
    est = idle.LatencyEstimator(THR)
    caps = drive(est, [{"r1": 20, "dead": None}] * 8)
    assert caps[-1] == BASE and "dead" not in est.baseline
    caps = drive(est, [{"r1": None, "dead": None}] * 2, caps=caps[-1], t0=5)
    assert caps[-1][1] < BASE[1]
    assert est.feed(9, {"dead": None}, BASE, LINES) == BASE  # nothing known answered: no figure, no change
    assert idle.LatencyEstimator(THR).delay(0, {"dead": None}) is None


def simulate(owner_on=(10.0, 30.0), end=45.0, owner_mbit=32.0, seed=7, spikes=0.02, block=0, queue_ms=150):
    """A 40 Mbit/s line with a `queue_ms` FIFO; the buyers take whatever cap they get, the owner
    `owner_mbit` between `owner_on`; 3 reflectors 20 ms away with ±1.5 ms jitter, and now and then
    one round late on every reflector (the node busy). `block`: the owner sends in blocks of that
    many bytes whenever it is behind its average (what iperf3 -b does, and a video player's
    chunks: at 32 of 40 Mbit/s a 128 KiB block queues up to 26 ms by itself); 0: a fluid owner.
    Returns [(t, cap_down, delay_ms)]."""
    rng = random.Random(seed)
    est = idle.LatencyEstimator(THR)
    caps, queue, t, dt, out = BASE, 0.0, 0.0, 0.001 if block else 0.01, []
    next_round, sent = 0.0, 0.0
    while t < end:
        arrived = caps[1] * dt
        if owner_on[0] <= t < owner_on[1]:
            if block:
                while owner_mbit * 1e6 * (t - owner_on[0]) - sent >= block * 8:
                    arrived, sent = arrived + block * 8, sent + block * 8
            else:
                arrived += owner_mbit * 1e6 * dt
        queue = min(max(0.0, queue + arrived - LINES[1] * dt), LINES[1] * queue_ms / 1000)
        delay = queue / LINES[1] * 1000
        if t >= next_round:
            late = 40 if rng.random() < spikes else 0
            rtts = {h: 20 + delay + late + rng.uniform(-1.5, 1.5) for h in ("r1", "r2", "r3")}
            caps = bounded(est.feed(t, rtts, caps, LINES))
            next_round = t + idle.ROUND
        out.append((t, caps[1], delay))
        t += dt
    return out


def test_closed_loop_cap_follows_the_owner_down_and_back_within_3_s():
    for seed in range(5):
        trace = simulate(seed=seed)
        before = [c for t, c, _ in trace if t < 10]
        assert min(before) == BASE[1], "an idle line kept its cap"
        # down: at most line - owner + a 10 % margin (the bench's criterion) within 3 s of the start
        down = next(t for t, c, _ in trace if t >= 10 and c <= 40e6 - 32e6 + 4e6)
        assert down - 10 <= 3, (seed, down)
        # back: 90 % of the configured cap within 3 s of the owner's stop
        back = next(t for t, c, _ in trace if t >= 30 and c >= 0.9 * BASE[1])
        assert back - 30 <= 3, (seed, back)


def test_closed_loop_a_steady_owner_keeps_the_queue_short_and_buyers_a_share():
    """While the owner holds 32 of 40 Mbit/s the buyers probe the rest: the queue the owner feels
    stays short most of the time and the buyers are neither starved nor given the owner's part."""
    p95s = []
    for seed in range(5):
        trace = simulate(seed=seed)
        busy = [(c, d) for t, c, d in trace if 13 <= t < 30]
        delays = sorted(d for _, d in busy)
        p95s.append(delays[int(len(delays) * 0.95)])
        assert p95s[-1] <= 3 * THR, (seed, p95s[-1])
        # the growth that speeds up once the owner is gone must not speed up a steady owner's
        # probes: on average the queue stays under the threshold
        assert sum(delays) / len(delays) <= 0.8 * THR, (seed, sum(delays) / len(delays))
        mean_cap = sum(c for c, _ in busy) / len(busy)
        assert 2e6 <= mean_cap <= 12e6, (seed, mean_cap)
    # and the probes' peaks stay low: a plateau dragged down by every cut (the queue still
    # draining) lets the faster growth run into the owner (median p95 ~34 ms instead of ~24)
    assert sorted(p95s)[2] <= 2 * THR, p95s


def test_closed_loop_a_bursty_owner_holds_the_floor_and_its_departure_frees_the_line_in_2_s():
    """An owner whose own blocks queue 0-26 ms (bench/idle.py's iperf3 -b, a video player):
    the buyers sit near the floor while it is on, and once it stops the cap climbs from there
    to 90 % of the configured cap within 2 s: a growth that speeds up above where the line last
    congested, not x3 per second for the whole way (that took 2.7-3 s from the floor)."""
    for seed in range(5):
        trace = simulate(seed=seed, block=128 << 10)
        down = next(t for t, c, _ in trace if t >= 10 and c <= 40e6 - 32e6 + 4e6)
        assert down - 10 <= 3, (seed, down)
        assert min(c for t, c, _ in trace if 25 <= t < 30) <= 2 * FLOOR[1], seed
        back = next(t for t, c, _ in trace if t >= 30 and c >= 0.9 * BASE[1])
        assert back - 30 <= 2, (seed, back)


def test_pinger_round_on_loopback_is_timed_by_the_kernel():
    try:
        p = idle.Pinger()
    except OSError as exc:
        pytest.skip(f"no ICMP socket here: {exc}")
    try:
        got = p.round(["127.0.0.1", "127.0.0.2"], timeout=1.0)
    finally:
        p.close()
    assert set(got) == {"127.0.0.1", "127.0.0.2"}
    assert all(r is not None and 0 <= r < 0.1 for r in got.values()), got


def test_meter_reports_the_figures_and_their_age(monkeypatch):
    """figures(): source, line, cap, threshold and age of the last figure; /metrics shows them."""
    from idlewire_agent import policy

    sh = policy.Shaping(enabled=True, line_up=10_000_000, line_down=40_000_000, floor_up=250_000,
                        floor_down=1_000_000, cap_up=8_000_000, cap_down=30_000_000)
    now = [100.0]
    meter = idle.IdleMeter(policy.Home(source="latency", reflectors=("127.0.0.1",), interval=0.5), sh,
                           lambda u, d: None, "lo", clock=lambda: now[0])
    monkeypatch.setattr(idle.Pinger, "round", lambda self, hosts, timeout=1.0: dict.fromkeys(hosts, 0.02))
    monkeypatch.setattr(meter._stop, "wait", lambda s: now.__setitem__(0, now[0] + s))
    assert meter.tick() == "latency"
    now[0] += 4
    f = meter.figures()
    assert f["source"] == "latency" and f["threshold_ms"] == 15 and f["delay_ms"] == 0
    assert f["line_down_mbit"] == 40 and f["cap_down_mbit"] == 30 and f["owner_down_mbit"] is None
    assert f["age_s"] == pytest.approx(4, abs=0.5)


def test_when_no_source_works_why_names_each_one_and_never_half_of_it(monkeypatch):
    """auto, no IGD and a silent reflector: /health's `why` names both sources; while the latency
    source is still being tried, a reader sees the previous full reason, not the IGD's alone."""
    from idlewire_agent import policy

    sh = policy.Shaping(enabled=True, line_up=10_000_000, line_down=40_000_000, floor_up=250_000,
                        floor_down=1_000_000, cap_up=8_000_000, cap_down=30_000_000)
    now = [100.0]
    meter = idle.IdleMeter(policy.Home(source="auto", reflectors=("192.0.2.9",), interval=0.5), sh,
                           lambda u, d: None, "lo", igd=lambda: None, clock=lambda: now[0])
    seen = []

    def silent(self, hosts, timeout=1.0):
        seen.append(meter.figures()["why"])  # what an API reader gets mid-tick
        now[0] += timeout
        return dict.fromkeys(hosts)

    monkeypatch.setattr(idle.Pinger, "round", silent)
    monkeypatch.setattr(meter._stop, "wait", lambda s: now.__setitem__(0, now[0] + s))
    for _ in range(3):
        assert meter.tick() == "none"
    why = meter.figures()["why"]
    assert why == "no UPnP IGD on the LAN; no reflector answered (192.0.2.9)"
    assert seen[0] == "not measured yet" and all(w in ("not measured yet", why) for w in seen), seen


def test_closed_loop_a_short_buffer_that_never_reaches_the_threshold_still_cuts():
    """A modem with a 12 ms buffer (or AQM) never queues past the 15 ms threshold, however full the
    line: a queue standing above half the threshold for a second is a full line, and the cap
    follows the owner down within 3 s all the same (the threshold alone never cut at all)."""
    for seed in range(5):
        trace = simulate(seed=seed, queue_ms=12)
        assert min(c for t, c, _ in trace if t < 10) == BASE[1], "a line with room kept its cap"
        down = next(t for t, c, _ in trace if t >= 10 and c <= 40e6 - 32e6 + 4e6)
        assert down - 10 <= 3, (seed, down)
        back = next(t for t, c, _ in trace if t >= 30 and c >= 0.9 * BASE[1])
        assert back - 30 <= 3, (seed, back)
