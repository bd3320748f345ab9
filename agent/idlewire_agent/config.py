"""/etc/idlewire/node.toml: loading and validation. Every error names its key and what is expected.

Sections (all optional; defaults in the records below):

    [node]        region, price_per_gb, log_level, state_dir, key_file, marketplace
    [interfaces]  wan, lan, management (interface names)
    [tunnel]      interface, port, pool, endpoint, private_key_file
    [metering]    poll_interval, line_rate_mbit, unpaid_cap_mb, tolerance_percent
    [sessions]    max, expiry, idle_timeout
    [api]         listen, port, admin_token_file, max_body
    [receipts]    keep_closed, keep_days
    [shaping] [schedule] [quota] [firewall]   see policy.py
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
    interfaces: InterfacesConfig = field(default_factory=InterfacesConfig)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    metering: MeteringConfig = field(default_factory=MeteringConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    receipts: ReceiptsConfig = field(default_factory=ReceiptsConfig)
    policy: policy.Policy = field(default_factory=policy.Policy)


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
    ])
    section("api", cfg.api, [
        ("listen", list, _addresses, "a non-empty list of IP addresses (management/LAN only)"),
        ("port", int, lambda v: 0 < v < 65536, "a TCP port 1-65535"),
        ("admin_token_file", str, _abs, "an absolute path"),
        ("max_body", int, lambda v: 256 <= v <= 1 << 20, "bytes between 256 and 1048576"),
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


def load(path: str | os.PathLike) -> NodeConfig:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, ["no such file"]) from None
    except PermissionError:
        raise ConfigError(path, ["permission denied; run as root or fix the file's mode"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror}; expected a node.toml file"]) from None
    return parse(data, path)
