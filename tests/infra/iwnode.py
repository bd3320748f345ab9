"""What a node should be (role defaults + inventory) and how to look at it (Debian or OpenWrt).

Expected values come from the roles the playbooks apply (roles/NAME/defaults), overridden by the
inventory's variables for the host (`idlewire verify -i`, or testinfra's ansible:// hosts), or by
a vars file (`--iw-vars FILE`: a mapping of role variables, or {"vars": {...}, "hosts": {NAME:
{...}}}). Nothing expected is written in the tests themselves.

Features that other parts of idlewire bring are checked only where their variables say they are
deployed; the variable names are gathered in FEATURES so a renamed variable is fixed in one place.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from uci import parse

ROOT = Path(__file__).resolve().parents[2]

# Which variables switch a feature's checks on, or give its expected values (first one present
# wins): the roles' names, gathered here so a renamed variable is fixed in one place.
FEATURES = {
    # WireGuard listen port of the buyers' tunnel (roles/agent).
    "tunnel_port": ("agent_tunnel_port",),
    "tunnel_interface": ("agent_tunnel_interface", "firewall_tunnel_interface"),
    # Buyer isolation table (roles/firewall): `nft list table inet NAME`.
    "nft_table": ("firewall_table",),
    # Shaping (the agent's [shaping] section): on when true.
    "shaping": ("agent_shaping_enabled",),
    "wan_interface": ("agent_wan_interface", "firewall_wan_interface"),
    # The line (owner-protecting trees on the WAN and its ingress IFB), Mbit/s.
    "line_up_mbit": ("agent_line_up_mbit",),
    "line_down_mbit": ("agent_line_down_mbit",),
    # What buyers may use together (trees on the tunnel and its ingress IFB), Mbit/s.
    "cap_up_mbit": ("agent_cap_up_mbit",),
    "cap_down_mbit": ("agent_cap_down_mbit",),
    "schedule": ("agent_schedule",),
    # How the node sits in the home ([home] of node.toml): "node" measures the owner's use.
    "mode": ("agent_mode",),
    "idle_source": ("agent_idle_source",),
    "idle_interval": ("agent_idle_interval",),
}
BOOT_DIRS = ("/boot/firmware", "/boot/efi")
STAMP_SECRETS = ("node.key", "stamp.toml")  # what `idlewire stamp` leaves on the boot partition


def playbook_roles() -> list[str]:
    """Roles the playbooks apply to a node, in order (site.yml and bake.yml)."""
    roles: list[str] = []
    for name in ("site.yml", "bake.yml"):
        path = ROOT / "playbooks" / name
        if not path.exists():
            continue
        for play in yaml.safe_load(path.read_text()) or []:
            for r in play.get("roles", []) or []:
                role = r.get("role") if isinstance(r, dict) else r
                if isinstance(role, str) and role not in roles:
                    roles.append(role)
    return roles


def role_defaults(roles: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role in playbook_roles() if roles is None else roles:
        d = ROOT / "roles" / role / "defaults"
        files = [d / "main.yml"] if (d / "main.yml").exists() else sorted((d / "main").glob("*.yml"))
        for f in files:
            data = yaml.safe_load(f.read_text()) or {}
            out.update(data)
    return out


def load_vars_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    text = Path(path).read_text()
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    return data or {}


def expected_vars(name: str, vars_file: dict[str, Any], inventory_vars: dict[str, Any] | None) -> dict:
    """Role defaults < vars file (global, then per host) < inventory variables of the host."""
    merged = role_defaults()
    if "hosts" in vars_file or "vars" in vars_file:
        merged.update(vars_file.get("vars") or {})
        merged.update((vars_file.get("hosts") or {}).get(name) or {})
    else:
        merged.update(vars_file)
    merged.update(inventory_vars or {})
    return {k: _follow(merged, v) for k, v in merged.items()}


# A role default that follows another role's variable (one variable per shared fact), e.g.
# firewall_table: "{{ agent_firewall_table | default('idlewire') }}".
_FOLLOW = re.compile(r"^\{\{\s*(\w+)\s*\|\s*default\((.+)\)\s*\}\}$")


def _follow(merged: dict[str, Any], value: Any, depth: int = 0) -> Any:
    m = _FOLLOW.match(value.strip()) if isinstance(value, str) else None
    if not m or depth > 8:
        return value
    if m[1] in merged:
        return _follow(merged, merged[m[1]], depth + 1)
    return yaml.safe_load(m[2])


def feature(v: dict[str, Any], what: str) -> tuple[str | None, Any]:
    """(variable name, value) of the first variable present for a feature, or (None, None)."""
    for name in FEATURES[what]:
        if name in v and v[name] not in (None, ""):
            return name, v[name]
    return None, None


_RATE = re.compile(r"^(\d+(?:\.\d+)?)([KMG]?)(bit|bps)$", re.IGNORECASE)


def parse_rate(text: str) -> float:
    """tc's rate text ('10Mbit', '1250Kbps', '800bit') → bits per second."""
    m = _RATE.match(text.strip())
    if not m:
        raise ValueError(f"not a tc rate: {text!r}")
    value = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2).upper()]
    return value * 8 if m.group(3).lower() == "bps" else value


