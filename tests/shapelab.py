"""The shaping/isolation lab: owner LAN host, node, buyer and an "internet" namespace.

Every address lives only inside these namespaces (documentation ranges for the "internet",
private ranges only as targets that must stay unreachable):

    lan 192.168.77.2 ── lan0 192.168.77.1  node  wan0 203.0.113.2 ── 203.0.113.1  inet ── 192.0.2.1
                                           wg 10.213.0.1/24 (UDP 51820)              │
                                                                          buyer 192.0.2.2, wg 10.213.0.2
    inet's loopback: 198.51.100.10 (the internet host), and 10.99.0.1, 172.16.99.1, 192.168.99.1,
    100.64.99.1 (private/CGNAT targets that the owner can reach and buyers must not).

Used by tests/net/test_shaping.py and bench/shaping.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "agent"))

from idlewire_agent.policy import Firewall, Shaping
from idlewire_agent.shaping import Shaper
from netlab import Lab, Netns, sh
from rolerender import render

INTERNET_HOST = "198.51.100.10"
PRIVATE_TARGETS = {"10.0.0.0/8": "10.99.0.1", "172.16.0.0/12": "172.16.99.1",
                   "192.168.0.0/16": "192.168.99.1", "100.64.0.0/10": "100.64.99.1"}
LAN_HOST = "192.168.77.2"
NODE_LAN = "192.168.77.1"
NODE_WAN = "203.0.113.2"
NODE_TUN = "10.213.0.1"
BUYER_TUN = "10.213.0.2"
WG_PORT = 51820
ADMIN_PORT = 8740
MBIT = 1_000_000
# The two cores are shared with other jobs (image builds, QEMU): traffic generators and the
# userspace tunnel run at a higher priority, so that rates measure the shaper, not the scheduler.
IPERF3 = ("nice", "-n", "-10", "iperf3")


def _keypair(ns: Netns) -> tuple[str, str]:
    priv = ns.run("wg", "genkey").stdout.strip()
    pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True, check=True).stdout.strip()
    return priv, pub


@dataclass
class ShapeLab:
    lab: Lab
    node: Netns
    buyer: Netns
    inet: Netns
    lan: Netns
    wg_node: str
    wg_buyer: str
    buyer_pub: str
    node_pub: str
    tmp: Path

    def reconnect_buyer(self) -> None:
        """Re-add the buyer as a peer of the node, and make the buyer handshake afresh."""
        self.node.run("wg", "set", self.wg_node, "peer", self.buyer_pub, "allowed-ips", f"{BUYER_TUN}/32")
        self.buyer.run("wg", "set", self.wg_buyer, "peer", self.node_pub, "remove")
        self.buyer.run("wg", "set", self.wg_buyer, "peer", self.node_pub, "allowed-ips", "0.0.0.0/0",
                       "endpoint", f"{NODE_WAN}:{WG_PORT}")
        self.buyer.run("ip", "route", "replace", "default", "dev", self.wg_buyer)

    @classmethod
    def build(cls, lab: Lab, tmp: Path, firewall: bool = True) -> ShapeLab:
        node, buyer, inet, lan = (lab.ns(n) for n in ("node", "buyer", "inet", "lan"))
        links = [(node, inet, lab.link(node, "203.0.113.2/24", inet, "203.0.113.1/24", names=("wan0", "up0"))),
                 (buyer, inet, lab.link(buyer, "192.0.2.2/24", inet, "192.0.2.1/24", names=("eth0", "buy0"))),
                 (node, lan, lab.link(node, "192.168.77.1/24", lan, "192.168.77.2/24", names=("lan0", "eth0")))]
        # veth hands 64 KiB TSO/GSO aggregates across; a real wire carries frames of one MTU. Emulate
        # the wire (what an ISP's router or a LAN switch delivers): no aggregation on lab links.
        for a, b, (ia, ib) in links:
            a.run("ip", "link", "set", ia, "gso_max_segs", "1")
            b.run("ip", "link", "set", ib, "gso_max_segs", "1")
        for a in (INTERNET_HOST, *PRIVATE_TARGETS.values()):
            inet.run("ip", "addr", "add", f"{a}/32", "dev", "lo")
        for ns in (node, inet):
            ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        node.run("ip", "route", "add", "default", "via", "203.0.113.1")
        lan.run("ip", "route", "add", "default", "via", NODE_LAN)
        inet.run("ip", "route", "add", "192.168.77.0/24", "via", NODE_WAN)
        # WireGuard: the buyer's whole IPv4 traffic goes through the node.
        wg_node, wg_buyer = lab.ifname("wgn"), lab.ifname("wgb")
        keys = {}
        for ns, ifname, addr, port in ((node, wg_node, f"{NODE_TUN}/24", WG_PORT),
                                       (buyer, wg_buyer, f"{BUYER_TUN}/24", WG_PORT + 1)):
            ns.wireguard(ifname)
            priv, pub = _keypair(ns)
            key = tmp / f"{ns.name}.key"
            key.write_text(priv)
            ns.run("wg", "set", ifname, "private-key", str(key), "listen-port", str(port))
            ns.run("ip", "addr", "add", addr, "dev", ifname)
            ns.run("ip", "link", "set", ifname, "up")
            keys[ifname] = pub
        node.run("wg", "set", wg_node, "peer", keys[wg_buyer], "allowed-ips", f"{BUYER_TUN}/32")
        buyer.run("wg", "set", wg_buyer, "peer", keys[wg_node], "allowed-ips", "0.0.0.0/0",
                  "endpoint", f"{NODE_WAN}:{WG_PORT}")
        buyer.run("ip", "route", "add", "203.0.113.0/24", "via", "192.0.2.1")
        buyer.run("ip", "route", "add", "default", "dev", wg_buyer)
        for ns in (node, buyer):
            for pid in sh("ip", "netns", "pids", ns.name).stdout.split():
                sh("renice", "-n", "-10", "-p", pid, check=False)
        sl = cls(lab, node, buyer, inet, lan, wg_node, wg_buyer, keys[wg_buyer], keys[wg_node], tmp)
        if firewall:
            sl.load_firewall()
        return sl

    def firewall_text(self, **overrides) -> str:
        return render("firewall", "etc/idlewire/firewall.nft.j2",
                      {"firewall_tunnel_interface": self.wg_node, "firewall_wan_interface": "wan0",
                       "firewall_admin_interfaces": ["lan0"], "firewall_admin_tcp_ports": [ADMIN_PORT],
                       **overrides})

    def load_firewall(self, **overrides) -> None:
        path = self.tmp / "firewall.nft"
        path.write_text(self.firewall_text(**overrides))
        self.node.run("nft", "-c", "-f", str(path))
        self.node.run("nft", "-f", str(path))

    def shaping(self, **kw) -> Shaping:
        base = dict(enabled=True, wan_interface="wan0", tunnel_interface=self.wg_node, tunnel_port=WG_PORT,
                    tunnel_mtu=1420, line_up=200 * MBIT, line_down=200 * MBIT, overhead=18,
                    floor_up=10 * MBIT, floor_down=10 * MBIT, cap_up=20 * MBIT, cap_down=20 * MBIT)
        base.update(kw)
        return Shaping(**base)

    def shaper(self, shaping: Shaping, max_sessions: int = 4, state: str = "shaping.json") -> Shaper:
        return Shaper(shaping, Firewall(), max_sessions, state_path=self.tmp / state, netns=self.node.name)

    def iperf_server(self, ns: Netns | None = None, port: int = 5201, once: bool = False) -> None:
        ns = ns or self.inet
        ns.popen(*IPERF3, "-s", "-p", str(port), *(["-1"] if once else []),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(50):
            if ns.run("ss", "-ltn", f"sport = :{port}").stdout.count("LISTEN"):
                return
            time.sleep(0.05)
        raise RuntimeError("iperf3 server did not start")


def iperf(ns: Netns, server: str, seconds: float, reverse: bool = False, port: int = 5201,
          omit: int = 1, extra: tuple[str, ...] = ()) -> dict:
    """An iperf3 TCP run; returns its JSON (receiver-side rate in ['end']['sum_received'])."""
    argv = [*IPERF3, "-c", server, "-p", str(port), "-J", "-t", str(seconds), "-O", str(omit), *extra]
    if reverse:
        argv.append("-R")
    p = ns.run(*argv, check=False, timeout=seconds + omit + 30)
    data = json.loads(p.stdout or "{}")
    if p.returncode != 0 or "error" in data:
        raise RuntimeError(f"iperf3 failed: {data.get('error') or p.stderr}")
    return data


def received_bps(data: dict) -> float:
    return data["end"]["sum_received"]["bits_per_second"]


def ping_p95(ns: Netns, target: str, count: int, interval: float = 0.05) -> float:
    p = ns.run("ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", target,
               check=False)
    rtts = sorted(float(x.split("time=")[1].split()[0]) for x in p.stdout.splitlines() if "time=" in x)
    if not rtts:
        raise RuntimeError(f"no ping replies from {target}: {p.stdout} {p.stderr}")
    return rtts[min(len(rtts) - 1, int(0.95 * len(rtts)))]


def tcp_reachable(ns: Netns, host: str, port: int, timeout: float = 1.0) -> bool:
    code = ("import socket,sys\n"
            f"s=socket.socket(socket.AF_INET6 if ':' in {host!r} else socket.AF_INET)\n"
            f"s.settimeout({timeout})\n"
            f"sys.exit(0 if s.connect_ex(({host!r},{port}))==0 else 1)\n")
    return ns.run(sys.executable, "-c", code, check=False).returncode == 0


def ping_ok(ns: Netns, host: str) -> bool:
    return ns.run("ping", "-n", "-c", "1", "-W", "1", host, check=False).returncode == 0


def listen(ns: Netns, port: int, host: str = "0.0.0.0") -> None:
    """A TCP listener that accepts and closes, for reachability checks."""
    code = ("import socket\n"
            f"s=socket.socket(socket.AF_INET6 if ':' in {host!r} else socket.AF_INET)\n"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(({host!r},{port}))\n"
            "s.listen(64)\n"
            "while True:\n"
            "    c,_=s.accept()\n"
            "    c.close()\n")
    ns.popen(sys.executable, "-c", code)
    for _ in range(50):
        if ns.run("ss", "-ltn", f"sport = :{port}").stdout.count("LISTEN"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"listener on {port} did not start")


def link_bytes(ns: Netns, dev: str, which: str) -> int:
    """Bytes a device received ("rx") or sent ("tx"), from its own counters (ip -s -j link)."""
    data = json.loads(ns.run("ip", "-s", "-j", "link", "show", "dev", dev).stdout)
    return int(data[0]["stats64"][which]["bytes"])


def measured_transfer(client: Netns, server: str, seconds: float, reverse: bool, port: int,
                      counter: tuple[Netns, str, str], queue: tuple[Netns, str, str] | None = None,
                      ) -> tuple[float, float, float]:
    """(rate at ``counter`` in bit/s, TCP goodput in bit/s, share of time the queue was empty).

    The counter (namespace, device, rx|tx) is sampled over ``seconds`` after a 1 s warm-up (slow
    start, HTB's initial burst), independently of iperf3's own accounting. ``queue`` (namespace,
    device, classid) is the shaping class that should be the bottleneck: when it often runs empty,
    the traffic source (CPU-starved sender or tunnel), not the shaper, set the rate.
    """
    ns, dev, which = counter
    argv = [*IPERF3, "-c", server, "-p", str(port), "-J", "-t", str(seconds + 1.5), "-O", "1"]
    if reverse:
        argv.append("-R")
    p = client.popen(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    samples: list[bool] = []
    stop = threading.Event()

    def watch() -> None:
        qns, qdev, classid = queue
        while not stop.wait(0.1):
            out = qns.run("tc", "-s", "class", "show", "dev", qdev, "classid", classid, check=False).stdout
            m = re.search(r"backlog \S+ (\d+)p", out)
            if m:
                samples.append(m[1] == "0")

    watcher = threading.Thread(target=watch) if queue else None
    b0, t0 = link_bytes(ns, dev, which), time.monotonic()
    if watcher:
        watcher.start()
    time.sleep(seconds)
    b1, t1 = link_bytes(ns, dev, which), time.monotonic()
    stop.set()
    if watcher:
        watcher.join()
    out, err = p.communicate(timeout=seconds + 30)
    data = json.loads(out or "{}")
    if p.returncode != 0 or "error" in data:
        raise RuntimeError(f"iperf3 failed: {data.get('error') or err}")
    empty = sum(samples) / len(samples) if samples else 0.0
    return (b1 - b0) * 8 / (t1 - t0), received_bps(data), empty


def cpu_stall_us() -> int:
    """Total µs some task waited for a CPU (Linux PSI), 0 when the kernel does not report it."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return 0
