"""A home behind a real home router: the lab for node mode, UPnP port mapping and NAT traversal.

    server ns 11.22.0.2 ── 11.22.0.1  internet ns (forwards; hub and buyers can live here)
    (iperf3, reflector)               up1 11.22.33.1 ──── line ──── wan0 11.22.33.2  router ns
                                                   (Debian's miniupnpd: UPnP IGD + NAT-PMP, nftables NAT)
                                      br0 192.168.1.1/24 ─┬─ owner ns  eth0 192.168.1.10
                                                          └─ node ns   eth0 192.168.1.20

* **The line**: a TBF on each side of the WAN link (download on the internet's egress, upload on
  the router's), with a deep queue like a real modem's, so a saturated line is both slower and
  late (what the latency estimator notices). The iperf3 server and the reflector sit one hop
  further, in `server`: a TCP sender whose own egress is the bottleneck keeps that queue short
  (TCP small queues), which no real line does.
* **The router** runs `/usr/sbin/miniupnpd` (package miniupnpd-nftables: Debian builds 2.3.x with
  the nftables backend) in the foreground (`-d`) with its own config file in the lab's temp dir:
  `ext_ifname=wan0`, `listening_ip=br0`, `secure_mode=yes` (a LAN host maps ports to itself
  only), allow rules for the LAN, UPnP and NAT-PMP. Its WAN byte counters
  (`GetTotalBytesReceived/Sent`) are wan0's own counters. `upnp=False` runs the router without it
  (a home router with UPnP switched off).
* **Addresses**: miniupnpd refuses port forwarding when its WAN address is private or reserved
  (RFC 1918, CGNAT, even the documentation ranges), as a real router behind CGNAT must. So the
  "internet" is 11.22.0.0/16 (home n's line: 11.22.32+n.0/24), addresses that exist only inside
  these namespaces: nothing routes anywhere else, and test traffic never leaves the lab.

    with Lab() as lab:
        home = HomeLab(lab, tmp_path)          # upnp=False: a router without UPnP
        home.node.run("upnpc", "-s")           # the node sees the IGD
        home.owner_download(seconds=10)        # the owner busy: iperf3 -R from the internet

Used by tests/net/test_home.py and bench/idle.py; the hub and
end-to-end tests can put the hub and buyers in `inet` and more homes behind more routers
(`HomeLab(lab, tmp, inet=home1.inet, n=2)` adds a second home to the same internet).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from netlab import Lab, Netns

sys.path.insert(0, str(Path(__file__).resolve().parent / "net"))

from agentlab import Forwarder, NodeLab, write_node_toml

MINIUPNPD = "/usr/sbin/miniupnpd"
SERVER = "11.22.0.2"  # a host on the internet: iperf3 server, ICMP reflector
IPERF3 = ("nice", "-n", "-10", "iperf3")


def have_homelab() -> str | None:
    """Why the home-router lab cannot run here, or None when it can."""
    for tool in (MINIUPNPD, "/usr/bin/upnpc", "/usr/bin/iperf3", "/usr/sbin/nft"):
        if not os.path.exists(tool):
            return f"needs {tool} (tools/scripts/deps.sh test installs it)"
    return None


def congestion_control(cc: str, *senders: Netns) -> None:
    """The senders' TCP congestion control (a new namespace inherits the host's; one other than
    the host's must be in net.ipv4.tcp_allowed_congestion_control)."""
    for ns in senders:
        ns.run("sysctl", "-qw", f"net.ipv4.tcp_congestion_control={cc}")


