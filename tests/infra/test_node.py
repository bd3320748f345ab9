"""One node, as declared: every expected value comes from the role variables (see iwnode.py).

Each test is one fact an operator can act on; its name says which, its message says what
differs. Checks for features a node does not deploy yet are skipped with the reason.
"""

from __future__ import annotations

import json
import re
import shlex
import time

import pytest
from iwnode import BOOT_DIRS, STAMP_SECRETS, feature

pytestmark = pytest.mark.infra

AGENT = "idlewire-agent"


def test_agent_service_active_and_enabled(node):
    running, enabled = node.service(AGENT)
    assert running, f"{AGENT} is not running"
    assert enabled, f"{AGENT} is not enabled at boot"


def test_openwrt_agent_service_config_in_uci(node):
    if not node.openwrt:
        pytest.skip("not OpenWrt (procd and /etc/config/idlewire are OpenWrt's)")
    cfg = node.uci_export("idlewire")
    assert cfg is not None, "no UCI package idlewire (/etc/config/idlewire, roles/agent)"
    assert cfg.get("agent.enabled") == "1", f"idlewire.agent.enabled is {cfg.get('agent.enabled')!r}, not '1'"
    want = f"{node.v['agent_config_dir']}/node.toml"
    assert cfg.get("agent.config") == want, f"idlewire.agent.config is {cfg.get('agent.config')!r}, not {want!r}"


def test_api_listens_on_management_only(node):
    port = int(node.v["agent_api_port"])
    wanted = sorted(node.v["agent_api_listen"])
    found = sorted(set(node.listeners("tcp", port)))
    assert found, f"nothing listens on TCP port {port} (agent_api_port); expected {wanted}"
    wild = [a for a in found if a in ("0.0.0.0", "::")]
    assert not wild, f"the API listens on every address ({wild}) on port {port}; expected only {wanted}"
    extra = [a for a in found if a not in wanted]
    assert not extra, f"the API listens on {extra} besides agent_api_listen {wanted}"
    missing = [a for a in wanted if a not in found]
    assert not missing, f"the API does not listen on {missing} (agent_api_listen)"


def health(node) -> tuple[int, str]:
    """GET /health from the node itself, on the first agent_api_listen address."""
    addr = node.v["agent_api_listen"][0]
    host = f"[{addr}]" if ":" in addr else addr
    return node.http_get(f"http://{host}:{int(node.v['agent_api_port'])}/health")


def test_api_health_ok(node):
    code, body = health(node)
    assert code == 200, f"/health answered {code}: {body[:200]}"
    assert json.loads(body).get("status") == "ok", body[:200]


# /health idle.why while the agent's first measurement is under way (agent/idlewire_agent/idle.py)
FIRST = "not measured yet"
# What [home] source may be in use for each agent_idle_source.
IDLE_SOURCES = {"auto": {"upnp", "latency"}, "upnp": {"upnp"}, "latency": {"latency"}}


def test_node_mode_measures_the_owner(node):
    """Node mode: the owner's traffic does not cross the node, so the agent measures it (the home
    router's WAN counters over UPnP IGD, else latency to reflectors) and keeps the buyers' cap
    below what is idle. Which source is in use, and that it produced a figure lately."""
    _, mode = feature(node.v, "mode")
    if mode not in (None, "node"):
        pytest.skip(f"agent_mode is {mode!r}: the owner's traffic crosses the node, nothing to measure")
    _, on = feature(node.v, "shaping")
    if not on or str(on).lower() in ("false", "0", "no"):
        pytest.skip("shaping is not deployed (agent_shaping_enabled): no buyers' cap for node mode to lower")
    _, want = feature(node.v, "idle_source")
    want = str(want or "auto")
    if want == "off":
        pytest.skip("agent_idle_source is off: the buyers get the fixed caps")
    _, interval = feature(node.v, "idle_interval")
    interval = float(interval or 2)
    # An agent started moments ago is still in its first measurement (IGD discovery, then one
    # interval of echo rounds): wait for it rather than report a node that is about to work.
    deadline = time.monotonic() + 3 * interval + 20
    while True:
        code, body = health(node)
        assert code == 200, f"node mode: /health answered {code}, so which source measures the owner is unknown"
        idle = json.loads(body).get("idle") or {}
        if idle.get("source") != "none" or idle.get("why") != FIRST or time.monotonic() > deadline:
            break
        time.sleep(1)
    src = idle.get("source")
    assert not (src == "none" and idle.get("why") == FIRST), (
        f"node mode: the agent's first measurement of the owner has not finished in {3 * interval + 20:g} s "
        "(UPnP IGD discovery, then one agent_idle_interval of pings): see journalctl -u idlewire-agent")
    assert idle, "/health has no idle figures: this agent does not measure the owner (an old agent?)"
    assert src != "none", (
        f"node mode measures nothing ({idle.get('why')}): buyers keep the fixed caps while the owner "
        "uses the line; turn UPnP IGD on in the home router, or set agent_idle_reflectors to hosts that answer ping")
    assert src in IDLE_SOURCES.get(want, {src}), f"the owner is measured by {src}, but agent_idle_source is {want}"
    interval = float(idle.get("interval_s") or interval)
    age = idle.get("age_s")
    assert age is not None and age <= 3 * interval + 5, \
        f"the {src} source's last figure is {age} s old (interval {interval:g} s): the measurement is stuck"


