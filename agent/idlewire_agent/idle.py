"""Node mode: sell only what the owner's line really has idle, when the owner's traffic does not
cross the node (one NIC on the home LAN, `[home] mode = "node"`).

    cap = line - owner use - margin, bounded by [floor, the configured/scheduled cap]

updated every `[home] interval` s and given to the shaper (`Shaper.set_caps`, the same call the
schedule makes: the effective cap is the minimum of both). The owner's use comes from:

* **upnp** — the home router's WAN byte counters over UPnP IGD (`GetTotalBytesReceived/Sent`,
  upnp.py): owner = WAN rate - this node's own rate (its interface counters: buyers' encrypted
  and clear traffic both cross the WAN). A rise is taken at once; a fall is followed at half
  the difference per interval (a bursty owner does not make the cap flap). While the line is
  full and the owner on it, the owner's TCP is squeezed and hides its demand: the cap halves
  per interval until the line has room again.
* **latency** — when the router offers no counters: the cake-autorate idea (LatencyEstimator).
  A round of ICMP echoes to every reflector (`[home] reflectors`) every ROUND s (at most a
  quarter of `interval`), timed by the kernel's receive timestamp (a busy node's late wake-up is
  not delay). Per reflector a baseline RTT that follows a lower RTT at once and a higher one
  slowly; the round's delay is the median over reflectors of RTT - baseline (one reflector's
  own trouble is not load). Congested: 2 of the last 3 rounds above `latency_ms` → the caps are
  cut (x0.75 at the threshold down to x0.5 at 3x it); or a queue standing at a third of it (3
  of the last 4 rounds: BBR senders, a short buffer or a modem's AQM keep a full line's queue
  under the threshold) → x0.6; then the window starts afresh (a refractory period: the queue
  needs time to drain). Calm (below a third of the threshold, for
  CALM_S, HOLD_S after the last cut): the caps grow fast (x GROW per second) except near the
  cap at which the line last congested (x PLATEAU there), so a steady owner sees a slow probe
  and a departed owner a quick return; calm above that plateau means the owner left or slowed
  down, and the growth speeds up the longer it lasts (up to GROW ** ACCEL_MAX per second).
  ICMP echo cannot tell which direction is congested: both caps move together.
* **none** — `source = "off"`, or nothing works (no IGD counters, no reflector answers): the
  configured caps, and `/health` says why.

`IdleMeter.figures()` is what /health (`idle`) and /metrics (`idlewire_idle_*`) report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time

from . import upnp

log = logging.getLogger("idlewire.idle")
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)

# latency source (LatencyEstimator); rates are per second, so the round's length does not matter
ROUND = 0.25  # s between echo rounds (at most interval / 4)
CUT = (0.75, 0.5)  # the caps' factor per cut: at the threshold .. at 3x it and above
WINDOW, CONGESTED = 3, 2  # congested: this many of the last WINDOW rounds above the threshold
CALM = 1 / 3  # calm: below this share of the threshold; a queue standing at or above it ...
STANDING = (3, 4)  # ... in this many of the last rounds is a full line too ...
CUT_STANDING = 0.6  # ... cuts the caps by this factor
CALM_S = 0.5  # grow only after this long calm ...
HOLD_S = 0.75  # ... and this long after the last cut
GROW = 3.0  # x per second while calm, away from where the line last congested ...
ACCEL_S, ACCEL_MAX = 0.25, 3  # ... its exponent x(1 + s calm above the plateau / ACCEL_S), at most ACCEL_MAX
PLATEAU = 1.3  # x per second within PLATEAU_BAND of that cap (a steady owner is probed gently)
PLATEAU_BAND = (0.8, 1.15)
CEILING_S = 5.0  # a cut without growth since the last one moves the plateau only when it is this old
GROW_MIN = 0.05  # ... and at least this share of the line per second (from a tiny cap)
BASELINE_UP_S = 1 / 60  # a higher RTT moves the baseline by this share of the difference per second
BASELINE_DOWN = 0.9  # a lower RTT moves it by this share at once
STALE_S = 5.0  # no reflector answered for this long (and 2 intervals): the source does not work
RELEASE = 0.75  # upnp source: a falling owner rate is followed by this share of the difference per interval
SQUEEZE = 0.5  # upnp source: the cap's factor per interval while the line is full and the owner on it


def iface_bytes(dev: str) -> tuple[int, int]:
    """(rx, tx) bytes of a local interface, from sysfs."""
    base = f"/sys/class/net/{dev}/statistics/"
    with open(base + "rx_bytes") as f:
        rx = int(f.read())
    with open(base + "tx_bytes") as f:
        tx = int(f.read())
    return rx, tx


class Pinger:
    """ICMP echo, standard library only: an unprivileged ping socket where the kernel allows it
    (net.ipv4.ping_group_range), else a raw socket (the agent runs as root)."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            self.raw = False
        except OSError:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            self.raw = True
        with contextlib.suppress(OSError):  # kernel receive timestamps (Linux; else the time we woke)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.ident = os.getpid() & 0xFFFF
        self.seq = 0

    @staticmethod
    def _checksum(data: bytes) -> int:
        if len(data) % 2:
            data += b"\0"
        s = sum(struct.unpack(f"!{len(data) // 2}H", data))
        s = (s >> 16) + (s & 0xFFFF)
        s += s >> 16
        return ~s & 0xFFFF

    def _clock(self, ancdata) -> float:
        """The kernel's receive time (SO_TIMESTAMPNS) when it gave one, else now."""
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = struct.unpack("@qq", data[:16])
                return sec + nsec / 1e9
        return time.time()

    def round(self, hosts, timeout: float = 1.0) -> dict[str, float | None]:
        """One echo to each host at once; {host: round-trip time in s, None when no answer came
        within `timeout`}. Replies are timed by the kernel's receive timestamp, so a node too
        busy to wake up at once does not read its own lateness as the line's delay."""
        out: dict[str, float | None] = dict.fromkeys(hosts)
        sent: dict[int, tuple[str, float, float]] = {}
        for host in out:
            self.seq = (self.seq + 1) & 0xFFFF
            head = struct.pack("!BBHHH", 8, 0, 0, self.ident, self.seq)
            payload = b"idlewire" + struct.pack("!H", self.seq)
            head = struct.pack("!BBHHH", 8, 0, self._checksum(head + payload), self.ident, self.seq)
            t0, m0 = time.time(), time.monotonic()
            try:
                self.sock.sendto(head + payload, (host, 0))
            except OSError:
                continue
            sent[self.seq] = (host, t0, m0)
        deadline = time.monotonic() + timeout
        while sent:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                data, anc, _flags, addr = self.sock.recvmsg(2048, socket.CMSG_SPACE(16))
            except (TimeoutError, OSError):
                break
            t1 = self._clock(anc)
            if self.raw:
                data = data[(data[0] & 0x0F) * 4:]
            if len(data) < 8 or data[0] != 0:
                continue
            _, _, _, ident, seq = struct.unpack("!BBHHH", data[:8])
            if seq in sent and sent[seq][0] == addr[0] and (ident == self.ident or not self.raw):
                host, t0, m0 = sent.pop(seq)
                rtt = t1 - t0
                # the wall clock stepped in between (NTP): our own monotonic timing instead
                out[host] = rtt if 0 <= rtt <= timeout + 1 else time.monotonic() - m0
        return out

    def rtt(self, host: str, timeout: float = 1.0) -> float | None:
        """Round-trip time to `host` in seconds, None when no answer came in `timeout`."""
        return self.round([host], timeout)[host]

    def close(self) -> None:
        self.sock.close()


