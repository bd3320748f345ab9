"""What the owner sells: caps, schedules, quota, session limits and buyer isolation settings.

Parsed from node.toml sections [shaping], [schedule], [quota] and [firewall], each key checked
by its entry in schema.NODE (its type, bounds, default and doc line live there). config.load()
calls parse_sections(); it returns the parsed policy and a list of problems, each naming its key
and what is expected. Rates are in Mbit/s in the file (floats allowed) and bits/s in the model.
The shaper's interfaces and port are [interfaces] wan, [tunnel] interface and port, and the session
limit is [sessions] max: one key per fact (the old [shaping] wan_interface, tunnel_interface,
tunnel_port and [quota] max_sessions still read, with a deprecation line, see schema.MOVED).

    [shaping]
    enabled = true
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

    [firewall]
    table = "idlewire"             # the nftables table (inet family) the firewall role installs
    required = true                # refuse sessions while that table is not loaded
    buyer_nat_ports = "61440-65535"  # masquerade source ports of buyers: an aligned power-of-2 block
    public_addresses = ["203.0.113.7"]  # the node's public address(es) as the internet sees them
                                   # (behind a home router: the router's); blocked for buyers, like
                                   # the WAN gateway(s), which the agent learns from the routes

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
                                   # or "auto" = when [node] marketplace is set, [tunnel] endpoint not
    upnp_lease = 3600              # seconds; renewed at half
"""

from __future__ import annotations

from typing import Any

from . import schema
from .record import Record, field

SECTIONS = ("shaping", "schedule", "quota", "firewall", "home")
SHAPING_STATE_PATH = "/run/idlewire/shaping.json"  # shaping.STATE_PATH (here: no need to import shaping)
DAYS = schema.DAYS
MBIT = schema.MBIT


def _d(section: str, key: str):
    return schema.NODE[section][key].default


class Shaping(Record):
    enabled: bool = _d("shaping", "enabled")
    wan_interface: str = _d("interfaces", "wan")  # [interfaces] wan: config.parse sets it
    tunnel_interface: str = _d("tunnel", "interface")  # [tunnel] interface
    tunnel_port: int = _d("tunnel", "port")  # [tunnel] port
    tunnel_mtu: int = _d("shaping", "tunnel_mtu")
    line_up: int = _d("shaping", "line_up_mbit") * MBIT
    line_down: int = _d("shaping", "line_down_mbit") * MBIT
    overhead: int = _d("shaping", "overhead")
    floor_up: int = _d("shaping", "floor_up_mbit") * MBIT
    floor_down: int = _d("shaping", "floor_down_mbit") * MBIT
    cap_up: int = _d("shaping", "cap_up_mbit") * MBIT
    cap_down: int = _d("shaping", "cap_down_mbit") * MBIT
    session_cap_up: int = _d("shaping", "session_cap_up_mbit") * MBIT
    session_cap_down: int = _d("shaping", "session_cap_down_mbit") * MBIT


class Rule(Record):
    days: tuple[int, ...]  # 0 = Monday
    start: int  # minutes after midnight
    end: int  # minutes after midnight; end <= start wraps past midnight
    cap_up: int
    cap_down: int


class Quota(Record):
    monthly_bytes: int = _d("quota", "monthly_gb") * 1_000_000_000  # 0 = no quota
    reset_day: int = _d("quota", "reset_day")
    max_sessions: int = _d("sessions", "max")  # [sessions] max: config.parse sets it


class Firewall(Record):
    table: str = _d("firewall", "table")
    required: bool = _d("firewall", "required")
    nat_port_low: int = int(_d("firewall", "buyer_nat_ports").split("-")[0])
    nat_port_high: int = int(_d("firewall", "buyer_nat_ports").split("-")[1])
    # The node's public address(es) (behind a home router: the router's), blocked for buyers with
    # the learned WAN gateway(s) in the agent's table inet <table>_learned (isolation.py).
    public_addresses: list[str] = field(default_factory=list)

    @property
    def nat_port_mask(self) -> int:
        """The u32 mask that matches exactly the buyer NAT port block."""
        return 0xFFFF & ~(self.nat_port_high - self.nat_port_low)


class Home(Record):
    mode: str = _d("home", "mode")
    wan: str = _d("home", "wan")
    source: str = _d("home", "source")
    interval: float = float(_d("home", "interval"))
    margin_percent: float = float(_d("home", "margin_percent"))
    reflectors: tuple[str, ...] = tuple(_d("home", "reflectors"))
    latency_ms: float = float(_d("home", "latency_ms"))
    upnp_map: bool | str = _d("home", "upnp_map")
    upnp_lease: int = _d("home", "upnp_lease")