def test_wireguard_port_on_wan(node):
    var, port = feature(node.v, "tunnel_port")
    if var is None:
        pytest.skip("no tunnel port variable (agent_tunnel_port): the WireGuard tunnel is not deployed")
    found = node.listeners("udp", int(port))
    assert found, f"nothing listens on UDP port {port} ({var})"
    wan_var, wan = feature(node.v, "wan_interface")
    wan = node.line if wan else wan  # PPPoE: the line's address is on ppp0
    if wan and not any(a in ("0.0.0.0", "::") for a in found):
        on_wan = set(node.addresses(wan)) & set(found)
        assert on_wan, f"UDP {port} listens on {found}, not on {wan} ({wan_var})"


def test_secret_files_private(node):
    cfg = node.v["agent_config_dir"]
    with node.root():  # one command: mode, owner and path of every file (busybox stat too)
        res = node.sh(f"find {shlex.quote(cfg)} /etc/ssh -maxdepth 2 \\( -type f -o -type d \\) "
                      "-exec stat -c '%a %U %n' {} + 2>/dev/null")
    bad, cfg_mode = [], None
    for line in res.stdout.splitlines():
        mode, user, path = line.split(" ", 2)
        if path.rstrip("/") == cfg.rstrip("/"):
            cfg_mode = int(mode, 8)
        elif re.search(r"\.(key|token|psk|secret)$|/ssh_host_[^/]*_key$", path) and \
                (int(mode, 8) & 0o077 or user != "root"):
            bad.append(f"{path} {mode} {user}")
    assert not bad, f"secret files readable by others (want 0600 root): {bad}"
    assert cfg_mode is not None, f"{cfg} (agent_config_dir) does not exist"
    assert not cfg_mode & 0o007, f"{cfg} is {oct(cfg_mode)}: others may list or read it"


def test_forwarding_sysctls(node):
    wrong = {}
    for key, value in node.v["base_sysctl"].items():
        got = str(node.host.sysctl(key))
        if got != str(value):
            wrong[key] = f"{got} (want {value})"
    assert not wrong, f"kernel settings differ from base_sysctl: {wrong}"


def test_nft_isolation_table_loaded(node):
    var, table = feature(node.v, "nft_table")
    if var is None:
        pytest.skip("no firewall_table variable: the nftables isolation role is not deployed")
    with node.root():
        res = node.sh(f"nft list table inet {shlex.quote(table)}")
    assert res.rc == 0, f"nftables table inet {table} is not loaded ({var}): {res.stderr.strip()}"
    ruleset = res.stdout
    assert "chain" in ruleset and ("drop" in ruleset or "reject" in ruleset), \
        f"table inet {table} has no filtering chain (flushed?)"
    missing = [n for n in node.v.get("firewall_blocked_networks_v4", []) if n not in ruleset]
    assert not missing, f"table inet {table} does not block {missing} (firewall_blocked_networks_v4)"
    for port in node.v.get("firewall_blocked_tcp_ports", []):
        assert re.search(rf"\b{int(port)}\b", ruleset), f"table inet {table} does not drop TCP port {port}"


