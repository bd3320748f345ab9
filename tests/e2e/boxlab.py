"""A home and the internet in namespaces, for a node booted from the image under QEMU.

    buyer 100.64.0.2 --- inet (routes; the hub on 203.0.113.1) --- srv 11.22.0.2 ("the web": iperf3,
                            |                                       a listener)
                 rtr1 11.22.33.2 public (tests/homelab.py: NAT, Debian's miniupnpd, a 100 Mbit/s line;
                            |     busybox udhcpd on its LAN; 10.0.0.1 and 172.16.0.1 answer too)
            br0 192.168.1.0/24 ── own1 192.168.1.10 (a host on the home LAN, a listener)
                            |
                 tap0 ── [eth0 WAN]  node (QEMU, router mode)  [eth1 LAN] ── tap1 ── brl ── laptop
                                                                          (the owner's laptop: DHCP
                                                                           from the node; SSH and
                                                                           Ansible run from here)

The unit is stamped `mode: router` and sits behind the home router as a second router would
(double NAT). QEMU runs inside `rtr1` (its tap devices live there; `brl` is a switch that only
joins tap1 and the laptop, the home router has no address on it). The node gets 192.168.1.2
from the home router's DHCP (a static lease for its MAC) and maps its WireGuard port on the
home router over UPnP IGD, as at home: nobody forwards it by hand. The buyer reaches the web
only through the node's tunnel (the internet drops buyer→web), so every byte it moves is the
node's. Listeners on port 8081 on the web (must be reached), the home LAN, the home router and
the laptop (none of them may be) make the buyer's probes mean something.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from homelab import SERVER, HomeLab
from netlab import Lab
from routerbox import lan_lease

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "net"))
from marketlab import HUB_ADDR, MarketLab

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'tools'}:{ROOT / 'agent'}"}
NODE = "192.168.1.2"  # the node's WAN address on the home LAN (the home router's static lease)
OWNER, ROUTER = "192.168.1.10", "192.168.1.1"  # a host on the home LAN; the home router
NODE_LAN = "192.168.8.1"  # the node's own LAN (base_router_lan_address), where the laptop is
WEB = SERVER  # "the web": probe listener and iperf3 server
NODE_MAC, LAN_MAC = "52:54:00:1e:2e:02", "52:54:00:1e:2e:03"
TUNNEL_PORT = 51820
PROBE_PORT = 8081
LISTENER = ("import socket, sys\n"
            "s = socket.create_server(('0.0.0.0', int(sys.argv[1])), backlog=64)\n"
            "while True:\n"
            "    c, a = s.accept(); c.sendall(b'x'); c.close()\n")


class BoxLab:
    def __init__(self, lab: Lab, tmp: Path):
        self.lab, self.tmp = lab, tmp
        # a fast line with a short queue: this walk measures the node's caps, not the line
        self.homelab = HomeLab(lab, tmp / "home", line_down_mbit=100, line_up_mbit=100, queue_ms=20)
        self.inet, self.home, self.owner, self.web = (self.homelab.inet, self.homelab.router, self.homelab.owner,
                                                      self.homelab.server)
        self.public = self.homelab.public
        self.buyer, self.laptop = lab.ns("buyer"), lab.ns("laptop")
        lab.link(self.inet, "100.64.0.1/24", self.buyer, "100.64.0.2/24")
        self.inet.run("ip", "addr", "add", f"{HUB_ADDR}/32", "dev", "lo")
        self.buyer.run("ip", "route", "add", "default", "via", "100.64.0.1")
        h = self.home.run
        # the node's WAN port on the home LAN, its LAN port on a switch of its own with the laptop
        h("ip", "link", "add", "brl", "type", "bridge")
        h("ip", "link", "set", "brl", "up")
        for tap, br in (("tap0", "br0"), ("tap1", "brl")):
            h("ip", "tuntap", "add", "dev", tap, "mode", "tap")
            h("ip", "link", "set", tap, "master", br, "up")
        lab.link(self.home, None, self.laptop, None, names=("lanl", "eth0"))
        h("ip", "link", "set", "lanl", "master", "brl")
        # brl is a plain switch: its frames pass (with br_netfilter loaded they meet the home
        # router's forward chain, whose policy is drop)
        h("nft", "add", "rule", "inet", "filter", "forward", "iifname", "brl", "oifname", "brl", "accept")
        for a in ("10.0.0.1/32", "172.16.0.1/32"):  # other private networks the home can reach
            h("ip", "addr", "add", a, "dev", "lo")
        self.inet.run("nft", "-f", "-", input=(
            "table ip lab {\n chain forward_buyers {\n  type filter hook forward priority 0;\n"
            f"  ip saddr 100.64.0.0/24 ip daddr {WEB} drop\n }}\n}}\n"))
        conf = tmp / "udhcpd.conf"
        conf.write_text(f"start 192.168.1.2\nend 192.168.1.9\ninterface br0\nlease_file {tmp}/udhcpd.leases\n"
                        f"option subnet 255.255.255.0\noption router {ROUTER}\noption dns {ROUTER}\n"
                        f"option lease 600\nstatic_lease {NODE_MAC} {NODE}\n")
        (tmp / "udhcpd.leases").touch()
        self.home.popen("busybox", "udhcpd", "-f", str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for ns in (self.web, self.owner, self.home, self.laptop):
            ns.popen(sys.executable, "-c", LISTENER, str(PROBE_PORT), stdout=subprocess.DEVNULL)
        self.web.popen("iperf3", "-s", "-B", WEB, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.hub_port = 8000 + secrets.randbelow(1000)
        self.hub_url = f"http://{HUB_ADDR}:{self.hub_port}"
        self.hub_db = tmp / "hub.sqlite"
        self.hub_proc: subprocess.Popen | None = None
        self.buyer_key = tmp / "buyer.key"
        self.client_log = tmp / "client.log"
        self.client_log.touch()
        self.lease: tuple[str, str, str, str] | None = None

    def laptop_lease(self, timeout: float) -> tuple[str, str, str, str]:
        """The laptop's DHCP lease from the node: (address, prefix length, router, DNS server)."""
        self.lease = lan_lease(self.laptop, self.tmp / "laptop", timeout)
        return self.lease

    def nics(self) -> list[str]:
        """QEMU arguments: the WAN NIC on the home LAN, then the LAN NIC on the laptop's switch (no
        iPXE ROMs: boot the disk)."""
        return ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={NODE_MAC},romfile=",
                "-netdev", "tap,id=n1,ifname=tap1,script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n1,mac={LAN_MAC},romfile="]

    # --- the hub -------------------------------------------------------------------------------
    start_hub = MarketLab.start_hub  # `idlewire hub serve` in the internet namespace, as tests/net runs it

    def hub(self, path: str):
        out = self.inet.run(sys.executable, "-c", "import sys, urllib.request as u; "
                            "sys.stdout.write(u.urlopen(sys.argv[1], timeout=10).read().decode())",
                            self.hub_url + path, timeout=30, check=False)
        if out.returncode:
            raise OSError(f"hub {path}: {out.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.stdout)

    def nodes(self) -> list[dict]:
        nodes = self.hub("/v1/nodes")
        return nodes.get("nodes", nodes) if isinstance(nodes, dict) else nodes

    def hub_sql(self, sql: str, *args) -> list:
        db = sqlite3.connect(self.hub_db, timeout=10)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def hub_chain(self, sid: str) -> list[dict]:
        return [json.loads(b) for (b,) in self.hub_sql("SELECT body FROM receipts WHERE session = ? ORDER BY seq", sid)]

    # --- the buyer -----------------------------------------------------------------------------
    def client(self, receipts: Path, *routes: str) -> subprocess.Popen:
        self.client_start = self.client_log.stat().st_size
        wg = self.lab.ifname("iwb")
        self.buyer.wg_sockets.append(f"/var/run/wireguard/{wg}.sock")
        route_args = [a for r in (f"{WEB}/32", *routes) for a in ("--route", r)]
        return self.buyer.popen("env", "--default-signal=INT", sys.executable, "-m", "idlewire", "client", "connect",
                                "--hub", self.hub_url, "--region", "DE", "--key", str(self.buyer_key),
                                "--interface", wg, "--interval", "1", "--json", "--receipts", str(receipts),
                                *route_args, stdout=subprocess.PIPE, stderr=self.client_log.open("a"), text=True,
                                env=ENV)

    def client_said(self) -> str:
        return self.client_log.read_text()[self.client_start:]

    def reach(self, targets: list[tuple[str, int]], timeout: float = 3) -> dict[str, bool]:
        """From the buyer: which host:port a TCP connection reaches (all tried at once)."""
        code = ("import json, socket, sys, concurrent.futures as cf\n"
                "def one(t):\n"
                "    h, p = t.rsplit(':', 1)\n"
                "    try:\n"
                f"        socket.create_connection((h, int(p)), timeout={timeout}).close(); return True\n"
                "    except OSError:\n"
                "        return False\n"
                "ts = sys.argv[1:]\n"
                "with cf.ThreadPoolExecutor(len(ts)) as ex: print(json.dumps(dict(zip(ts, ex.map(one, ts)))))\n")
        out = self.buyer.run(sys.executable, "-c", code, *[f"{h}:{p}" for h, p in targets], timeout=60)
        return json.loads(out.stdout)

    def iperf(self, *args: str, seconds: int = 8) -> dict:
        out = self.buyer.run("iperf3", "-c", WEB, "-t", str(seconds), "-O", "2", "-J", *args,
                             timeout=seconds + 60, check=False)
        return json.loads(out.stdout)


def timestamp_lines(src: Path, dest: Path, stop) -> None:
    """Copy the lines QEMU logs from the serial console to DEST, each with the seconds since the
    start (what the firmware and the boot spend their time on, e.g. after a power cut)."""
    t0, done, buf = time.monotonic(), 0, b""
    with dest.open("w") as out:
        while not stop.is_set():
            try:
                with src.open("rb") as f:
                    f.seek(done)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            done += len(chunk)
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                out.write(f"{time.monotonic() - t0:8.1f} {line.decode(errors='replace').rstrip()}\n")
            out.flush()
            stop.wait(0.5)


# Stays connected to the serial console's socket (QEMU's, inside the home namespace) once
# `idlewire console` has left it: QEMU logs the console (Vm.serial_log) only while a client is
# connected, and after a power cut the new QEMU waits for one (server=on,wait=on) before it runs.
# Without it the kernel's messages after the bootstrap (an oops, the boot after the cut) are lost.
DRAIN_CONSOLE = ("import socket, sys, time\n"
                 "while True:\n"
                 "    try:\n"
                 "        with socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5) as s:\n"
                 "            s.settimeout(None)\n"
                 "            while s.recv(65536):\n"
                 "                pass\n"
                 "    except OSError:\n"
                 "        pass\n"
                 "    time.sleep(0.2)\n")

