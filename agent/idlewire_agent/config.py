"""/etc/idlewire/node.toml: loading and validation. Every error names its key and what is expected.

Sections (all optional; defaults in the records below):

    [node]        region, price_per_gb, log_level, state_dir, key_file, marketplace, unit_file
    [interfaces]  wan, lan, management (interface names)
    [tunnel]      interface, port, pool, endpoint, private_key_file
    [metering]    poll_interval, line_rate_mbit, unpaid_cap_mb, tolerance_percent
    [sessions]    max, expiry, idle_timeout, max_per_buyer, handshake_timeout, unpaid_backoff,
                  unpaid_backoff_max, address_rest
    [api]         listen, port, admin_token_file, max_body, max_connections, max_per_source,
                  request_deadline
    [receipts]    keep_closed, keep_days
    [shaping] [schedule] [quota] [firewall]   see policy.py

and the unit's own settings, /etc/idlewire/unit.toml ([node] unit_file), written at first boot
from the stamp `idlewire stamp` put on the boot partition (roles/base idlewire-stamp):

    unit = "shop-0001"             # the vendor's id for this unit
    hostname = "iw-0001"
    node_public_key = "…"          # base64 ed25519 public key of node.key
    payout_address = "bc1q…"       # where the owner is paid (reported, signed, in /health)
    [caps]                         # the unit's limits; each replaces node.toml's value
    up_mbit = 10                   #   shaping.cap_up_mbit   (also bounds schedule rules)
    down_mbit = 50                 #   shaping.cap_down_mbit (also bounds schedule rules)
    monthly_gb = 500               #   quota.monthly_gb
    max_sessions = 8               #   quota.max_sessions

A unit file that is absent is fine (a node provisioned live has none); one with a bad value is
an error naming the unit file and the key, like node.toml's. A cap above the line rate is
lowered to it, with a note.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib

from . import policy
from .record import Record, field


class ConfigError(Exception):
    """A list of problems in a config file, each naming the key."""

    def __init__(self, path: str, problems: list[str]):
        super().__init__("\n".join(f"{path}: {p}" for p in problems))
        self.problems = problems


class ApiConfig(Record):
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    port: int = 8740
    admin_token_file: str = "/etc/idlewire/admin.token"  # noqa: S105 (a path, not a secret)
    max_body: int = 16384
    # Under load (api.py): connections open at once, in total and from one address (IPv6: one /64),
    # both lowered at start to stay within half the file limit (LimitNOFILE, procd `limits nofile`);
    # and the seconds a client has to send a WHOLE request, head and body (an idle keep-alive too).
    max_connections: int = 128
    max_per_source: int = 16
    request_deadline: float = 10.0


class InterfacesConfig(Record):
    wan: str = "eth0"
    lan: str = ""
    management: str = ""


class TunnelConfig(Record):
    interface: str = "iw0"
    port: int = 51820
    pool: str = "10.99.0.0/16"
    endpoint: str = ""  # host buyers connect to; "" = the host of the API URL they used
    private_key_file: str = "/etc/idlewire/wg.key"

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.pool, strict=False)


class MeteringConfig(Record):
    poll_interval: float = 5.0
    line_rate_mbit: float = 1000.0
    unpaid_cap_mb: float = 50.0
    tolerance_percent: float = 2.0

    @property
    def line_rate_bytes(self) -> float:
        return self.line_rate_mbit * 1_000_000 / 8

    @property
    def unpaid_cap_bytes(self) -> int:
        return int(self.unpaid_cap_mb * 1_000_000)


class SessionsConfig(Record):
    max: int = 50
    expiry: int = 86400
    idle_timeout: int = 900
    # Fair admission and address reuse (issue 14).
    # Open sessions one buyer key may hold at once: one key cannot take every slot.
    max_per_buyer: int = 4
    # Seconds a session has to complete its WireGuard handshake; a session opened and never
    # connected is closed (reason no_handshake) and its slot freed.
    handshake_timeout: int = 30
    # Seconds a key closed for unpaid usage waits before its next session; doubled for each further
    # unpaid close within unpaid_backoff_max seconds after the previous wait, up to unpaid_backoff_max
    # (a key without unpaid closes for that long starts over). 0 = no back-off.
    unpaid_backoff: int = 60
    unpaid_backoff_max: int = 86400
    # Seconds a closed session's tunnel address rests before another buyer gets it: longer than the
    # conntrack timeouts of flows that may still arrive (UDP stream 120-180 s, TCP TIME_WAIT 120 s).
    address_rest: int = 600


UNIT_FILE = "/etc/idlewire/unit.toml"
UNIT_KEYS = ("unit", "hostname", "node_public_key", "payout_address", "caps")
UNIT_CAPS = ("up_mbit", "down_mbit", "monthly_gb", "max_sessions")


class UnitConfig(Record):
    """The unit's stamped identity and caps (unit.toml); `present` False when there is none."""

    path: str = ""
    present: bool = False
    unit: str = ""
    hostname: str = ""
    node_public_key: str = ""
    payout_address: str = ""
    caps: dict[str, float | int] = field(default_factory=dict)  # as stamped
    notes: list[str] = field(default_factory=list)  # what the caps changed, one line each