def test_tc_tree_on_wan_with_configured_caps(node):
    """The shaping trees of roles/agent (agent/idlewire_agent/shaping.py): on the WAN and the IFB of
    its ingress, HTB trees whose root class runs at the line rate (the owner's protection); on the
    tunnel and the IFB of its ingress, trees whose root class is the buyers' cap."""
    _var, on = feature(node.v, "shaping")
    if not on or str(on).lower() in ("false", "0", "no"):
        pytest.skip("shaping is not deployed (agent_shaping_enabled absent or false)")
    wan_var, wan = feature(node.v, "wan_interface")
    tun_var, tun = feature(node.v, "tunnel_interface")
    assert wan, "shaping is enabled but no WAN interface variable (agent_wan_interface)"
    if node.line != wan:  # the WAN is PPPoE: the line is ppp0
        wan_var, wan = "PPPoE: idlewire-agent mode --wan", node.line
    _, rules = feature(node.v, "schedule")
    problems = []

    def check(dev: str | None, what: str, want_var: str, extra: tuple[float, ...] = (),
              measured: tuple[float, ...] = ()) -> None:
        var, mbit = feature(node.v, want_var)
        if mbit is None or dev is None:
            return
        want = {float(mbit), *extra, *measured}
        cls = node.htb_class(dev)
        if cls is None:
            problems.append(f"{dev} ({what}) has no HTB class 1:1")
            return
        if not any(abs(cls["ceil"] - w * 1e6) <= w * 1e4 for w in want):
            sched = f" or a scheduled cap {sorted(extra)}" if extra else ""
            meas = f", or the measured cap in force {sorted(set(measured))} (/health idle)" if measured else ""
            problems.append(f"{dev} ({what}) ceil {cls['ceil'] / 1e6:g} Mbit/s, want {float(mbit):g} "
                            f"Mbit/s{sched} ({var}){meas}")

    wan_ifb = node.ingress_ifb(wan)
    if wan_ifb is None:
        problems.append(f"the ingress of {wan} ({wan_var}) is not redirected to an IFB: the line's "
                        "download is not shaped")
    check(wan, "the line's upload", "line_up_mbit")
    check(wan_ifb, "the line's download", "line_down_mbit")
    # No tunnel interface (the agent is down): no buyer can connect, and test_wireguard_port_on_wan
    # says so; its trees come and go with the interface.
    if tun and node.link_exists(tun):
        tun_ifb = node.ingress_ifb(tun)
        if tun_ifb is None:
            problems.append(f"the ingress of {tun} ({tun_var}) is not redirected to an IFB: buyers' "
                            "upload is not capped")
        measured = idle_caps(node), idle_caps(node)  # (node mode) before and after reading tc
        for direction, dev, what in (("down", tun, "buyers' download"), ("up", tun_ifb, "buyers' upload")):
            scheduled = tuple(float(r[f"cap_{direction}_mbit"]) for r in rules or []
                              if isinstance(r, dict) and f"cap_{direction}_mbit" in r)
            check(dev, what, f"cap_{direction}_mbit", scheduled,
                  tuple(m[direction] for m in measured if direction in m))
    assert not problems, "; ".join(problems)


def idle_caps(node) -> dict[str, float]:
    """Node mode with a working measurement: the buyers' caps the agent keeps in force below
    what the owner leaves idle ({"up": Mbit/s, "down": Mbit/s}, from /health), which the tunnel's
    trees carry instead of the configured caps; {} otherwise."""
    code, body = health(node)
    idle = (json.loads(body).get("idle") or {}) if code == 200 else {}
    if idle.get("source") not in IDLE_SOURCES["auto"]:
        return {}
    return {d: float(idle[f"cap_{d}_mbit"]) for d in ("up", "down") if idle.get(f"cap_{d}_mbit") is not None}


def test_ssh_password_authentication_off(node):
    if node.openwrt and not node.host.exists("sshd"):
        assert node.uci_get("dropbear.@dropbear[0].PasswordAuth") in ("off", "0"), \
            "dropbear allows password login (uci dropbear.@dropbear[0].PasswordAuth)"
        return
    with node.root():
        res = node.sh("sshd -T 2>/dev/null || /usr/sbin/sshd -T")
    assert res.rc == 0, f"sshd -T failed: {res.stderr.strip()}"
    conf = dict(line.split(None, 1) for line in res.stdout.splitlines() if " " in line)
    wrong = {k: conf.get(k) for k, want in (("passwordauthentication", "no"),
                                             ("kbdinteractiveauthentication", "no"),
                                             ("permitemptypasswords", "no"))
             if conf.get(k) != want}
    assert not wrong, f"sshd accepts passwords: {wrong}"


def test_no_account_with_usable_password(node):
    with node.root():
        shadow = node.host.file("/etc/shadow").content_string
    usable = [line.split(":")[0] for line in shadow.splitlines()
              if line.count(":") >= 1 and not re.match(r"^[!*]", line.split(":")[1])]
    assert not usable, f"accounts with a usable or empty password: {usable}"


def test_stamp_secrets_gone(node):
    if not node.host.file("/usr/local/sbin/idlewire-stamp").exists:
        pytest.skip("no unit-stamp consumer (/usr/local/sbin/idlewire-stamp) on this node")
    with node.root():
        left = [f"{d}/idlewire/{n}" for d in BOOT_DIRS for n in STAMP_SECRETS
                if node.host.file(f"{d}/idlewire/{n}").exists]
    assert not left, f"first boot left stamp secrets on the boot partition: {left}"


