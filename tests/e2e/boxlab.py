"""A home and the internet in namespaces, for a node booted from the image under QEMU.

    buyer (100.64.0.2) --- inet (router; the hub on 203.0.113.1) --- web (198.51.100.2: iperf3, a listener)
                                |
                          home (router: 203.0.113.2 public, NAT, UDP 51820 forwarded to the node,
                                |        DHCP on its LAN; 10.0.0.1 and 172.16.0.1 answer too)
                       br0 192.168.77.0/24
                        |               |
                 tap0 (the node's      owner (192.168.77.10: the owner's laptop, a listener;
                 WAN NIC, QEMU)          SSH and Ansible to the node run from here)

QEMU runs inside `home` (its tap device lives there); the node gets 192.168.77.2 from the home
router's DHCP (a static lease for its MAC), as at home. The buyer reaches the web only through
the node's tunnel (the internet drops buyer→web), so every byte it moves is the node's.
Listeners on port 8081 in `web` (must be reached), `owner` and `home` (must not be) make the
buyer's probes mean something.
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

from netlab import Lab

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "net"))
from marketlab import HUB_ADDR, MarketLab

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'tools'}:{ROOT / 'agent'}"}
NODE, OWNER, ROUTER = "192.168.77.2", "192.168.77.10", "192.168.77.1"
PUBLIC = "203.0.113.2"  # the home router's WAN address, on the hub's /24
WEB = "198.51.100.2"  # "the web": probe listener and iperf3 server
NODE_MAC = "52:54:00:1e:2e:02"
TUNNEL_PORT = 51820
PROBE_PORT = 8081
LISTENER = ("import socket, sys\n"
            "s = socket.create_server(('0.0.0.0', int(sys.argv[1])), backlog=64)\n"
            "while True:\n"
            "    c, a = s.accept(); c.sendall(b'x'); c.close()\n")


class BoxLab:
    def __init__(self, lab: Lab, tmp: Path):
        self.lab, self.tmp = lab, tmp
        self.inet, self.home, self.owner = lab.ns("inet"), lab.ns("home"), lab.ns("owner")
        self.buyer, self.web = lab.ns("buyer"), lab.ns("web")
        lab.link(self.inet, f"{HUB_ADDR}/24", self.home, f"{PUBLIC}/24", names=("pub", "wan"))
        lab.link(self.inet, "198.51.100.1/24", self.web, f"{WEB}/24")
        lab.link(self.inet, "100.64.0.1/24", self.buyer, "100.64.0.2/24")
        h = self.home.run
        h("ip", "link", "add", "br0", "type", "bridge")
        h("ip", "addr", "add", f"{ROUTER}/24", "dev", "br0")
        h("ip", "link", "set", "br0", "up")
        h("ip", "tuntap", "add", "dev", "tap0", "mode", "tap")
        h("ip", "link", "set", "tap0", "master", "br0", "up")
        lab.link(self.home, None, self.owner, f"{OWNER}/24", names=("lan1", "eth0"))
        h("ip", "link", "set", "lan1", "master", "br0")
        for a in ("10.0.0.1/32", "172.16.0.1/32"):  # other private networks the home can reach
            h("ip", "addr", "add", a, "dev", "lo")
        for ns in (self.inet, self.home):
            ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        h("ip", "route", "add", "default", "via", HUB_ADDR)
        self.owner.run("ip", "route", "add", "default", "via", ROUTER)
        self.web.run("ip", "route", "add", "default", "via", "198.51.100.1")
        self.buyer.run("ip", "route", "add", "default", "via", "100.64.0.1")
        h("nft", "-f", "-", input=(
            "table ip home {\n"
            f' chain pre {{ type nat hook prerouting priority -100; iifname "wan" udp dport {TUNNEL_PORT} '
            f"dnat to {NODE}:{TUNNEL_PORT}; }}\n"
            ' chain post { type nat hook postrouting priority 100; oifname "wan" masquerade; }\n'
            "}\n"))
        self.inet.run("nft", "-f", "-", input=(
            "table ip lab {\n chain forward_buyers {\n  type filter hook forward priority 0;\n"
            "  ip saddr 100.64.0.0/24 ip daddr 198.51.100.0/24 drop\n }\n}\n"))
        conf = tmp / "udhcpd.conf"
        conf.write_text(f"start 192.168.77.2\nend 192.168.77.9\ninterface br0\nlease_file {tmp}/udhcpd.leases\n"
                        f"option subnet 255.255.255.0\noption router {ROUTER}\noption dns {ROUTER}\n"
                        f"option lease 600\nstatic_lease {NODE_MAC} {NODE}\n")
        (tmp / "udhcpd.leases").touch()
        self.home.popen("busybox", "udhcpd", "-f", str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for ns in (self.web, self.owner, self.home):
            ns.popen(sys.executable, "-c", LISTENER, str(PROBE_PORT), stdout=subprocess.DEVNULL)
        self.web.popen("iperf3", "-s", "-B", WEB, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.hub_port = 8000 + secrets.randbelow(1000)
        self.hub_url = f"http://{HUB_ADDR}:{self.hub_port}"
        self.hub_db = tmp / "hub.sqlite"
        self.hub_proc: subprocess.Popen | None = None
        self.buyer_key = tmp / "buyer.key"
        self.client_log = tmp / "client.log"
        self.client_log.touch()

    def nics(self) -> list[str]:
        """QEMU arguments: the node's one NIC on the home LAN's tap device."""
        return ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={NODE_MAC},romfile="]  # no iPXE: boot the disk

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
        route_args = [a for r in ("198.51.100.0/24", *routes) for a in ("--route", r)]
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


def wait_for(fn, timeout: float = 30, every: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