class Policy(Record):
    shaping: Shaping = field(default_factory=Shaping)
    schedule: list[Rule] = field(default_factory=list)
    quota: Quota = field(default_factory=Quota)
    firewall: Firewall = field(default_factory=Firewall)
    home: Home = field(default_factory=Home)


def _minutes(text: str) -> int:
    h, m = text.split(":")
    return int(h) * 60 + int(m)


def _bits(mbit) -> int:
    return round(mbit * MBIT)


def _shaping(data: Any, problems: list[str]) -> Shaping:
    keys = schema.NODE["shaping"]
    v = schema.check_table(keys, data, "shaping.", problems)
    s = Shaping()
    for name, value in v.items():
        if name.endswith("_mbit"):
            setattr(s, name.removesuffix("_mbit"), _bits(value))
        else:
            setattr(s, name, value)
    for d_, line in (("up", s.line_up), ("down", s.line_down)):
        for what in ("floor", "cap"):
            key = f"{what}_{d_}_mbit"
            if key in v and getattr(s, f"{what}_{d_}") > line:
                problems.append(f"shaping.{key}: expected at most line_{d_}_mbit ({line / MBIT:g}), "
                                f"got {data[key]!r}")
    return s


def _schedule(data: Any, problems: list[str]) -> list[Rule]:
    if not isinstance(data, dict):
        problems.append(f"schedule: expected a table, got {schema.shown(data)}")
        return []
    for k in sorted(set(data) - {"rule"}, key=str):
        problems.append(f"schedule.{k}: unknown key; expected one of rule")
    rules = data.get("rule", [])
    if not isinstance(rules, list):
        problems.append(f"schedule.rule: expected a list of [[schedule.rule]] tables, got {rules!r}")
        return []
    out = []
    for i, raw in enumerate(rules):
        name = f"schedule.rule[{i}]"
        v = schema.check_table(schema.RULE, raw, f"{name}.", problems)
        raw = raw if isinstance(raw, dict) else {}
        for key in ("start", "end", "cap_up_mbit", "cap_down_mbit"):
            if key not in raw:
                problems.append(f"{name}.{key}: missing; expected {schema.RULE[key].expect}")
        start, end = v.get("start"), v.get("end")
        if start is not None and end is not None and start == end:
            problems.append(f"{name}.end: expected a time different from start, got {end!r}")
        if start and end and "cap_up_mbit" in v and "cap_down_mbit" in v:
            days = v.get("days", list(DAYS))
            out.append(Rule(tuple(DAYS.index(d) for d in days), _minutes(start), _minutes(end) % 1440,
                            _bits(v["cap_up_mbit"]), _bits(v["cap_down_mbit"])))
    return out


def _quota(data: Any, problems: list[str]) -> Quota:
    v = schema.check_table(schema.NODE["quota"], data, "quota.", problems)
    q = Quota()
    q.monthly_bytes = round(v.get("monthly_gb", 0) * 1_000_000_000)
    q.reset_day = v.get("reset_day", q.reset_day)
    return q


def _firewall(data: Any, problems: list[str]) -> Firewall:
    v = schema.check_table(schema.NODE["firewall"], data, "firewall.", problems)
    fw = Firewall(table=v.get("table", Firewall.table), required=v.get("required", Firewall.required),
                  public_addresses=v.get("public_addresses", []))
    if "buyer_nat_ports" in v:
        fw.nat_port_low, fw.nat_port_high = (int(x) for x in v["buyer_nat_ports"].split("-"))
    return fw


def _home(data: Any, problems: list[str]) -> Home:
    v = schema.check_table(schema.NODE["home"], data, "home.", problems)
    h = Home()
    for name, value in v.items():
        if name == "reflectors":
            value = tuple(value)
        elif name in ("interval", "margin_percent", "latency_ms"):
            value = float(value)
        setattr(h, name, value)
    return h


def parse_sections(data: dict[str, Any]) -> tuple[Policy, list[str]]:
    """Validate the policy sections of a node.toml mapping (schema.NODE): (policy, problems naming
    each key). The shaper's interfaces and port and the quota keeper's session limit are not read
    here: config.parse sets them from [interfaces], [tunnel] and [sessions], their one owner."""
    problems: list[str] = []
    pol = Policy(
        shaping=_shaping(data.get("shaping", {}), problems),
        schedule=_schedule(data.get("schedule", {}), problems),
        quota=_quota(data.get("quota", {}), problems),
        firewall=_firewall(data.get("firewall", {}), problems),
        home=_home(data.get("home", {}), problems),
    )
    return pol, problems