def test_no_private_key_on_boot_partition(node):
    dirs = " ".join(d for d in BOOT_DIRS if node.host.file(d).is_directory)
    if not dirs:
        pytest.skip(f"no boot partition mounted at {' or '.join(BOOT_DIRS)}")
    with node.root():
        res = node.sh(f"grep -rlI 'PRIVATE KEY' {dirs}")
    assert not res.stdout.strip(), f"private key material on the (FAT, unprotected) boot partition: " \
                                   f"{res.stdout.split()}"


def test_mode_router_serves_the_lan_or_node_mode_leaves_it_off(node):
    """Router mode (roles/base router.yml, idlewire-mode.service): the unit's effective mode, as the
    agent reads it (node.toml [home] mode, the stamped unit's mode winning). A router has br-lan up
    with its address, dnsmasq serving DHCP and DNS there, the LAN's NAT table loaded, over PPPoE
    pppd dialled in (ppp0 with an address) and, when the stamp gave Wi-Fi and the radio exists, the
    access point up. A node has none of it running."""
    if node.openwrt:
        pytest.skip("OpenWrt is its own router (netifd, dnsmasq, fw4): idlewire leaves it as it is")
    with node.root():
        res = node.sh("idlewire-agent mode")
        mode = res.stdout.strip()
        assert res.rc == 0 and mode in ("node", "router"), f"idlewire-agent mode failed: {res.stderr.strip()}"
        line = node.sh("idlewire-agent mode --wan").stdout.strip()
        flag = node.host.file("/run/idlewire/router").exists
        table = f"{node.v.get('firewall_table', 'idlewire')}_router"
        nat = node.sh(f"nft list table inet {shlex.quote(table)}")
        ap_conf = node.host.file("/etc/idlewire/hostapd.conf").exists
    dns_running, dns_enabled = node.service("idlewire-dnsmasq")
    if mode == "node":
        on = [what for what, up in (("/run/idlewire/router", flag), (f"nft table inet {table}", nat.rc == 0),
                                    ("idlewire-dnsmasq", dns_running)) if up]
        assert not on, f"node mode (idlewire-agent mode), but router mode's {', '.join(on)} is up"
        return
    problems = []
    if not flag:
        problems.append("/run/idlewire/router is missing: idlewire-mode.service did not switch the network")
    lan = node.v.get("base_router_lan_address", "192.168.8.1/24").split("/")[0]
    if lan not in node.addresses("br-lan"):
        problems.append(f"br-lan does not have {lan} (base_router_lan_address): {node.addresses('br-lan')}")
    if not (dns_running and dns_enabled):
        problems.append(f"idlewire-dnsmasq is {'running' if dns_running else 'not running'}, "
                        f"{'enabled' if dns_enabled else 'not enabled'}")
    for proto, port, what in (("udp", 67, "DHCP"), ("udp", 53, "DNS"), ("tcp", 53, "DNS")):
        found = node.listeners(proto, port)
        if not ({lan, "0.0.0.0"} & set(found)):
            problems.append(f"no {what} on {lan} {proto}/{port} (listening: {found})")
    wan = node.v.get("agent_wan_interface", "eth0")
    if nat.rc != 0:
        problems.append(f"the LAN's NAT (nft table inet {table}) is not loaded: {nat.stderr.strip()}")
    elif not any(f'"{wan}"' in line for line in nat.stdout.splitlines() if "masquerade" in line):
        problems.append(f"table inet {table} does not masquerade br-lan out of {wan} (agent_wan_interface)")
    if line == "pppoe":  # the WAN is PPPoE: pppd's ppp0 is the line, with the ISP's address
        ppp_running, _ = node.service("idlewire-pppoe")
        if not ppp_running:
            problems.append("the WAN is PPPoE (idlewire-agent mode --wan), but idlewire-pppoe is not running: "
                            "journalctl -u idlewire-pppoe says why (login, the line)")
        elif not [a for a in node.addresses("ppp0") if ":" not in a]:
            problems.append("the WAN is PPPoE, but ppp0 has no IPv4 address: not dialled in (journalctl -u "
                            "idlewire-pppoe)")
    if ap_conf and node.link_exists("wlan0"):
        ap_running, _ = node.service("idlewire-hostapd")
        if not ap_running:
            problems.append("the stamp gave Wi-Fi and wlan0 exists, but idlewire-hostapd is not running")
    assert not problems, "router mode: " + "; ".join(problems)
