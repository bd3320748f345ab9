"""/etc/idlewire/node.toml and unit.toml: loading and validation against the one schema.

Every key (type, bounds, default, doc line, the check) is declared once in schema.py, which the
host's `idlewire stamp` imports too; the records below take their defaults from it. Every error
names its key and what is expected.

    [node]        region, location, price_per_gb, log_level, state_dir, key_file, marketplace, unit_file
    [interfaces]  wan, lan, management (interface names)
    [tunnel]      interface, port, pool, endpoint, private_key_file
    [metering]    poll_interval, line_rate_mbit, unpaid_cap_mb, tolerance_percent
    [sessions]    max, expiry, idle_timeout, max_per_buyer, handshake_timeout, unpaid_backoff,
                  unpaid_backoff_max, address_rest
    [api]         listen, port, admin_token_file, max_body, max_connections, max_per_source,
                  request_deadline
    [receipts]    keep_closed, keep_days
    [shaping] [schedule] [quota] [firewall]   see policy.py

One key per fact: the shaper shapes [interfaces] wan and [tunnel] interface/port, and [sessions]
max is the one session limit (the quota keeper and the shaper read it). The old [shaping]
wan_interface, tunnel_interface, tunnel_port and [quota] max_sessions still read, each with a
deprecation line (schema.MOVED); an old and a new key with different values is an error naming
both. [node] region is the node's ISO 3166-1 alpha-2 country code or "" (none); an old region name
("unset", "eu-west") reads as "" with a deprecation line, and a node with a marketplace but no
region is refused at start in one line (market_problem).

unit.toml ([node] unit_file, schema.UNIT) is the unit's own settings, written at first boot by
`idlewire-agent consume-stamp` (consume.py) from the stamp `idlewire stamp` put on the boot
partition: unit, hostname, node_public_key, payout_address, marketplace, region and mode (each replacing
[node]'s, mode [home]'s: schema.UNIT_OVER) and [caps] up_mbit, down_mbit, monthly_gb (0 = no quota), max_sessions,
each replacing node.toml's value: the unit's stamp wins over the role's node.toml. A unit file that is
absent is fine (a node provisioned live has none); one with a bad value is an error naming the
unit file and the key, like node.toml's. A cap above the line rate is lowered to it, with a note.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tomllib

from . import policy, schema
from .record import Record, field


class ConfigError(Exception):
    """A list of problems in a config file, each naming the key."""

    def __init__(self, path: str, problems: list[str]):
        super().__init__("\n".join(f"{path}: {p}" for p in problems))
        self.problems = problems


def _d(section: str, key: str):
    """The default of a node.toml key, from the schema (its one owner)."""
    return schema.NODE[section][key].default


class ApiConfig(Record):
    listen: list[str] = field(default_factory=lambda: list(_d("api", "listen")))
    port: int = _d("api", "port")
    admin_token_file: str = _d("api", "admin_token_file")
    max_body: int = _d("api", "max_body")
    max_connections: int = _d("api", "max_connections")
    max_per_source: int = _d("api", "max_per_source")
    request_deadline: float = _d("api", "request_deadline")


class InterfacesConfig(Record):
    wan: str = _d("interfaces", "wan")
    lan: str = _d("interfaces", "lan")
    management: str = _d("interfaces", "management")


class TunnelConfig(Record):
    interface: str = _d("tunnel", "interface")
    port: int = _d("tunnel", "port")
    pool: str = _d("tunnel", "pool")
    endpoint: str = _d("tunnel", "endpoint")  # "" = the host of the API URL the buyer used
    private_key_file: str = _d("tunnel", "private_key_file")

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.pool, strict=False)


class MeteringConfig(Record):
    poll_interval: float = _d("metering", "poll_interval")
    line_rate_mbit: float = _d("metering", "line_rate_mbit")
    unpaid_cap_mb: float = _d("metering", "unpaid_cap_mb")
    tolerance_percent: float = _d("metering", "tolerance_percent")

    @property
    def line_rate_bytes(self) -> float:
        return self.line_rate_mbit * 1_000_000 / 8

    @property
    def unpaid_cap_bytes(self) -> int:
        return int(self.unpaid_cap_mb * 1_000_000)


class SessionsConfig(Record):
    max: int = _d("sessions", "max")  # the one session limit ([quota] max_sessions is its old name)
    expiry: int = _d("sessions", "expiry")
    idle_timeout: int = _d("sessions", "idle_timeout")
    max_per_buyer: int = _d("sessions", "max_per_buyer")
    handshake_timeout: int = _d("sessions", "handshake_timeout")
    unpaid_backoff: int = _d("sessions", "unpaid_backoff")
    unpaid_backoff_max: int = _d("sessions", "unpaid_backoff_max")
    address_rest: int = _d("sessions", "address_rest")


UNIT_FILE = _d("node", "unit_file")


class UnitConfig(Record):
    """The unit's stamped identity and caps (unit.toml); `present` False when there is none."""

    path: str = ""
    present: bool = False
    unit: str = ""
    hostname: str = ""
    node_public_key: str = ""
    payout_address: str = ""
    marketplace: str | None = None  # None: not stamped, node.toml's stands (schema.UNIT_OVER)
    region: str | None = None
    mode: str | None = None  # None: not stamped, node.toml's [home] mode stands
    wan: str | None = None  # None: not stamped, node.toml's [home] wan stands
    caps: dict[str, float | int] = field(default_factory=dict)  # as stamped
    notes: list[str] = field(default_factory=list)  # what the caps changed, one line each


