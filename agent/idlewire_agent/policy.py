"""What the owner sells: caps, schedules, quota, session limits and buyer isolation settings.

Parsed from node.toml sections [shaping], [schedule], [quota] and [firewall]. config.load()
calls parse_sections(); it returns the parsed policy and a list of problems, each naming its key
and what is expected. Rates are in Mbit/s in the file (floats allowed) and bits/s in the model.

    [shaping]
    enabled = true
    wan_interface = "eth0"         # the owner's line
    tunnel_interface = "wg0"       # the buyers' WireGuard interface
    tunnel_port = 51820            # its UDP listen port (classifies tunnel traffic on the WAN)
    tunnel_mtu = 1420
    line_up_mbit = 20              # what the line really carries, measured, a little below sync
    line_down_mbit = 100
    overhead = 18                  # bytes added to each packet's length as the kernel counts it on
                                   # the WAN (Ethernet's 14-byte header is already counted): e.g.
                                   # 18 FCS+VLAN, 24 FCS+preamble+gap, 8 PPPoE, 44 ADSL/ATM
    floor_up_mbit = 1              # guaranteed to buyers even while the owner is busy
    floor_down_mbit = 5
    cap_up_mbit = 10               # the most buyers together may use (their upload)
    cap_down_mbit = 50             # ... and download; a schedule rule may override both
    session_cap_up_mbit = 0        # per session ceiling, 0 = the cap
    session_cap_down_mbit = 0

    [[schedule.rule]]              # first matching rule wins; outside all rules: the caps above
    days = ["mon", "tue", "wed", "thu", "fri"]
    start = "08:00"
    end = "23:00"                  # end < start wraps past midnight
    cap_up_mbit = 5
    cap_down_mbit = 5

    [quota]
    monthly_gb = 500               # up + down; 0 = no quota
    reset_day = 1                  # day of month the quota starts over (29-31: last day if shorter)
    max_sessions = 8

    [firewall]
    table = "idlewire"             # the nftables table (inet family) the firewall role installs
    required = true                # refuse sessions while that table is not loaded
    buyer_nat_ports = "61440-65535"  # masquerade source ports of buyers: an aligned power-of-2 block

    [home]                         # how the node sits in the owner's home (idle.py, upnp.py)
    mode = "node"                  # "node": one NIC on the owner's LAN, the owner's traffic does not
                                   # cross it: measure it; "router": the node is the home router
    source = "auto"                # node mode: "upnp" (router's WAN counters), "latency" (RTT to the
                                   # reflectors), "auto" (upnp, else latency) or "off" (fixed caps)
    interval = 2.0                 # seconds between measurements (0.5-60)
    margin_percent = 10            # of the line, kept free for the owner's next burst
    reflectors = ["1.1.1.1", "9.9.9.9", "8.8.8.8"]   # stable hosts answering ICMP echo (IPv4)
    latency_ms = 15                # delay above the baseline RTT that means "the line is busy"
    upnp_map = "auto"              # map the WireGuard port on the router over UPnP IGD: true, false,
                                   # or "auto" = when [node] marketplace is set
    upnp_lease = 3600              # seconds; renewed at half
"""

from __future__ import annotations

import re
from typing import Any

from .record import Record, field

SECTIONS = ("shaping", "schedule", "quota", "firewall", "home")
SHAPING_STATE_PATH = "/run/idlewire/shaping.json"  # shaping.STATE_PATH (here: no need to import shaping)
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MBIT = 1_000_000
_IFNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$|^24:00$")


class Shaping(Record):
    enabled: bool = False
    wan_interface: str = "eth0"
    tunnel_interface: str = "wg0"
    tunnel_port: int = 51820
    tunnel_mtu: int = 1420
    line_up: int = 20 * MBIT
    line_down: int = 100 * MBIT
    overhead: int = 18
    floor_up: int = 1 * MBIT
    floor_down: int = 5 * MBIT
    cap_up: int = 10 * MBIT
    cap_down: int = 50 * MBIT
    session_cap_up: int = 0
    session_cap_down: int = 0


class Rule(Record):
    days: tuple[int, ...]  # 0 = Monday
    start: int  # minutes after midnight
    end: int  # minutes after midnight; end <= start wraps past midnight
    cap_up: int
    cap_down: int


class Quota(Record):
    monthly_bytes: int = 0  # 0 = no quota
    reset_day: int = 1
    max_sessions: int = 8


class Firewall(Record):
    table: str = "idlewire"
    required: bool = True
    nat_port_low: int = 61440
    nat_port_high: int = 65535

    @property
    def nat_port_mask(self) -> int:
        """The u32 mask that matches exactly the buyer NAT port block."""
        return 0xFFFF & ~(self.nat_port_high - self.nat_port_low)


class Home(Record):
    mode: str = "node"
    source: str = "auto"
    interval: float = 2.0
    margin_percent: float = 10.0
    reflectors: tuple[str, ...] = ("1.1.1.1", "9.9.9.9", "8.8.8.8")
    latency_ms: float = 15.0
    upnp_map: bool | str = "auto"
    upnp_lease: int = 3600