class HomeLab:
    """One home (router + owner + node) and the internet it hangs off, with a shaped line."""

    def __init__(self, lab: Lab, tmp: Path, *, upnp: bool = True, natpmp: bool = True, igd: bool = True,
                 line_down_mbit: float = 40, line_up_mbit: float = 10, queue_ms: int = 150,
                 inet: Netns | None = None, n: int = 1, cc: str | None = None):
        self.lab, self.tmp, self.n = lab, Path(tmp), n
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.inet = inet or lab.ns("inet")
        self.server_ip = SERVER
        if inet is None:  # a new internet: its server host, one hop behind
            self.server = lab.ns("srv")
            ia, ib = lab.link(self.inet, "11.22.0.1/24", self.server, f"{SERVER}/24")
            self.server.run("ip", "route", "add", "default", "via", "11.22.0.1")
            self.inet.run("ip", "link", "set", ia, "gso_max_segs", "1")
            self.server.run("ip", "link", "set", ib, "gso_max_segs", "1")
            self.inet.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        else:
            self.server = next(ns for ns in lab.namespaces if ns.name.endswith("-srv"))
        self.router, self.owner, self.node = lab.ns(f"rtr{n}"), lab.ns(f"own{n}"), lab.ns(f"node{n}")
        self.isp = f"11.22.{32 + n}.1"
        self.public = f"11.22.{32 + n}.2"  # the router's WAN address: the home's public address
        self.lan_prefix = f"192.168.{n}"
        self.gateway, self.owner_ip, self.node_ip = (f"{self.lan_prefix}.{h}" for h in (1, 10, 20))
        self.line_down, self.line_up = line_down_mbit, line_up_mbit
        if cc:
            congestion_control(cc, self.server, self.owner, self.node)
        # the line
        self.inet_if, _ = lab.link(self.inet, f"{self.isp}/24", self.router, f"{self.public}/24",
                                   names=(f"up{n}", "wan0"))
        self.router.run("ip", "route", "add", "default", "via", self.isp)
        # veth hands 64 KiB GSO aggregates across, a wire one MTU at a time: the server's
        # aggregates would land in the modem's queue as bursts (13 ms each at 40 Mbit/s) that no
        # real line has, and the latency source would read them as congestion
        self.inet.run("ip", "link", "set", self.inet_if, "gso_max_segs", "1")
        self.router.run("ip", "link", "set", "wan0", "gso_max_segs", "1")
        self._tbf(self.inet, self.inet_if, line_down_mbit, queue_ms)
        self._tbf(self.router, "wan0", line_up_mbit, queue_ms)
        # the LAN: a bridge on the router, the owner's laptop and the node on it
        self.router.run("ip", "link", "add", "br0", "type", "bridge")
        self.router.run("ip", "addr", "add", f"{self.gateway}/24", "dev", "br0")
        self.router.run("ip", "link", "set", "br0", "up")
        for i, (ns, addr) in enumerate(((self.owner, self.owner_ip), (self.node, self.node_ip))):
            _, port = lab.link(ns, f"{addr}/24", self.router, None, names=("eth0", f"lan{i}"))
            self.router.run("ip", "link", "set", port, "master", "br0")
            ns.run("ip", "route", "add", "default", "via", self.gateway)
        self.router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._nat()
        self.miniupnpd: subprocess.Popen | None = None
        self.conf = self.tmp / f"miniupnpd{n}.conf"
        if upnp:
            self.start_miniupnpd(natpmp=natpmp, igd=igd)

    # --- the line and the router --------------------------------------------------------------
    @staticmethod
    def _tbf(ns: Netns, dev: str, mbit: float, queue_ms: int) -> None:
        """A modem-like bottleneck: `mbit` with a `queue_ms` deep FIFO (bufferbloat included)."""
        limit = max(30_000, int(mbit * 1e6 / 8 * queue_ms / 1000))
        ns.run("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
               "burst", str(max(3000, int(mbit * 1e6 / 8 / 1000))), "limit", str(limit))

    def _nat(self) -> None:
        """The home router's firewall: masquerade the LAN, forward only what the LAN opened or UPnP
        mapped, and switch the LAN (hosts on br0 reach each other, as through a home router's
        switch: with br_netfilter loaded, as Docker hosts have it, bridged frames meet this forward
        chain too) (miniupnpd adds its rules to the chains `miniupnpd`, `prerouting_miniupnpd` and
        `postrouting_miniupnpd` of table inet filter; see /etc/miniupnpd/nft_init.sh)."""
        rules = """
table inet filter {
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "br0" oifname "br0" accept
        iifname "br0" oifname "wan0" accept
        iifname "wan0" jump miniupnpd
    }
    chain miniupnpd {
    }
    chain prerouting {
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
        oifname "wan0" masquerade
    }
    chain prerouting_miniupnpd {
    }
    chain postrouting_miniupnpd {
    }
}
"""
        self.router.run("nft", "-f", "-", input=rules)

    def start_miniupnpd(self, natpmp: bool = True, igd: bool = True) -> None:
        """Debian's miniupnpd inside the router namespace, foreground, config in the lab's temp dir
        (`igd=False`: NAT-PMP only, as some routers offer)."""
        self.conf.write_text("\n".join([
            "ext_ifname=wan0",
            "listening_ip=br0",
            "port=0",  # any free port for the HTTP (SOAP) server; SSDP tells clients where
            f"enable_upnp={'yes' if igd else 'no'}",
            f"enable_natpmp={'yes' if natpmp else 'no'}",
            "secure_mode=yes",
            "system_uptime=no",
            "min_lifetime=60",
            "max_lifetime=86400",
            f"uuid=00000000-0000-4000-8000-{secrets.token_hex(6)}",
            f"bitrate_down={int(self.line_down * 1e6)}",
            f"bitrate_up={int(self.line_up * 1e6)}",
            f"lease_file={self.tmp / f'upnp{self.n}.leases'}",
            f"allow 1024-65535 {self.lan_prefix}.0/24 1024-65535",
            "deny 0-65535 0.0.0.0/0 0-65535",
            "",
        ]))
        log = open(self.tmp / f"miniupnpd{self.n}.log", "a")  # noqa: SIM115 (the daemon's log)
        # miniupnpd writes a pid file at a fixed path: give it the lab's own (-P)
        self.miniupnpd = self.router.popen(MINIUPNPD, "-d", "-f", str(self.conf), "-P",
                                           str(self.tmp / f"miniupnpd{self.n}.pid"),
                                           stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.miniupnpd.poll() is not None:
                raise RuntimeError(f"miniupnpd exited: {self.miniupnpd_log()[-2000:]}")
            if "Listening for NAT-PMP" in self.miniupnpd_log() or (
                    not natpmp and "HTTP listening on port" in self.miniupnpd_log()):
                return
            time.sleep(0.1)
        raise RuntimeError(f"miniupnpd did not start: {self.miniupnpd_log()[-2000:]}")

    def stop_miniupnpd(self) -> None:
        if self.miniupnpd and self.miniupnpd.poll() is None:
            self.miniupnpd.terminate()
            self.miniupnpd.wait(10)
        self.miniupnpd = None

    def miniupnpd_log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.tmp / f"miniupnpd{self.n}.log").read_text()
        return ""

    def nat_rules(self) -> str:
        """The router's live DNAT rules (what UPnP mapped), as `nft list chain` prints them."""
        return self.router.run("nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd").stdout

    def wan_bytes(self) -> tuple[int, int]:
        """(received, sent) bytes on the router's WAN: what GetTotalBytesReceived/Sent report."""
        data = json.loads(self.router.run("ip", "-s", "-j", "link", "show", "dev", "wan0").stdout)
        s = data[0]["stats64"]
        return int(s["rx"]["bytes"]), int(s["tx"]["bytes"])

    # --- traffic --------------------------------------------------------------------------------
    def iperf_server(self, port: int = 5201) -> None:
        """An iperf3 server on the internet's server host (the owner's download source)."""
        self.server.popen(*IPERF3, "-s", "-B", self.server_ip, "-p", str(port), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
        for _ in range(50):
            if self.server.run("ss", "-ltn", f"sport = :{port}").stdout.count("LISTEN"):
                return
            time.sleep(0.05)
        raise RuntimeError("iperf3 server did not start")

    def owner_download(self, seconds: float, mbit: float = 0, port: int = 5201) -> subprocess.Popen:
        """The owner downloads from the internet for `seconds` (iperf3 -R, TCP; `mbit` paces it,
        0 = as fast as the line lets). Returns the running iperf3 (JSON on stdout)."""
        pace = ["-b", f"{mbit}M"] if mbit else []
        return self.owner.popen(*IPERF3, "-c", self.server_ip, "-p", str(port), "-R", "-J", "-t", f"{seconds:g}",
                                *pace, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class HomeNode(NodeLab):
    """The real agent (python -m idlewire_agent run) in the home's node namespace; starts, stops
    and answers like agentlab.NodeLab's (whose methods it uses), on this lab's namespaces.

    The agent's shaper keeps its state in /run/idlewire: each agent here runs in a mount
    namespace of its own with a tmpfs there, so parallel labs (and a host's real agent) never
    share it. The API listens on the node's loopback (in node mode the one NIC is the WAN, where
    the agent refuses to listen), reached through a loopback forwarder into the namespace.
    """

    def __init__(self, home: HomeLab, tmp: Path, **overrides):
        # not NodeLab.__init__: that builds namespaces of its own
        self.home, self.lab, self.tmp = home, home.lab, Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.node = home.node
        self.wg = home.lab.ifname("iwh")
        home.node.wg_sockets.append(f"/var/run/wireguard/{self.wg}.sock")
        self.port = 51000 + secrets.randbelow(9000)
        self.api_port = 18000 + secrets.randbelow(9000)
        self.api_host = "127.0.0.1"
        self.cfg = self.tmp / "node.toml"
        self.token_file = self.tmp / "admin.token"
        self.log = self.tmp / "agent.log"
        sections = {
            "node": {"state_dir": str(self.tmp / "state"), "key_file": str(self.tmp / "node.key"),
                     "log_level": "info"},
            "interfaces": {"wan": "eth0"},
            "tunnel": {"interface": self.wg, "port": self.port, "pool": "10.98.0.0/24",
                       "private_key_file": str(self.tmp / "wg.key")},
            "metering": {"poll_interval": 1.0},
            "api": {"listen": [self.api_host], "port": self.api_port, "admin_token_file": str(self.token_file)},
            "firewall": {"required": False},
        }
        write_node_toml(self.cfg, sections, overrides)
        self.proc: subprocess.Popen | None = None
        self.fwd: Forwarder | None = None
        script = 'mkdir -p /run/idlewire && mount -t tmpfs -o mode=0700 tmpfs /run/idlewire && exec "$@"'
        self.python = ["unshare", "-m", "sh", "-c", script, "agent", sys.executable]
        self.entry = ["-m", "idlewire_agent"]

    def stop(self) -> None:
        super().stop()
        self.fwd = None  # a restarted agent gets a new forwarder
