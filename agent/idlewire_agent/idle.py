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
* **latency** — when the router offers no counters: the cake-autorate idea. RTT to stable
  reflectors (`[home] reflectors`, ICMP echo, the median of 3 per interval so one burst is not
  load), a baseline that follows a lower RTT at once and a
  higher one only slowly; when the delay above baseline exceeds `latency_ms`, the line is
  congested and the cap backs off (x0.7 per interval, down to the floor); while the delay stays
  below half of it (after 2 such intervals in a row) the cap probes up by 5 % of the line per
  interval. ICMP echo cannot tell
  which direction is congested: both caps back off together.
* **none** — `source = "off"`, or nothing works (no IGD counters, no reflector answers): the
  configured caps, and `/health` says why.

`IdleMeter.figures()` is what /health (`idle`) and /metrics (`idlewire_idle_*`) report.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time

from . import upnp

log = logging.getLogger("idlewire.idle")

BACKOFF = 0.7  # latency source: the cap is multiplied by this per congested interval
PROBE_STEP = 0.05  # ... and grows by this share of the line per calm interval
CALM = 2  # ... once this many calm intervals followed the last congested one
BASELINE_UP = 0.01  # a higher RTT moves the baseline by this share of the difference per sample
PROBES = 3  # latency source: echoes per reflector per interval; their median counts (one burst is not load)
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

    def rtt(self, host: str, timeout: float = 1.0) -> float | None:
        """Round-trip time to `host` in seconds, None when no answer came in `timeout`."""
        self.seq = (self.seq + 1) & 0xFFFF
        payload = b"idlewire" + struct.pack("!d", time.monotonic())
        head = struct.pack("!BBHHH", 8, 0, 0, self.ident, self.seq)
        head = struct.pack("!BBHHH", 8, 0, self._checksum(head + payload), self.ident, self.seq)
        t0 = time.monotonic()
        try:
            self.sock.sendto(head + payload, (host, 0))
        except OSError:
            return None
        deadline = t0 + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, addr = self.sock.recvfrom(2048)
            except (TimeoutError, OSError):
                return None
            if self.raw:
                data = data[(data[0] & 0x0F) * 4:]
            if len(data) < 8 or data[0] != 0 or addr[0] != host:
                continue
            _, _, _, ident, seq = struct.unpack("!BBHHH", data[:8])
            if seq == self.seq and (ident == self.ident or not self.raw):
                return time.monotonic() - t0

    def close(self) -> None:
        self.sock.close()


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
        self.owner = [0.0, 0.0]  # up, down, bit/s (smoothed)
        self.delay_ms: float | None = None
        self.baseline: dict[str, float] = {}
        self._last: tuple[float, tuple[int, int], tuple[int, int]] | None = None
        self._pinger: Pinger | None = None
        self._calm = CALM + 1  # latency source: calm intervals in a row
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
            self.why = "no UPnP IGD on the LAN"
            return False
        try:
            own0 = iface_bytes(self.wan)
            wan = igd.counters()
            own1 = iface_bytes(self.wan)
        except OSError as exc:
            self.why = f"cannot read this node's counters on {self.wan}: {exc.strerror}"
            return False
        if wan is None:
            self.why = "the router's IGD does not report its WAN byte counters"
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
        return True

    def _latency(self) -> bool:
        if not self.home.reflectors:
            self.why = "no reflectors configured"
            return False
        if self._pinger is None:
            try:
                self._pinger = Pinger()
            except OSError as exc:
                self.why = f"cannot send ICMP echo: {exc.strerror}"
                return False
        delays = []
        rtts: dict[str, list[float]] = {}
        for k in range(PROBES):
            if k:
                time.sleep(self.home.interval / (PROBES + 1))
            for host in self.home.reflectors:
                rtt = self._pinger.rtt(host, timeout=min(1.0, self.home.interval / 2))
                rtts.setdefault(host, []).append(1e9 if rtt is None else rtt * 1000)  # a loss is late
        for host, ms_list in rtts.items():
            if min(ms_list) >= 1e9:
                continue
            ms_list.sort()
            base = self.baseline.get(host, ms_list[0])
            base = ms_list[0] if ms_list[0] < base else base + (ms_list[0] - base) * BASELINE_UP
            self.baseline[host] = base
            delays.append(min(ms_list[len(ms_list) // 2] - base, 10_000.0))
        if not delays:
            self.why = f"no reflector answered ({', '.join(self.home.reflectors)})"
            return False
        delays.sort()
        self.delay_ms = delays[len(delays) // 2]
        lines = (self.sh.line_up, self.sh.line_down)
        if self.delay_ms > self.home.latency_ms:
            self._calm = 0
            self.caps = tuple(int(c * BACKOFF) for c in self.caps)  # type: ignore[assignment]
        elif self.delay_ms < self.home.latency_ms / 2:
            self._calm += 1
            if self._calm > CALM:  # after a back-off the queue drains at once: that is not room yet
                self.caps = tuple(int(c + line * PROBE_STEP)  # type: ignore[assignment]
                                  for c, line in zip(self.caps, lines, strict=True))
        self.caps = self._bounded(self.caps)
        return True

    def tick(self) -> str:
        """One measurement and, if the caps moved, one set_caps; returns the source used."""
        src = self.home.source
        used = "none"
        if src in ("auto", "upnp") and self._upnp():
            used = "upnp"
        elif src in ("auto", "latency") and self._latency():
            used = "latency"
        if used == "none":
            self.caps = self.base
        if used != self.source:
            log.info("idle measurement: %s%s", used, "" if used != "none" else f" ({self.why}): configured caps")
            self.source = used
        self._apply()
        return used

    def run(self, stop: threading.Event) -> None:
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
        applied = self.applied or self.base
        return {"mode": "node", "source": self.source, "why": None if self.source != "none" else self.why,
                "owner_up_mbit": round(self.owner[0] / 1e6, 3) if self.source == "upnp" else None,
                "owner_down_mbit": round(self.owner[1] / 1e6, 3) if self.source == "upnp" else None,
                "delay_ms": round(self.delay_ms, 2) if self.source == "latency" and self.delay_ms is not None
                else None,
                "cap_up_mbit": round(applied[0] / 1e6, 3), "cap_down_mbit": round(applied[1] / 1e6, 3),
                "line_up_mbit": self.sh.line_up / 1e6, "line_down_mbit": self.sh.line_down / 1e6}


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
        if not hasattr(self, "_igd"):
            self._igd = None
            self._igd_tried = 0.0
        now = time.monotonic()
        if self._igd is None and now - self._igd_tried > 60:  # rediscover once a minute at most
            self._igd_tried = now
            self._igd, _ = upnp.discover()
            if self._igd is not None and upnp.is_public(self._igd.external_ip):
                self._public(self._igd.external_ip)
        return self._igd

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
            for k in ("owner_up_mbit", "owner_down_mbit", "delay_ms", "cap_up_mbit", "cap_down_mbit"):
                if f[k] is not None:
                    out.append((f"idlewire_idle_{k}", "gauge", f"Node mode: {k.replace('_', ' ')}", f[k]))
        return out