class Policy(Record):
    shaping: Shaping = field(default_factory=Shaping)
    schedule: list[Rule] = field(default_factory=list)
    quota: Quota = field(default_factory=Quota)
    firewall: Firewall = field(default_factory=Firewall)
    home: Home = field(default_factory=Home)


class _Reader:
    """Typed reads of one section; each failure appends 'section.key: expected X, got Y'."""

    def __init__(self, name: str, section: Any, known: set[str], problems: list[str]):
        self.name, self.problems = name, problems
        if not isinstance(section, dict):
            problems.append(f"[{name}]: expected a table, got {section!r}")
            section = {}
        self.section = section
        for key in sorted(set(section) - known):
            problems.append(f"{name}.{key}: unknown key; expected one of {', '.join(sorted(known))}")

    def bad(self, key: str, expect: str) -> None:
        self.problems.append(f"{self.name}.{key}: expected {expect}, got {self.section[key]!r}")

    def get(self, key: str, default, check, expect: str):
        if key not in self.section:
            return default
        value = self.section[key]
        try:
            ok = check(value)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            self.bad(key, expect)
            return default
        return value

    def mbit(self, key: str, default: int, allow_zero: bool = False) -> int:
        expect = "a rate in Mbit/s " + (">= 0 (0 = none)" if allow_zero else "> 0") + " (e.g. 20 or 0.5)"
        v = self.get(key, None, lambda v: _number(v) and (v > 0 or (allow_zero and v == 0)) and v < 100_000,
                     expect)
        return default if v is None else round(v * MBIT)

    def integer(self, key: str, default: int, lo: int, hi: int, expect: str) -> int:
        return self.get(key, default, lambda v: _int(v) and lo <= v <= hi, expect)


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _minutes(text: str) -> int:
    h, m = text.split(":")
    return int(h) * 60 + int(m)


def _shaping(data: Any, problems: list[str]) -> Shaping:
    d = Shaping()
    keys = {"enabled", "wan_interface", "tunnel_interface", "tunnel_port", "tunnel_mtu", "line_up_mbit",
            "line_down_mbit", "overhead", "floor_up_mbit", "floor_down_mbit", "cap_up_mbit", "cap_down_mbit",
            "session_cap_up_mbit", "session_cap_down_mbit"}
    r = _Reader("shaping", data, keys, problems)
    ifname = "an interface name (1-15 letters, digits, _ . - @)"
    s = Shaping(
        enabled=r.get("enabled", d.enabled, lambda v: isinstance(v, bool), "true or false"),
        wan_interface=r.get("wan_interface", d.wan_interface, lambda v: bool(_IFNAME.match(v)), ifname),
        tunnel_interface=r.get("tunnel_interface", d.tunnel_interface, lambda v: bool(_IFNAME.match(v)), ifname),
        tunnel_port=r.integer("tunnel_port", d.tunnel_port, 1, 65535, "a UDP port 1-65535"),
        tunnel_mtu=r.integer("tunnel_mtu", d.tunnel_mtu, 1280, 9000, "an MTU 1280-9000"),
        line_up=r.mbit("line_up_mbit", d.line_up),
        line_down=r.mbit("line_down_mbit", d.line_down),
        overhead=r.integer("overhead", d.overhead, 0, 256,
                           "bytes per packet 0-256 beyond what the kernel counts (e.g. 18 Ethernet FCS+VLAN, 8 PPPoE)"),
        floor_up=r.mbit("floor_up_mbit", d.floor_up, allow_zero=True),
        floor_down=r.mbit("floor_down_mbit", d.floor_down, allow_zero=True),
        cap_up=r.mbit("cap_up_mbit", d.cap_up),
        cap_down=r.mbit("cap_down_mbit", d.cap_down),
        session_cap_up=r.mbit("session_cap_up_mbit", d.session_cap_up, allow_zero=True),
        session_cap_down=r.mbit("session_cap_down_mbit", d.session_cap_down, allow_zero=True),
    )
    if s.wan_interface == s.tunnel_interface and "tunnel_interface" in r.section:
        problems.append(f"shaping.tunnel_interface: expected an interface other than wan_interface, "
                        f"got {s.tunnel_interface!r}")
    for d_, line in (("up", s.line_up), ("down", s.line_down)):
        for what in ("floor", "cap"):
            key = f"{what}_{d_}_mbit"
            if key in r.section and getattr(s, f"{what}_{d_}") > line:
                problems.append(f"shaping.{key}: expected at most line_{d_}_mbit ({line / MBIT:g}), "
                                f"got {r.section[key]!r}")
    return s