class ReceiptsConfig(Record):
    """Retention. Open sessions keep every receipt. A closed one keeps its last `keep_closed` (the
    closing receipt included) behind a node-signed checkpoint that stands for the ones before, and
    all of them go `keep_days` after the close. 0 = keep (all of them / for ever)."""

    keep_closed: int = 100
    keep_days: float = 90.0


class NodeConfig(Record):
    region: str = "unset"
    price_per_gb: float = 0.0
    log_level: str = "info"
    state_dir: str = "/var/lib/idlewire-agent"
    key_file: str = "/etc/idlewire/node.key"
    marketplace: str = ""
    unit_file: str = UNIT_FILE
    interfaces: InterfacesConfig = field(default_factory=InterfacesConfig)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    metering: MeteringConfig = field(default_factory=MeteringConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    receipts: ReceiptsConfig = field(default_factory=ReceiptsConfig)
    policy: policy.Policy = field(default_factory=policy.Policy)
    unit: UnitConfig = field(default_factory=lambda: UnitConfig())


_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_OWN_SECTIONS = ("node", "interfaces", "tunnel", "metering", "sessions", "api", "receipts")


def _ifname(v: str) -> bool:
    return bool(_IFNAME.match(v)) and v not in (".", "..")


def _abs(v: str) -> bool:
    return v.startswith("/")


def _pool(v: str) -> bool:
    try:
        net = ipaddress.ip_network(v, strict=False)
    except ValueError:
        return False
    return net.num_addresses >= 4 and net.prefixlen <= (30 if net.version == 4 else 126)


def _addresses(v) -> bool:
    try:
        return bool(v) and all(isinstance(a, str) and ipaddress.ip_address(a) for a in v)
    except ValueError:
        return False


def _url(v: str) -> bool:
    return v == "" or bool(re.match(r"^https?://[^\s/]+(/\S*)?$", v))


def _host(v: str) -> bool:
    return v == "" or bool(re.match(r"^[A-Za-z0-9.:\[\]-]{1,253}$", v))


def parse(data: dict, path: str = "node.toml") -> NodeConfig:
    """Validate a parsed node.toml mapping; raise ConfigError listing every problem."""
    problems: list[str] = []
    known = {*_OWN_SECTIONS, *policy.SECTIONS}
    for key in sorted(set(data) - known):
        problems.append(f"[{key}]: unknown section; expected one of {', '.join(sorted(known))}")
    cfg = NodeConfig()
    cfg.policy, policy_problems = policy.parse_sections(data)
    problems += policy_problems

    sections: dict[str, dict] = {}
    for name in _OWN_SECTIONS:
        sec = data.get(name, {})
        if not isinstance(sec, dict):
            problems.append(f"{name}: expected a [{name}] table, got {sec!r}")
            sec = {}
        sections[name] = sec

    def take(name: str, key: str, kind: type | tuple, default, check=None, expect=""):
        sec = sections[name]
        if key not in sec:
            return default
        value = sec[key]
        bad_bool = isinstance(value, bool) and kind is not bool
        if bad_bool or not isinstance(value, kind) or (check and not check(value)):
            problems.append(f"{name}.{key}: expected {expect}, got {value!r}")
            return default
        return value

    num = (int, float)
    allowed: dict[str, set[str]] = {}

    def section(name: str, obj, spec: list[tuple]):
        allowed[name] = {s[0] for s in spec}
        for key, kind, check, expect in spec:
            value = take(name, key, kind, getattr(obj, key), check, expect)
            if kind == num:
                value = float(value)
            setattr(obj, key, value)

    section("node", cfg, [
        ("region", str, lambda v: bool(re.match(r"^[A-Za-z0-9_.-]{1,64}$", v)),
         "a region name (letters, digits, _ . -)"),
        ("price_per_gb", num, lambda v: 0 <= v < 1e6, "a number >= 0"),
        ("log_level", str, lambda v: v in ("debug", "info", "warning", "error"),
         "one of debug, info, warning, error"),
        ("state_dir", str, _abs, "an absolute path"),
        ("key_file", str, _abs, "an absolute path"),
        ("marketplace", str, _url, 'an http(s):// URL or ""'),
        ("unit_file", str, _abs, "an absolute path"),
    ])
    section("interfaces", cfg.interfaces, [
        ("wan", str, _ifname, "an interface name (1-15 characters)"),
        ("lan", str, lambda v: v == "" or _ifname(v), 'an interface name or ""'),
        ("management", str, lambda v: v == "" or _ifname(v), 'an interface name or ""'),
    ])
    section("tunnel", cfg.tunnel, [
        ("interface", str, _ifname, "an interface name (1-15 characters)"),
        ("port", int, lambda v: 0 < v < 65536, "a UDP port 1-65535"),
        ("pool", str, _pool, 'an IP network with room for sessions, e.g. "10.99.0.0/16"'),
        ("endpoint", str, _host, 'a host name or address buyers reach the node at, or ""'),
        ("private_key_file", str, _abs, "an absolute path"),
    ])
    section("metering", cfg.metering, [
        ("poll_interval", num, lambda v: 0.2 <= v <= 300, "seconds between 0.2 and 300"),
        ("line_rate_mbit", num, lambda v: 0 < v <= 1e6, "the line rate in Mbit/s (> 0)"),
        ("unpaid_cap_mb", num, lambda v: 0 <= v <= 1e7, "megabytes >= 0"),
        ("tolerance_percent", num, lambda v: 0 <= v <= 50, "a percentage between 0 and 50"),
    ])
    section("sessions", cfg.sessions, [
        ("max", int, lambda v: 1 <= v <= 65535, "an integer 1-65535"),
        ("expiry", int, lambda v: 60 <= v <= 366 * 86400, "seconds between 60 and 31622400"),
        ("idle_timeout", int, lambda v: 10 <= v <= 366 * 86400, "seconds between 10 and 31622400"),
        ("max_per_buyer", int, lambda v: 1 <= v <= 65535, "an integer 1-65535 (sessions one buyer key may hold)"),
        ("handshake_timeout", int, lambda v: 5 <= v <= 3600, "seconds between 5 and 3600"),
        ("unpaid_backoff", int, lambda v: 0 <= v <= 366 * 86400, "seconds >= 0 (0 = no back-off)"),
        ("unpaid_backoff_max", int, lambda v: 1 <= v <= 366 * 86400, "seconds between 1 and 31622400"),
        ("address_rest", int, lambda v: 0 <= v <= 86400, "seconds between 0 and 86400"),
    ])
    section("api", cfg.api, [
        ("listen", list, _addresses, "a non-empty list of IP addresses (management/LAN only)"),
        ("port", int, lambda v: 0 < v < 65536, "a TCP port 1-65535"),
        ("admin_token_file", str, _abs, "an absolute path"),
        ("max_body", int, lambda v: 256 <= v <= 1 << 20, "bytes between 256 and 1048576"),
        ("max_connections", int, lambda v: 8 <= v <= 65535, "an integer 8-65535"),
        ("max_per_source", int, lambda v: 1 <= v <= 65535, "an integer 1-65535"),
        ("request_deadline", num, lambda v: 1 <= v <= 300, "seconds between 1 and 300"),
    ])
    section("receipts", cfg.receipts, [
        ("keep_closed", int, lambda v: 0 <= v <= 10_000_000,
         "an integer >= 0 (receipts kept per closed session; 0 = all)"),
        ("keep_days", num, lambda v: 0 <= v <= 36600, "a number of days >= 0 (0 = for ever)"),
    ])
    cfg.price_per_gb = float(cfg.price_per_gb)
    for name in _OWN_SECTIONS:
        for key in sorted(set(sections[name]) - allowed[name]):
            problems.append(f"{name}.{key}: unknown key; expected one of {', '.join(sorted(allowed[name]))}")
    for a in cfg.api.listen if isinstance(cfg.api.listen, list) else []:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if ip.is_unspecified:
            problems.append(f"api.listen: expected management/LAN addresses, got {a!r} (listens on WAN and "
                            "tunnel too)")
        elif _pool(cfg.tunnel.pool) and ip in cfg.tunnel.network:
            problems.append(f"api.listen: expected management/LAN addresses, got {a!r} (inside tunnel.pool)")
    if problems:
        raise ConfigError(path, problems)
    return cfg


_PAYOUT = re.compile(r"^[A-Za-z0-9:._@+-]{4,128}$")  # as `idlewire stamp` accepts it
_B64KEY = re.compile(r"^[A-Za-z0-9+/]{43}=$")
_UNIT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def parse_unit(data: dict, path: str = UNIT_FILE) -> tuple[UnitConfig, list[str]]:
    """Validate a parsed unit.toml mapping: (unit settings, problems naming each key)."""
    problems: list[str] = []
    u = UnitConfig(path=path, present=True)
    for key in sorted(set(data) - set(UNIT_KEYS)):
        problems.append(f"{key}: unknown key; expected one of {', '.join(UNIT_KEYS)}")
    for key, pattern, expect in (
            ("unit", _UNIT_ID, "a unit id (letters, digits, _ . -, up to 64)"),
            ("hostname", _HOSTNAME, "a host name (letters, digits, -)"),
            ("node_public_key", _B64KEY, "the base64 ed25519 public key of node.key (44 characters)"),
            ("payout_address", _PAYOUT, "4-128 characters of letters, digits and ':._@+-'")):
        if key not in data:
            continue
        v = data[key]
        if not isinstance(v, str) or not pattern.match(v):
            problems.append(f"{key}: expected {expect}, got {v!r}")
        else:
            setattr(u, key, v)
    caps = data.get("caps", {})
    if not isinstance(caps, dict):
        problems.append(f"caps: expected a [caps] table with {', '.join(UNIT_CAPS)}, got {caps!r}")
        caps = {}
    for key in sorted(set(caps) - set(UNIT_CAPS)):
        problems.append(f"caps.{key}: unknown cap; expected one of {', '.join(UNIT_CAPS)}")
    checks = {
        "up_mbit": (lambda v: _num(v) and 0 < v < 100_000, "a rate in Mbit/s > 0 (e.g. 20 or 0.5)"),
        "down_mbit": (lambda v: _num(v) and 0 < v < 100_000, "a rate in Mbit/s > 0 (e.g. 20 or 0.5)"),
        "monthly_gb": (lambda v: _num(v) and v >= 0, "a number of GB >= 0 (0 = no quota)"),
        "max_sessions": (lambda v: _int(v) and 1 <= v <= 3840, "a number of sessions 1-3840"),
    }
    for key in UNIT_CAPS:
        if key in caps:
            ok, expect = checks[key]
            if ok(caps[key]):
                u.caps[key] = caps[key]
            else:
                problems.append(f"caps.{key}: expected {expect}, got {caps[key]!r}")
    return u, problems


def _num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def apply_unit(cfg: NodeConfig, unit: UnitConfig) -> None:
    """The unit's caps replace node.toml's (a cap above the line is lowered to it); notes say what."""
    cfg.unit = unit
    sh, quota = cfg.policy.shaping, cfg.policy.quota
    for d in ("up", "down"):
        key = f"{d}_mbit"
        if key not in unit.caps:
            continue
        want = round(unit.caps[key] * policy.MBIT)
        line = getattr(sh, f"line_{d}")
        cap = min(want, line)
        unit.notes.append(f"caps.{key} = {unit.caps[key]:g} replaces shaping.cap_{d}_mbit "
                          f"({getattr(sh, f'cap_{d}') / policy.MBIT:g})"
                          + (f"; lowered to shaping.line_{d}_mbit ({line / policy.MBIT:g}), the line's rate"
                             if cap < want else ""))
        setattr(sh, f"cap_{d}", cap)
        for i, r in enumerate(cfg.policy.schedule):  # a rule may lower the cap, never raise it
            if getattr(r, f"cap_{d}") > cap:
                unit.notes.append(f"caps.{key} bounds schedule.rule[{i}].cap_{d}_mbit "
                                  f"({getattr(r, f'cap_{d}') / policy.MBIT:g})")
                setattr(r, f"cap_{d}", cap)
    if "monthly_gb" in unit.caps:
        unit.notes.append(f"caps.monthly_gb = {unit.caps['monthly_gb']:g} replaces quota.monthly_gb "
                          f"({quota.monthly_bytes / 1e9:g})")
        quota.monthly_bytes = round(unit.caps["monthly_gb"] * 1_000_000_000)
    if "max_sessions" in unit.caps:
        unit.notes.append(f"caps.max_sessions = {unit.caps['max_sessions']} replaces quota.max_sessions "
                          f"({quota.max_sessions})")
        quota.max_sessions = int(unit.caps["max_sessions"])


def _read_toml(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, ["no such file"]) from None
    except PermissionError:
        raise ConfigError(path, ["permission denied; run as root or fix the file's mode"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror}; expected a {what} file"]) from None


def load(path: str | os.PathLike, unit_file: str | os.PathLike | None = None) -> NodeConfig:
    """node.toml, then the unit file it names (or `unit_file`), whose caps win when it exists."""
    path = os.fspath(path)
    cfg = parse(_read_toml(path, "node.toml"), path)
    upath = os.fspath(unit_file) if unit_file is not None else cfg.unit_file
    if unit_file is None and not os.path.lexists(upath):
        return cfg  # not a stamped unit (provisioned live): node.toml alone
    unit, problems = parse_unit(_read_toml(upath, "unit.toml"), upath)
    if problems:
        raise ConfigError(upath, problems)
    apply_unit(cfg, unit)
    return cfg
