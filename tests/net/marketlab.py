"""A market in namespaces: the hub on the "internet", a node in a home behind a real home router
(tests/homelab.py: Debian's miniupnpd, nftables NAT), a buyer outside.

    buyer 100.64.0.2 --- inet (routes; the hub on 203.0.113.1) --- srv 11.22.0.2 ("the web": echo, iperf3)
                              |
                         rtr1 11.22.33.2 public (masquerade; forwards inbound ONLY what UPnP mapped)
                              |
                         node1 192.168.1.20 (the agent with wireguard-go; API on 127.0.0.1 only)

The buyer runs `idlewire client connect --hub` and routes the web host through the tunnel: its
traffic leaves the node's home through the router's NAT, as a buyer's would. No one forwards the
node's WireGuard port by hand: the agent maps it on the router over UPnP IGD and tells the hub the
public endpoint it got (`upnp=False`: a router with UPnP off, and the node says it is not
reachable). The node's API listens on its loopback: nothing outside the node namespace reaches it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from agentlab import REPO, Forwarder, _children, _toml, ns_socket
from homelab import SERVER, HomeLab

HUB_ADDR = "203.0.113.1"
WEB = SERVER
ENV = {**os.environ, "PYTHONPATH": f"{REPO / 'tools'}:{REPO / 'agent'}"}


class MarketLab:
    def __init__(self, lab, tmp: Path, upnp: bool = True):
        self.lab, self.tmp = lab, tmp
        # a fast line with a short queue: this lab measures the market, not the line
        self.home = HomeLab(lab, tmp / "home", upnp=upnp, line_down_mbit=200, line_up_mbit=200, queue_ms=20)
        self.inet, self.nat, self.node, self.web = self.home.inet, self.home.router, self.home.node, self.home.server
        self.public = self.home.public
        self.buyer = lab.ns("buyer")
        lab.link(self.inet, "100.64.0.1/24", self.buyer, "100.64.0.2/24")
        self.inet.run("ip", "addr", "add", f"{HUB_ADDR}/32", "dev", "lo")
        self.buyer.run("ip", "route", "add", "default", "via", "100.64.0.1")
        self.node.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.pool = "10.77.8.0/24"
        self.nat.run("ip", "route", "add", self.pool, "via", self.home.node_ip)
        self.port = 51000 + secrets.randbelow(9000)
        # the web: one byte to whoever connects (first byte through the tunnel), and iperf3
        self.echo_port = 7000
        self.web.popen(sys.executable, "-c", (
            "import socket\n"
            f"s = socket.create_server(('{WEB}', {self.echo_port}), backlog=64)\n"
            "while True:\n"
            "    c, a = s.accept()\n"
            f"    if a[0] == '{self.public}': c.sendall(b'x')\n"  # only what came through the node's home
            "    c.close()\n"), stdout=subprocess.DEVNULL)
        # the buyer reaches the web only through the tunnel (never directly)
        self.inet.run("nft", "-f", "-", input=(
            "table ip lab {\n chain forward_buyers {\n  type filter hook forward priority 0;\n"
            f"  ip saddr 100.64.0.0/24 ip daddr {WEB} drop\n }}\n}}\n"))
        self.web.popen("iperf3", "-s", "-B", WEB, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the hub
        self.hub_port = 8000 + secrets.randbelow(1000)
        self.hub_url = f"http://{HUB_ADDR}:{self.hub_port}"
        self.hub_db = tmp / "hub.sqlite"
        self.hub_proc: subprocess.Popen | None = None
        self.hub_fwd = Forwarder(self.inet.name, HUB_ADDR, self.hub_port)
        # the node
        self.wg = lab.ifname("iwn")
        self.buyer_wg = lab.ifname("iwb")
        self.node.wg_sockets.append(f"/var/run/wireguard/{self.wg}.sock")
        self.buyer.wg_sockets.append(f"/var/run/wireguard/{self.buyer_wg}.sock")
        self.state = tmp / "state"
        self.cfg = tmp / "node.toml"
        self.api_port = 18000 + secrets.randbelow(9000)
        self.cfg.write_text(_toml({
            "node": {"state_dir": str(self.state), "key_file": str(tmp / "node.key"), "price_per_gb": 0.5,
                     "log_level": "info", "marketplace": self.hub_url, "region": "DE"},
            "interfaces": {"wan": "eth0", "lan": ""},
            # no endpoint: the UPnP mapping gives it ([home] upnp_map = "auto")
            "tunnel": {"interface": self.wg, "port": self.port, "pool": self.pool,
                       "private_key_file": str(tmp / "wg.key")},
            "metering": {"poll_interval": 0.5, "line_rate_mbit": 100000, "unpaid_cap_mb": 1000},
            "sessions": {"max": 8, "address_rest": 0},
            "api": {"listen": ["127.0.0.1"], "port": self.api_port, "admin_token_file": str(tmp / "admin.token")},
            "firewall": {"required": False},
        }))
        self.agent: subprocess.Popen | None = None
        self.api_fwd = Forwarder(self.node.name, "127.0.0.1", self.api_port)
        self.log = tmp / "agent.log"
        (tmp / "client.log").touch()
        self.buyer_key = tmp / "buyer.key"

    def health(self) -> dict:
        """The node's /health, through a loopback forwarder into its namespace."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_fwd.port}/health", timeout=10) as r:
            return json.load(r)

    # --- the hub ----------------------------------------------------------------------------------
    def start_hub(self) -> None:
        logf = open(self.tmp / "hub.log", "ab")  # noqa: SIM115 (the process's)
        self.hub_proc = self.inet.popen(sys.executable, "-m", "idlewire", "hub", "serve", "--db",
                                        f"sqlite:///{self.hub_db}", "--listen", f"{HUB_ADDR}:{self.hub_port}",
                                        "--log-level", "warning", stdout=logf, stderr=logf, env=ENV)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.hub_proc.poll() is not None:
                raise RuntimeError("hub exited: " + (self.tmp / "hub.log").read_text()[-2000:])
            with contextlib.suppress(OSError, ValueError):
                self.hub("/v1")
                return
            time.sleep(0.1)
        raise RuntimeError("hub did not answer: " + (self.tmp / "hub.log").read_text()[-2000:])

    def kill_hub(self) -> None:
        """kill -9 (and any worker it started)."""
        for pid in [*_children(self.hub_proc.pid), self.hub_proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.hub_proc.wait(10)

    def hub(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.hub_fwd.port}{path}", timeout=10) as r:
            return json.load(r)

    def hub_receipts(self) -> dict[tuple[str, int], tuple[str, str]]:
        """(session, seq) -> (kind, hash) as the hub's database holds them."""
        db = sqlite3.connect(self.hub_db)
        try:
            return {(s, q): (k, h) for s, q, k, h in db.execute("SELECT session, seq, kind, hash FROM receipts")}
        finally:
            db.close()

    def hub_flags(self) -> list[tuple[str, int]]:
        db = sqlite3.connect(self.hub_db)
        try:
            return db.execute("SELECT kind, seq FROM flags").fetchall()
        finally:
            db.close()

    def hub_chain(self, sid: str) -> list[dict]:
        db = sqlite3.connect(self.hub_db)
        try:
            return [json.loads(b) for (b,) in db.execute("SELECT body FROM receipts WHERE session = ? ORDER BY seq",
                                                         (sid,))]
        finally:
            db.close()

    # --- the node ---------------------------------------------------------------------------------
    def start_agent(self) -> None:
        logf = open(self.log, "a")  # noqa: SIM115
        self.agent = self.node.popen(sys.executable, "-m", "idlewire_agent", "run", "--config", str(self.cfg),
                                     stdout=logf, stderr=subprocess.STDOUT, env=ENV)

    def kill9_agent(self) -> None:
        self.agent.send_signal(signal.SIGKILL)
        self.agent.wait()

    def stop_agent(self) -> None:
        if self.agent and self.agent.poll() is None:
            self.agent.terminate()
            self.agent.wait(15)

    def ledger(self, sql: str, *args) -> list:
        db = sqlite3.connect(self.state / "ledger.sqlite", timeout=10)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def node_receipts(self) -> dict[tuple[str, int], str]:
        from idlewire_agent import receipts as rc

        out = {}
        for s, q, b in self.ledger("SELECT session, seq, body FROM receipts"):
            r = json.loads(b)
            out[(s, q)] = r["hash"] if rc.is_checkpoint(r) else rc.receipt_hash(r)
        return out

    # --- the buyer --------------------------------------------------------------------------------
    def client(self, *args: str) -> subprocess.Popen:
        self.log_start = (self.tmp / "client.log").stat().st_size
        return self.buyer.popen("env", "--default-signal=INT", sys.executable, "-m", "idlewire", "client", "connect",
                                "--hub", self.hub_url, "--region", "DE", "--key", str(self.buyer_key),
                                "--interface", self.buyer_wg, "--json", "--route", f"{WEB}/32", *args,
                                stdout=subprocess.PIPE, stderr=open(self.tmp / "client.log", "a"), text=True,
                                env=ENV)

    def first_byte(self, timeout: float = 15) -> tuple[float, float]:
        """Tries a TCP connection to the web through the tunnel until one byte comes back: (when the
        client had its session from the hub, when the byte came)."""
        deadline = time.monotonic() + timeout
        log, got = self.tmp / "client.log", 0.0
        while time.monotonic() < deadline:
            if not got and "session " in log.read_text()[self.log_start:]:
                got = time.monotonic()
            try:
                s = ns_socket(self.buyer.name, WEB, self.echo_port, timeout=0.1)
            except OSError:
                time.sleep(0.01)
                continue
            with s, contextlib.suppress(OSError):
                s.settimeout(1)
                if s.recv(1) == b"x":
                    now = time.monotonic()
                    return got or now, now
        raise AssertionError("no byte through the tunnel: " + (self.tmp / "client.log").read_text()[-2000:]
                             + "\nagent.log: " + self.log.read_text()[-3000:])

    def stop_client(self, client: subprocess.Popen, timeout: float = 40) -> None:
        client.send_signal(signal.SIGINT)
        try:
            client.wait(timeout)
        except subprocess.TimeoutExpired:
            client.kill()
            raise AssertionError("client did not exit after Ctrl-C: " + (self.tmp / "client.log").read_text()[-2000:]
                                 ) from None

    def buyer_can_reach(self, host: str, port: int) -> bool:
        try:
            ns_socket(self.buyer.name, host, port, timeout=1).close()
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.stop_agent()
        self.hub_fwd.close()
        self.api_fwd.close()
        self.home.stop_miniupnpd()
        with contextlib.suppress(OSError):
            socket.socket().close()