class ReceiptsConfig(Record):
    """Retention. Open sessions keep every receipt. A closed one keeps its last `keep_closed` (the
    closing receipt included) behind a node-signed checkpoint that stands for the ones before, and
    all of them go `keep_days` after the close. 0 = keep (all of them / for ever)."""

    keep_closed: int = _d("receipts", "keep_closed")
    keep_days: float = _d("receipts", "keep_days")


class NodeConfig(Record):
    region: str = _d("node", "region")
    location: str = _d("node", "location")
    price_per_gb: float = _d("node", "price_per_gb")
    log_level: str = _d("node", "log_level")
    state_dir: str = _d("node", "state_dir")
    key_file: str = _d("node", "key_file")
    marketplace: str = _d("node", "marketplace")
    unit_file: str = _d("node", "unit_file")
    interfaces: InterfacesConfig = field(default_factory=InterfacesConfig)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    metering: MeteringConfig = field(default_factory=MeteringConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    receipts: ReceiptsConfig = field(default_factory=ReceiptsConfig)
    policy: policy.Policy = field(default_factory=policy.Policy)
    unit: UnitConfig = field(default_factory=lambda: UnitConfig())
    warnings: list[str] = field(default_factory=list)  # deprecated keys read, one line each
    old_region: str = ""  # an old region name read as "" (schema._old_region), for the marketplace's error


_OWN_SECTIONS = ("node", "interfaces", "tunnel", "metering", "sessions", "api", "receipts")


def _fill(record, values: dict, keys: dict[str, schema.Key]) -> None:
    for name, value in values.items():
        setattr(record, name, float(value) if keys[name].kind == schema.NUM else value)


def parse(data: dict, path: str = "node.toml") -> NodeConfig:
    """Validate a parsed node.toml mapping (schema.NODE); raise ConfigError listing every problem.
    Old keys (schema.MOVED) still read: each leaves a line in `cfg.warnings`."""
    known = {*_OWN_SECTIONS, *policy.SECTIONS}
    problems = [f"[{key}]: unknown section; expected one of {', '.join(sorted(known))}"
                for key in sorted(set(data) - known, key=str)]
    given = data.get("node", {}).get("region") if isinstance(data.get("node"), dict) else None
    data, warnings, conflicts = schema.migrate(data)
    problems += conflicts
    cfg = NodeConfig(warnings=warnings)
    if isinstance(given, str) and data["node"].get("region") == "" and given.strip():
        cfg.old_region = given
    cfg.policy, policy_problems = policy.parse_sections(data)
    problems += policy_problems
    for name in _OWN_SECTIONS:
        values = schema.check_table(schema.NODE[name], data.get(name, {}), f"{name}.", problems)
        _fill(cfg if name == "node" else getattr(cfg, name), values, schema.NODE[name])
    # one owner per fact: the shaper and the quota keeper read the same values
    sh = cfg.policy.shaping
    sh.wan_interface, sh.tunnel_interface, sh.tunnel_port = cfg.interfaces.wan, cfg.tunnel.interface, cfg.tunnel.port
    cfg.policy.quota.max_sessions = cfg.sessions.max
    if sh.wan_interface == sh.tunnel_interface:
        problems.append(f"tunnel.interface: expected an interface other than interfaces.wan, got "
                        f"{sh.tunnel_interface!r}")
    for a in cfg.api.listen:
        ip = ipaddress.ip_address(a)
        if ip.is_unspecified:
            problems.append(f"api.listen: expected management/LAN addresses, got {a!r} (listens on WAN and "
                            "tunnel too)")
        elif ip in cfg.tunnel.network:
            problems.append(f"api.listen: expected management/LAN addresses, got {a!r} (inside tunnel.pool)")
    if problems:
        raise ConfigError(path, problems)
    return cfg


UNIT_KEYS = tuple(schema.UNIT)
UNIT_CAPS = tuple(schema.CAPS)


def parse_unit(data: dict, path: str = UNIT_FILE) -> tuple[UnitConfig, list[str]]:
    """Validate a parsed unit.toml mapping (schema.UNIT): (unit settings, problems naming each key)."""
    problems: list[str] = []
    u = UnitConfig(path=path, present=True)
    values = schema.check_table(schema.UNIT, data, "", problems)
    u.caps = values.pop("caps", {})
    for key, value in values.items():
        setattr(u, key, value)
    return u, problems


def apply_unit(cfg: NodeConfig, unit: UnitConfig) -> None:
    """The unit's market facts and caps replace node.toml's (a cap above the line is lowered to
    it); notes say what."""
    cfg.unit = unit
    for key, (section, name) in schema.UNIT_OVER.items():
        value = getattr(unit, key)
        if value is not None:
            record = cfg if section == "node" else getattr(cfg.policy, section)
            unit.notes.append(f"{key} = {value!r} replaces {section}.{name} ({getattr(record, name)!r})")
            setattr(record, name, value)
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
        unit.notes.append(f"caps.max_sessions = {unit.caps['max_sessions']} replaces sessions.max "
                          f"({cfg.sessions.max})")
        quota.max_sessions = cfg.sessions.max = int(unit.caps["max_sessions"])


def market_problem(cfg: NodeConfig, path: str = "node.toml") -> str | None:
    """One line when a marketplace is set but the node has no region (the hub needs the country
    buyers pick nodes by), naming the file that set the marketplace and the fix; else None."""
    if not cfg.marketplace or cfg.region:
        return None
    unit = cfg.unit.marketplace is not None
    got = f"{cfg.old_region!r} (a region name, read as none)" if cfg.old_region and not unit else "none"
    return (f"{cfg.unit.path if unit else path}: {'region' if unit else 'node.region'}: expected the node's country "
            f"(ISO 3166-1 alpha-2, e.g. DE) for marketplace {cfg.marketplace}, got {got}; set region = \"DE\" in "
            "[node] of node.toml (Ansible: agent_region), or region: in the unit's unit.yml before stamping")


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
    for line in cfg.warnings:
        logging.getLogger("idlewire.config").warning("%s: %s", path, line)
    upath = os.fspath(unit_file) if unit_file is not None else cfg.unit_file
    if unit_file is not None or os.path.lexists(upath):  # else not a stamped unit: node.toml alone
        unit, problems = parse_unit(_read_toml(upath, "unit.toml"), upath)
        if problems:
            raise ConfigError(upath, problems)
        apply_unit(cfg, unit)
    if wan_kind(cfg) == "pppoe":  # the line is ppp0: the shaper, the meter and the API check use it
        cfg.interfaces.wan = cfg.policy.shaping.wan_interface = schema.PPPOE_INTERFACE
    return cfg


def wan_kind(cfg: NodeConfig) -> str:
    """How this unit's WAN reaches the ISP, as idlewire-mode sets it up ("dhcp" or "pppoe"): PPPoE
    only for a router with home.wan = "pppoe" whose login file is there (else it could never dial)."""
    home = cfg.policy.home
    if home.mode == "router" and home.wan == "pppoe" and os.path.exists(schema.PPPOE_FILE):
        return "pppoe"
    return "dhcp"