class Node:
    """One node under test: a testinfra host plus OpenWrt-aware helpers."""

    def __init__(self, host, name: str, expected: dict[str, Any]):
        self.host, self.name, self.v = host, name, expected

    # ---- who and what -------------------------------------------------------------------
    @functools.cached_property
    def openwrt(self) -> bool:
        return self.host.file("/etc/openwrt_release").exists

    @functools.cached_property
    def is_root(self) -> bool:
        return self.host.run("id -u").stdout.strip() == "0"

    @contextlib.contextmanager
    def root(self):
        """Run as root: sudo when logged in as someone else (idlewire has passwordless sudo)."""
        if self.is_root:
            yield
        else:
            with self.host.sudo():
                yield

    def sh(self, command: str) -> Any:
        return self.host.run(command)

    @functools.cached_property
    def line(self) -> str | None:
        """The device the agent shapes as the line: agent_wan_interface, or ppp0 when the unit's WAN
        is PPPoE (`idlewire-agent mode --wan`: router mode, wan = pppoe, its login there)."""
        _, wan = feature(self.v, "wan_interface")
        if not self.openwrt:
            with self.root():
                if self.sh("idlewire-agent mode --wan").stdout.strip() == "pppoe":
                    return self.v.get("firewall_router_pppoe_interface", "ppp0")
        return wan

    # ---- services: systemd or procd -----------------------------------------------------
    def service(self, name: str) -> tuple[bool, bool]:
        """(running, enabled)."""
        if self.openwrt:
            enabled = self.host.run(f"/etc/init.d/{shlex.quote(name)} enabled").rc == 0
            data = self.ubus_call("service", "list", {"name": name}) or {}
            instances = (data.get(name) or {}).get("instances") or {}
            running = any(i.get("running") for i in instances.values())
            return running, enabled
        svc = self.host.service(name)
        try:
            return svc.is_running, svc.is_enabled
        except AssertionError:
            # testinfra expects `systemctl is-active` to exit 0, 1 or 3; 4 is "no such unit": a unit
            # the roles did not install here (router mode's, where base_manage_network is off) is off.
            if self.host.run(f"systemctl cat -- {shlex.quote(name)}").rc != 0:
                return False, False
            raise

    def uci_get(self, key: str) -> str | None:
        res = self.host.run(f"uci -q get {shlex.quote(key)}")
        return res.stdout.strip() if res.rc == 0 else None

    def uci_export(self, package: str):
        """A UCI package as `uci export` prints it, parsed (uci.Config, beside this file), or None."""
        res = self.host.run(f"uci -q export {shlex.quote(package)}")
        return parse(res.stdout, f"{self.name}: uci export {package}") if res.rc == 0 else None

    def ubus_call(self, path: str, method: str, args: dict | None = None) -> Any:
        cmd = f"ubus call {shlex.quote(path)} {shlex.quote(method)}"
        if args is not None:
            cmd += f" {shlex.quote(json.dumps(args))}"
        res = self.host.run(cmd)
        if res.rc != 0:
            return None
        return json.loads(res.stdout or "null")

    # ---- network ------------------------------------------------------------------------
    def listeners(self, proto: str, port: int) -> list[str]:
        """Local addresses with a listening socket on PORT ('0.0.0.0', '::', '127.0.0.1', …)."""
        flag = "t" if proto == "tcp" else "u"
        res = self.host.run(f"ss -Hln{flag} 2>/dev/null || netstat -ln{flag}")
        found = []
        for line in res.stdout.splitlines():
            for field in line.split():
                m = re.match(r"^\[?([0-9a-fA-F:.*%\w-]*?)\]?:(\d+)$", field)
                if m and int(m.group(2)) == port:
                    addr = m.group(1).split("%")[0]
                    found.append({"*": "0.0.0.0", "": "0.0.0.0", "[::]": "::"}.get(addr, addr))
                    break
        return found

    def htb_class(self, dev: str, classid: str = "1:1") -> dict[str, float] | None:
        """rate and ceil (bit/s) of an HTB class on DEV, or None when DEV has no such class."""
        with self.root():  # tc is in /usr/sbin, not on an ordinary user's PATH
            res = self.sh(f"tc class show dev {shlex.quote(dev)} classid {shlex.quote(classid)}")
        m = re.search(rf"^class htb {re.escape(classid)} .*\brate (\S+) .*\bceil (\S+)", res.stdout, re.M)
        return {"rate": parse_rate(m.group(1)), "ceil": parse_rate(m.group(2))} if m else None

    def link_exists(self, dev: str) -> bool:
        return self.host.run(f"ip link show dev {shlex.quote(dev)}").rc == 0

    def ingress_ifb(self, dev: str) -> str | None:
        """The IFB that DEV's ingress is redirected to (`action mirred egress redirect dev X`)."""
        with self.root():
            res = self.sh(f"tc filter show dev {shlex.quote(dev)} ingress")
        m = re.search(r"to device (\S+?)\)", res.stdout)
        return m.group(1) if m else None

    def addresses(self, interface: str) -> list[str]:
        res = self.host.run(f"ip -o addr show dev {shlex.quote(interface)}")
        return [m.group(1).split("/")[0] for m in re.finditer(r"\binet6? (\S+)", res.stdout)]

    def http_get(self, url: str) -> tuple[int, str]:
        """GET from the node itself (python3, curl, or busybox wget)."""
        q = shlex.quote(url)
        py = ("import sys,urllib.request as u\n"
              "try:\n r=u.urlopen(sys.argv[1],timeout=5)\n"
              "except Exception as e:\n sys.exit(f'{sys.argv[1]}: {getattr(e, \"reason\", e)}')\n"
              "print(r.status);print(r.read().decode())")
        for cmd in (f"python3 -c {shlex.quote(py)} {q}",
                    f"curl -fsS -m 5 -w '\\n%{{http_code}}' {q}",
                    f"uclient-fetch -q -O - {q} || wget -q -O - {q}"):
            res = self.host.run(cmd)
            if res.rc == 127:
                continue
            if res.rc != 0:
                return 0, res.stderr.strip() or res.stdout.strip()
            out = res.stdout.strip()
            if cmd.startswith("python3"):
                code, _, body = out.partition("\n")
                return int(code), body
            if cmd.startswith("curl"):
                body, _, code = out.rpartition("\n")
                return int(code), body
            return 200, out
        return 0, "no python3, curl or wget on the node"