class LatencyEstimator:
    """The latency source's logic, without sockets or clocks: `feed(now, rtts, caps, lines)` takes
    one round of echoes ({reflector: RTT in ms, None for a loss}) and returns the new caps
    (unbounded: the meter bounds them). See the module's docstring for the rules."""

    def __init__(self, threshold_ms: float):
        self.threshold = threshold_ms
        self.baseline: dict[str, float] = {}  # per reflector, ms
        self.delay_ms: float | None = None  # the last round's (median over reflectors)
        self.rounds: list[float] = []  # the last rounds' delays (since the last cut)
        self.last = None  # time of the last round
        self.last_cut = float("-inf")
        self.calm_since: float | None = None
        self.above_since: float | None = None  # calm and growing above the plateau since
        self.grown = False  # the caps grew since the last cut
        self.ceiling_at = float("-inf")
        self.answered: float | None = None  # time of the last round any reflector answered
        self.ceiling: tuple[float, ...] | None = None  # the caps at which the line last congested

    def delay(self, now: float, rtts: dict[str, float | None]) -> float | None:
        """The round's delay above baseline in ms (median over reflectors); a known reflector
        that did not answer counts as late; None when no reflector ever answered."""
        dt = 0.0 if self.last is None else min(1.0, max(0.0, now - self.last))
        delays = []
        for host, ms in rtts.items():
            base = self.baseline.get(host)
            if ms is None:
                if base is not None:
                    delays.append(float("inf"))
                continue
            if base is None or ms < base:
                base = ms if base is None else base + (ms - base) * BASELINE_DOWN
            else:
                base += (ms - base) * min(1.0, BASELINE_UP_S * dt)
            self.baseline[host] = base
            delays.append(max(0.0, ms - base))
        if any(ms is not None for ms in rtts.values()):
            self.answered = now
        if not delays:
            return None
        delays.sort()
        return delays[len(delays) // 2]

    def feed(self, now: float, rtts: dict[str, float | None], caps, lines) -> tuple[float, ...]:
        d = self.delay(now, rtts)
        dt = 0.0 if self.last is None else min(1.0, max(0.0, now - self.last))
        self.last = now
        if d is None:
            return tuple(caps)
        self.delay_ms = d
        self.rounds = [*self.rounds, d][-max(WINDOW, STANDING[1]):]
        congested = sum(r > self.threshold for r in self.rounds[-WINDOW:]) >= CONGESTED
        # a queue that stands at a third of the threshold: the line is full even though the delay
        # stays under it (BBR senders keep the queue short; so do a modem's small buffer or AQM)
        standing = sum(r >= self.threshold * CALM for r in self.rounds[-STANDING[1]:]) >= STANDING[0]
        if congested or standing:
            worst = min(d, 3 * self.threshold) / self.threshold  # 1 .. 3
            cut = CUT[0] + (CUT[1] - CUT[0]) * (worst - 1) / 2 if congested else CUT_STANDING
            # where the line congested: a cut after growth; a second cut without growth in between
            # is the queue still draining, not a lower ceiling, unless the owner has held the caps
            # down for CEILING_S (then the old ceiling says nothing about the line any more)
            if self.grown or self.ceiling is None or now - self.ceiling_at > CEILING_S:
                self.ceiling, self.ceiling_at, self.grown = tuple(caps), now, False
            self.rounds, self.last_cut, self.calm_since, self.above_since = [], now, None, None
            return tuple(c * cut for c in caps)
        if d >= self.threshold * CALM or self.rounds[-1] > self.threshold:
            self.calm_since = self.above_since = None
            return tuple(caps)
        if self.calm_since is None:
            self.calm_since = now
        if now - self.calm_since < CALM_S or now - self.last_cut < HOLD_S:
            return tuple(caps)
        # Above the plateau (or with no congestion known) and still calm: the owner has left or
        # slowed down. The growth speeds up the longer that lasts, so that a cap cut to the floor
        # is back in ~1.5 s; below the plateau it does not (a steady owner's next probe stays gentle).
        above = self.ceiling is None or all(c > PLATEAU_BAND[1] * m for c, m in zip(caps, self.ceiling, strict=True))
        if not above:
            self.above_since = None
        elif self.above_since is None:
            self.above_since = now
        speed = 1.0 if self.above_since is None else min(1 + (now - self.above_since) / ACCEL_S, ACCEL_MAX)
        out = []
        for i, (c, line) in enumerate(zip(caps, lines, strict=True)):
            near = self.ceiling is not None and \
                PLATEAU_BAND[0] * self.ceiling[i] <= c <= PLATEAU_BAND[1] * self.ceiling[i]
            out.append(c * (PLATEAU if near else GROW) ** (dt * (1 if near else speed)) + line * GROW_MIN * dt)
        self.grown = True
        return tuple(out)


class IdleMeter:
    """Measures the owner's use of the line and keeps the buyers' caps below what is left.

    `apply(cap_up, cap_down)` is Shaper.set_caps; `set_base(up, down)` is what the schedule calls
    instead (its caps bound ours). `igd` is a callable returning the home router's upnp.Igd or
    None (the port mapper's, so one discovery serves both).
    """

    def __init__(self, home, shaping, apply, wan: str, igd=None, clock=time.monotonic):
        self.home, self.sh, self.apply, self.wan = home, shaping, apply, wan
        self.igd = igd or (lambda: None)
        self.clock = clock
        self.base = (shaping.cap_up, shaping.cap_down)
        self.caps = self.base
        self.applied: tuple[int, int] | None = None
        self.source = "none"
        self.why = "not measured yet"
        self._reason = ""  # why the source just tried gave no figure
        self.owner = [0.0, 0.0]  # up, down, bit/s (smoothed)
        self.delay_ms: float | None = None
        self._last: tuple[float, tuple[int, int], tuple[int, int]] | None = None
        self._pinger: Pinger | None = None
        self._est = LatencyEstimator(home.latency_ms)
        self._stop = threading.Event()
        self.measured: float | None = None  # clock() of the last figure a source produced
        self.lock = threading.Lock()

    # --- the caps -------------------------------------------------------------------------------
    def set_base(self, cap_up: int, cap_down: int) -> None:
        """The schedule's caps (the most buyers may have now): ours are at most these."""
        with self.lock:
            self.base = (cap_up, cap_down)
        self._apply()

    def _bounds(self, i: int) -> tuple[int, int]:
        line = (self.sh.line_up, self.sh.line_down)[i]
        floor = (self.sh.floor_up, self.sh.floor_down)[i]
        return min(floor, self.base[i]), min(self.base[i], line)

    def _bounded(self, caps) -> tuple[int, int]:
        """Caps kept inside their bounds, so that a long calm spell banks no credit."""
        return tuple(max(lo, min(hi, int(c))) for c, (lo, hi) in  # type: ignore[return-value]
                     zip(caps, (self._bounds(0), self._bounds(1)), strict=True))

    def _apply(self) -> None:
        with self.lock:  # one set_caps at a time (the schedule's thread and ours)
            want = self._bounded(self.caps)
            if self.applied is not None and all(abs(w - a) <= 0.02 * max(a, 1) for w, a in
                                                zip(want, self.applied, strict=True)):
                return
            self.apply(*want)
            self.applied = want  # only once tc took it: /health reports what is in force

    # --- sources --------------------------------------------------------------------------------
    def _upnp(self) -> bool:
        igd = self.igd()
        if igd is None:
            self._reason = "no UPnP IGD on the LAN"
            return False
        try:
            own0 = iface_bytes(self.wan)
            wan = igd.counters()
            own1 = iface_bytes(self.wan)
        except OSError as exc:
            self._reason = f"cannot read this node's counters on {self.wan}: {exc.strerror}"
            return False
        if wan is None:
            self._reason = "the router's IGD does not report its WAN byte counters"
            return False
        # the router read its counters somewhere during the upnpc call (tens of ms on a busy
        # node): ours at the middle of it, so that a buyer at line rate is not taken for the owner
        own = ((own0[0] + own1[0]) // 2, (own0[1] + own1[1]) // 2)
        now = self.clock()
        last, self._last = self._last, (now, wan, own)
        if last is None or now - last[0] <= 0:
            return True
        dt = now - last[0]
        margin = self.home.margin_percent / 100
        caps = []
        for i, line in ((0, self.sh.line_up), (1, self.sh.line_down)):
            # WAN received = the line's download; sent = its upload
            wan_d = upnp.wrap_delta(wan[1 - i], last[1][1 - i])
            own_d = own[1 - i] - last[2][1 - i] if own[1 - i] >= last[2][1 - i] else own[1 - i]
            rate = min(max(0, wan_d - own_d) * 8 / dt, line * 1.5)
            prev = self.owner[i]
            self.owner[i] = rate if rate >= prev else prev + (rate - prev) * RELEASE
            cap = line - self.owner[i] - line * margin
            # A full line with the owner on it hides how much more the owner wants (its TCP is
            # squeezed by the buyers'): halve the buyers at once instead of growing by the margin
            # per interval.
            if wan_d * 8 / dt >= line * (1 - margin) and rate >= line * margin / 2:
                cap = min(cap, self.caps[i] * SQUEEZE)
            caps.append(int(cap))
        self.caps = self._bounded(caps)
        self.measured = now
        return True

    def _latency(self) -> bool:
        """Echo rounds for one interval, the caps following after each round."""
        if not self.home.reflectors:
            self._reason = "no reflectors configured"
            return False
        if self._pinger is None:
            try:
                self._pinger = Pinger()
            except OSError as exc:
                self._reason = f"cannot send ICMP echo: {exc.strerror}"
                return False
        est = self._est
        step = min(ROUND, self.home.interval / 4)
        start = self.clock()
        stale = max(STALE_S, 2 * self.home.interval)
        if est.answered is None:
            est.answered = start  # a first chance as long as a later silence gets
        while True:
            t0 = self.clock()
            got = self._pinger.round(self.home.reflectors, timeout=min(1.0, max(step, 0.2)))
            now = self.clock()
            rtts = {h: None if r is None else r * 1000 for h, r in got.items()}
            lines = (self.sh.line_up, self.sh.line_down)
            caps = est.feed(now, rtts, self.caps, lines)
            if not est.baseline or now - est.answered > stale:
                self._reason = (f"no reflector answered{'' if not est.baseline else f' for {now - est.answered:.0f} s'}"
                            f" ({', '.join(self.home.reflectors)})")
                return False
            self.delay_ms = est.delay_ms
            self.caps = self._bounded(caps)
            self.measured = now
            if self.source == "latency":  # (the first round of a switch is applied by tick)
                self._apply()
            if now - start + step > self.home.interval or self._stop.is_set():
                return True
            self._stop.wait(max(0.0, step - (self.clock() - t0)))

    def tick(self) -> str:
        """One measurement and, if the caps moved, one set_caps; returns the source used."""
        src = self.home.source
        used = "none"
        reasons = []  # each source tried and why it gave nothing, set at once (an API reader
        if src in ("auto", "upnp"):  # never sees one source's reason while the next is tried)
            if self._upnp():
                used = "upnp"
            else:
                reasons.append(self._reason)
        if used == "none" and src in ("auto", "latency"):
            if self._latency():
                used = "latency"
            else:
                reasons.append(self._reason)
        if used == "none":
            self.caps = self.base
            self.why = "; ".join(reasons)
        if used != self.source:
            log.info("idle measurement: %s%s", used, "" if used != "none" else f" ({self.why}): configured caps")
            self.source = used
        self._apply()
        return used

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        while not stop.is_set():
            t0 = self.clock()
            try:
                self.tick()
            except Exception:  # a bad measurement must not stop the next ones
                log.exception("idle measurement failed")
            stop.wait(max(0.1, self.home.interval - (self.clock() - t0)))
        if self._pinger:
            self._pinger.close()

    def figures(self) -> dict:
        """What /health (`idle`) and /metrics show: the source in use (or why none), the line, the
        owner's use (upnp: measured; latency: not knowable, its delay instead), the margin kept
        for the owner, the caps in force and how old the last figure is."""
        applied = self.applied or self.base
        src = self.source
        margin = self.home.margin_percent / 100
        age = None if self.measured is None or src == "none" else round(max(0.0, self.clock() - self.measured), 2)
        return {"mode": "node", "source": src, "why": None if src != "none" else self.why,
                "owner_up_mbit": round(self.owner[0] / 1e6, 3) if src == "upnp" else None,
                "owner_down_mbit": round(self.owner[1] / 1e6, 3) if src == "upnp" else None,
                "delay_ms": round(self.delay_ms, 2) if src == "latency" and self.delay_ms is not None else None,
                "threshold_ms": self.home.latency_ms if src == "latency" else None,
                "margin_up_mbit": round(self.sh.line_up * margin / 1e6, 3) if src == "upnp" else None,
                "margin_down_mbit": round(self.sh.line_down * margin / 1e6, 3) if src == "upnp" else None,
                "cap_up_mbit": round(applied[0] / 1e6, 3), "cap_down_mbit": round(applied[1] / 1e6, 3),
                "line_up_mbit": self.sh.line_up / 1e6, "line_down_mbit": self.sh.line_down / 1e6,
                "age_s": age, "interval_s": self.home.interval}


# figures() keys shown in /metrics as idlewire_idle_KEY (absent while None), with their help line
IDLE_METRICS = {
    "line_up_mbit": "the line's upload, Mbit/s", "line_down_mbit": "the line's download, Mbit/s",
    "owner_up_mbit": "the owner's upload from the router's counters, Mbit/s",
    "owner_down_mbit": "the owner's download from the router's counters, Mbit/s",
    "margin_up_mbit": "upload kept free for the owner's next burst, Mbit/s",
    "margin_down_mbit": "download kept free for the owner's next burst, Mbit/s",
    "delay_ms": "latency source: delay above the baseline RTT, ms",
    "threshold_ms": "latency source: the delay that means the line is busy, ms",
    "cap_up_mbit": "the buyers' upload cap in force, Mbit/s",
    "cap_down_mbit": "the buyers' download cap in force, Mbit/s",
    "age_s": "seconds since the source's last figure",
}


class Home:
    """What the agent runs for [home]: the port mapper and, in node mode with shaping, the meter."""

    def __init__(self, cfg, stop: threading.Event, report=None):
        """`report(source, addresses)` (isolation.Guard.report) learns the router's public address."""
        self.cfg, self.stop = cfg, stop
        self.report = report
        self.mapper: upnp.PortMapper | None = None
        self.meter: IdleMeter | None = None
        self.threads: list[threading.Thread] = []
        h = cfg.policy.home
        # "auto": a node in a market whose owner gave no public address ([tunnel] endpoint) maps
        if h.upnp_map is True or (h.upnp_map == "auto" and bool(cfg.marketplace) and not cfg.tunnel.endpoint):
            self.mapper = upnp.PortMapper(cfg.tunnel.port, h.upnp_lease, on_public=self._public)
            self._thread(self.mapper.run, "upnp")

    def _public(self, address: str) -> None:
        if self.report is not None:  # upnp.is_public checked it: a global IP address
            self.report("upnp", [address])

    def _thread(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, args=(self.stop,), daemon=True, name=name)
        t.start()
        self.threads.append(t)

    def endpoint(self) -> tuple[str, int] | None:
        """(public host, port) of the mapping on the home router, None while there is none."""
        ep = self.mapper.endpoint() if self.mapper is not None else ""
        if not ep:
            return None
        host, _, port = ep.rpartition(":")
        return host, int(port)

    def igd(self):
        if self.mapper is not None:
            return self.mapper.igd
        first = not hasattr(self, "_igd")
        if first:
            self._igd = None
            self._igd_tried = 0.0
        now = time.monotonic()
        if self._igd is None and now - self._igd_tried > 60:  # rediscover once a minute at most
            self._igd_tried = now
            if first:  # the first measurement waits for it (upnp is the better source) ...
                self._discover()
            else:  # ... later ones do not: SSDP and NAT-PMP take seconds the latency source needs
                threading.Thread(target=self._discover, daemon=True, name="igd").start()
        return self._igd

    def _discover(self) -> None:
        igd, _ = upnp.discover()
        if igd is not None and upnp.is_public(igd.external_ip):
            self._public(igd.external_ip)
        self._igd = igd

    def start_meter(self, shaping, apply):
        """In node mode, an IdleMeter between the schedule and the shaper; returns what the
        schedule should call (the meter's set_base, or `apply` itself in router mode)."""
        h = self.cfg.policy.home
        if h.mode != "node" or h.source == "off":
            return apply
        self.meter = IdleMeter(h, shaping, apply, self.cfg.interfaces.wan, self.igd)
        self._thread(self.meter.run, "idle")
        return self.meter.set_base

    def close(self, timeout: float = 15) -> None:
        """After stop is set: wait for the mapping's removal."""
        for t in self.threads:
            t.join(timeout)

    def health(self) -> dict:
        out: dict = {"mode": self.cfg.policy.home.mode}
        if self.mapper is not None:
            out["reachability"] = self.mapper.status()
        if self.meter is not None:
            out["idle"] = self.meter.figures()
        elif out["mode"] == "node":  # say why the caps do not follow the owner
            why = ('[home] source = "off"' if self.cfg.policy.home.source == "off"
                   else "[shaping] is off: there is no buyers' cap to lower")
            out["idle"] = {"mode": "node", "source": "none", "why": why}
        return out

    def metrics(self) -> list[tuple[str, str, str, float]]:
        out = []
        if self.mapper is not None:
            out.append(("idlewire_reachable", "gauge", "1 when the WireGuard port is mapped on the home router",
                        int(self.mapper.status()["reachable"])))
        if self.meter is not None:
            f = self.meter.figures()
            out.append(("idlewire_idle_source", "gauge", "Owner measurement in use: 0 none, 1 upnp, 2 latency",
                        {"none": 0, "upnp": 1, "latency": 2}[f["source"]]))
            for k, doc in IDLE_METRICS.items():
                if f[k] is not None:
                    out.append((f"idlewire_idle_{k}", "gauge", f"Node mode: {doc}", f[k]))
        return out
