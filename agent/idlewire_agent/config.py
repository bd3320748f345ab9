"""/etc/idlewire/node.toml: loading and validation. Every error names its key and what is expected."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import policy


class ConfigError(Exception):
    """A list of problems in a config file, each naming the key."""

    def __init__(self, path: str, problems: list[str]):
        super().__init__("\n".join(f"{path}: {p}" for p in problems))
        self.problems = problems


@dataclass
class ApiConfig:
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    port: int = 8740
    admin_token_file: str = "/etc/idlewire/admin.token"  # noqa: S105 (a path, not a secret)


@dataclass
class NodeConfig:
    region: str = "unset"
    price_per_gb: float = 0.0
    log_level: str = "info"
    state_dir: str = "/var/lib/idlewire-agent"
    api: ApiConfig = field(default_factory=ApiConfig)
    policy: policy.Policy = field(default_factory=policy.Policy)


def load(path: str | Path) -> NodeConfig:
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, ["no such file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    problems: list[str] = []
    node = data.get("node", {})
    api = data.get("api", {})
    known = {"node", "api", *policy.SECTIONS}
    for key in sorted(set(data) - known):
        problems.append(f"[{key}]: unknown section; expected one of {', '.join(sorted(known))}")
    cfg = NodeConfig()
    cfg.policy, policy_problems = policy.parse_sections(data)
    problems += policy_problems

    def take(section: dict, name: str, key: str, kind: type | tuple, default, check=None, expect=""):
        if key not in section:
            return default
        value = section[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            problems.append(f"{name}.{key}: expected {expect}, got {value!r}")
            return default
        if check and not check(value):
            problems.append(f"{name}.{key}: expected {expect}, got {value!r}")
            return default
        return value

    cfg.region = take(node, "node", "region", str, cfg.region, None, "a string")
    cfg.price_per_gb = float(take(node, "node", "price_per_gb", (int, float), cfg.price_per_gb,
                                  lambda v: v >= 0, "a number >= 0"))
    cfg.log_level = take(node, "node", "log_level", str, cfg.log_level,
                         lambda v: v in ("debug", "info", "warning", "error"),
                         "one of debug, info, warning, error")
    cfg.state_dir = take(node, "node", "state_dir", str, cfg.state_dir, lambda v: v.startswith("/"),
                         "an absolute path")

    def addresses(v):
        try:
            return bool(v) and all(isinstance(a, str) and ipaddress.ip_address(a) for a in v)
        except ValueError:
            return False

    cfg.api.listen = take(api, "api", "listen", list, cfg.api.listen, addresses,
                          "a non-empty list of IP addresses")
    cfg.api.port = take(api, "api", "port", int, cfg.api.port, lambda v: 0 < v < 65536,
                        "a TCP port 1-65535")
    cfg.api.admin_token_file = take(api, "api", "admin_token_file", str, cfg.api.admin_token_file,
                                    lambda v: v.startswith("/"), "an absolute path")
    if problems:
        raise ConfigError(path, problems)
    return cfg