def _schedule(data: Any, problems: list[str]) -> list[Rule]:
    r = _Reader("schedule", data, {"rule"}, problems)
    rules = r.section.get("rule", [])
    if not isinstance(rules, list):
        problems.append(f"schedule.rule: expected a list of [[schedule.rule]] tables, got {rules!r}")
        return []
    out = []
    for i, raw in enumerate(rules):
        name = f"schedule.rule[{i}]"
        rr = _Reader(name, raw, {"days", "start", "end", "cap_up_mbit", "cap_down_mbit"}, problems)
        days = rr.get("days", list(DAYS), lambda v: isinstance(v, list) and v and all(d in DAYS for d in v),
                      "a non-empty list of mon tue wed thu fri sat sun")
        hhmm = 'a time "HH:MM" 00:00-24:00'
        start = rr.get("start", None, lambda v: isinstance(v, str) and bool(_HHMM.match(v)), hhmm)
        end = rr.get("end", None, lambda v: isinstance(v, str) and bool(_HHMM.match(v)), hhmm)
        for key in ("start", "end"):
            if key not in rr.section:
                problems.append(f"{name}.{key}: missing; expected {hhmm}")
        cap_up = rr.mbit("cap_up_mbit", 0)
        cap_down = rr.mbit("cap_down_mbit", 0)
        for key in ("cap_up_mbit", "cap_down_mbit"):
            if key not in rr.section:
                problems.append(f"{name}.{key}: missing; expected a rate in Mbit/s > 0")
        if start is not None and end is not None and start == end:
            problems.append(f"{name}.end: expected a time different from start, got {end!r}")
        if start and end and cap_up and cap_down:
            out.append(Rule(tuple(DAYS.index(d) for d in days), _minutes(start), _minutes(end) % 1440,
                            cap_up, cap_down))
    return out


def _quota(data: Any, problems: list[str]) -> Quota:
    d = Quota()
    r = _Reader("quota", data, {"monthly_gb", "reset_day", "max_sessions"}, problems)
    gb = r.get("monthly_gb", 0, lambda v: _number(v) and v >= 0, "a number of GB >= 0 (0 = no quota)")
    return Quota(
        monthly_bytes=round(gb * 1_000_000_000),
        reset_day=r.integer("reset_day", d.reset_day, 1, 31, "a day of the month 1-31"),
        max_sessions=r.integer("max_sessions", d.max_sessions, 1, 3840, "a number of sessions 1-3840"),
    )


def _firewall(data: Any, problems: list[str]) -> Firewall:
    d = Firewall()
    r = _Reader("firewall", data, {"table", "required", "buyer_nat_ports"}, problems)
    fw = Firewall(
        table=r.get("table", d.table, lambda v: isinstance(v, str) and bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v)),
                    "an nftables table name (letters, digits, _)"),
        required=r.get("required", d.required, lambda v: isinstance(v, bool), "true or false"),
    )
    if "buyer_nat_ports" in r.section:
        v = r.section["buyer_nat_ports"]
        m = re.match(r"^(\d+)-(\d+)$", v) if isinstance(v, str) else None
        lo, hi = (int(m[1]), int(m[2])) if m else (0, 0)
        size = hi - lo + 1
        if not m or not (1024 <= lo < hi <= 65535) or size & (size - 1) or lo % size:
            r.bad("buyer_nat_ports", '"LOW-HIGH", a block of 2^n ports starting at a multiple of 2^n '
                  '(e.g. "61440-65535" or "49152-65535")')
        else:
            fw.nat_port_low, fw.nat_port_high = lo, hi
    return fw


def _home(data: Any, problems: list[str]) -> Home:
    d = Home()
    r = _Reader("home", data, set(Home._fields), problems)

    def ipv4(v) -> bool:
        parts = v.split(".") if isinstance(v, str) else []
        return len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts)

    return Home(
        mode=r.get("mode", d.mode, lambda v: v in ("node", "router"), '"node" or "router"'),
        source=r.get("source", d.source, lambda v: v in ("auto", "upnp", "latency", "off"),
                     '"auto", "upnp", "latency" or "off"'),
        interval=float(r.get("interval", d.interval, lambda v: _number(v) and 0.5 <= v <= 60, "seconds 0.5-60")),
        margin_percent=float(r.get("margin_percent", d.margin_percent, lambda v: _number(v) and 0 <= v <= 90,
                                   "a percentage of the line 0-90")),
        reflectors=tuple(r.get("reflectors", d.reflectors,
                               lambda v: isinstance(v, list) and 0 < len(v) <= 8 and all(ipv4(x) for x in v),
                               'a list of 1-8 IPv4 addresses answering ping, e.g. ["1.1.1.1", "9.9.9.9"]')),
        latency_ms=float(r.get("latency_ms", d.latency_ms, lambda v: _number(v) and 1 <= v <= 1000,
                               "milliseconds 1-1000")),
        upnp_map=r.get("upnp_map", d.upnp_map, lambda v: isinstance(v, bool) or v == "auto",
                       'true, false or "auto"'),
        upnp_lease=r.integer("upnp_lease", d.upnp_lease, 120, 604800, "seconds 120-604800"),
    )


def parse_sections(data: dict[str, Any]) -> tuple[Policy, list[str]]:
    """Validate the policy sections of a node.toml mapping: (policy, problems naming each key)."""
    problems: list[str] = []
    pol = Policy(
        shaping=_shaping(data.get("shaping", {}), problems),
        schedule=_schedule(data.get("schedule", {}), problems),
        quota=_quota(data.get("quota", {}), problems),
        firewall=_firewall(data.get("firewall", {}), problems),
        home=_home(data.get("home", {}), problems),
    )
    return pol, problems
