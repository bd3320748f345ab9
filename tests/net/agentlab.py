"""A node running the real agent, a buyer and an "internet" namespace, for the agent's net tests.

    node  --(10.X.1.0/24, "lan": buyer reaches node API and WireGuard port)--  buyer
    node  --(10.X.2.0/24, "wan")--  internet (iperf3 server; routes the pool back via node)

The agent runs as `python -m idlewire_agent run` inside the node namespace; the test reaches its
API through a loopback forwarder whose upstream sockets are opened inside that namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000


def enter_netns(nsname: str) -> None:
    """Move the calling thread (only it) into network namespace `nsname`: sockets it opens from
    then on belong there, and stay there when other threads use them."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{nsname}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def ns_socket(nsname: str, host: str, port: int, timeout: float = 10) -> socket.socket:
    """A TCP connection made from inside a network namespace (the thread enters it, then exits)."""
    out: list = []

    def enter():
        try:
            enter_netns(nsname)
            out.append(socket.create_connection((host, port), timeout=timeout))
        except OSError as exc:
            out.append(exc)

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc/*/stat), for saying where a stuck process waits."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


class Forwarder:
    """127.0.0.1:PORT in the test's namespace -> host:port inside a lab namespace."""

    def __init__(self, nsname: str, host: str, port: int):
        self.target = (nsname, host, port)
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket):
        try:
            u = ns_socket(*self.target)
        except OSError:
            c.close()
            return

        def pump(a, b):
            try:
                while True:
                    d = a.recv(65536)
                    if not d:
                        break
                    b.sendall(d)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    b.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=pump, args=(u, c), daemon=True)
        t.start()
        pump(c, u)
        t.join(20)
        c.close()
        u.close()

    def close(self):
        self.stop = True
        self.srv.close()


class NodeLab:
    def __init__(self, lab, tmp: Path, n: int, **overrides):
        self.lab, self.tmp = lab, tmp
        self.node, self.buyer, self.inet = lab.ns("node"), lab.ns("buyer"), lab.ns("inet")
        self.lan = f"10.{n}.1"
        self.wan = f"10.{n}.2"
        self.pool = overrides.get("tunnel__pool", f"10.{n}.8.0/24")
        lab.link(self.node, f"{self.lan}.1/24", self.buyer, f"{self.lan}.2/24")
        lab.link(self.node, f"{self.wan}.1/24", self.inet, f"{self.wan}.2/24")
        self.node.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.inet.run("ip", "route", "add", self.pool, "via", f"{self.wan}.1")
        self.wg = lab.ifname("iwn")
        self.buyer_wg = lab.ifname("iwb")
        # The agent and the client may start wireguard-go: the lab removes its sockets at the end.
        self.node.wg_sockets.append(f"/var/run/wireguard/{self.wg}.sock")
        self.buyer.wg_sockets.append(f"/var/run/wireguard/{self.buyer_wg}.sock")
        self.port = 51000 + secrets.randbelow(9000)
        self.api_port = 18000 + secrets.randbelow(9000)
        self.cfg = tmp / "node.toml"
        self.state = tmp / "state"
        self.token_file = tmp / "admin.token"
        sections = {
            "node": {"state_dir": str(self.state), "key_file": str(tmp / "node.key"), "price_per_gb": 0.5,
                     "log_level": "info"},
            "interfaces": {"wan": "v2a", "lan": "v1a"},
            "tunnel": {"interface": self.wg, "port": self.port, "pool": self.pool,
                       "private_key_file": str(tmp / "wg.key")},
            "metering": {"poll_interval": 0.5, "line_rate_mbit": 100000, "unpaid_cap_mb": 1000},
            "sessions": {"max": 8},
            "api": {"listen": [f"{self.lan}.1"], "port": self.api_port, "admin_token_file": str(self.token_file)},
            # Metering tests run without the isolation table (tests/net/test_isolation.py covers it);
            # test_agent_refuses_sessions_without_isolation turns the requirement back on.
            "firewall": {"required": False},
        }
        write_node_toml(self.cfg, sections, overrides)
        self.proc: subprocess.Popen | None = None
        # How the agent is started; bench/meter.py uses Debian's python3 and python3-cryptography,
        # as on a node.
        self.python: list[str] = [sys.executable]
        # ... and its entry point; bench/meter.py uses what the role's /usr/bin/idlewire-agent runs.
        self.entry: list[str] = ["-m", "idlewire_agent"]
        self.log = tmp / "agent.log"
        self.fwd: Forwarder | None = None
        self.api_host = f"{self.lan}.1"  # where the forwarder connects inside the node namespace
        self._down_server = ""
        self.iperf_server = self.inet.popen("iperf3", "-s", "-B", f"{self.wan}.2", stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)

    # --- the agent ------------------------------------------------------------------------
    def start(self) -> None:
        logf = open(self.log, "a")  # noqa: SIM115 (kept open for the process)
        self.proc = self.node.popen(*self.python, *self.entry, "run", "--config", str(self.cfg),
                                    stdout=logf, stderr=subprocess.STDOUT)
        if self.fwd is None:
            self.fwd = Forwarder(self.node.name, self.api_host, self.api_port)
        deadline = time.time() + 15
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited: {self.log.read_text()[-2000:]}")
            try:
                self.get("/health")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"agent did not answer: {self.log.read_text()[-2000:]}")

    def stop_client(self, client: subprocess.Popen, timeout: float = 30) -> None:
        """Ctrl-C to `idlewire client connect` (it closes its session and saves its receipts); if
        it does not exit in `timeout` s (two requests of a 10 s timeout each at worst), fail with
        where the client waits and every thread's stack of the agent (SIGUSR1), not a bare timeout."""
        client.send_signal(signal.SIGINT)
        try:
            client.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        where = []
        for pid in [client.pid, *_children(client.pid)]:
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
                wchan = Path(f"/proc/{pid}/wchan").read_text()
                where.append(f"pid {pid} ({cmd}) waits in {wchan}")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
        client.kill()
        raise AssertionError(f"the client did not exit {timeout:g} s after Ctrl-C: {'; '.join(where)}\n"
                             f"client.log: {(self.tmp / 'client.log').read_text()[-1500:]}\n"
                             f"agent.log: {self.log.read_text()[-6000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.fwd:
            self.fwd.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.fwd.port}"

    def get(self, path: str, admin: bool = False):
        req = urllib.request.Request(self.url + path)  # noqa: S310 (loopback forwarder)
        if admin:
            req.add_header("Authorization", f"Bearer {self.token_file.read_text().strip()}")
        with urllib.request.urlopen(req, timeout=20) as r:  # noqa: S310
            body = r.read()
        return json.loads(body) if r.headers.get("Content-Type", "").startswith("application/json") else body.decode()

    def session(self, sid: str) -> dict:
        return self.get(f"/sessions/{sid}", admin=True)

    def integrity(self) -> str:
        db = sqlite3.connect(self.state / "ledger.sqlite")
        try:
            return db.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            db.close()

    # --- the buyer ------------------------------------------------------------------------
    def client(self, *args: str) -> subprocess.Popen:
        """`idlewire client connect` in the buyer namespace (JSON reports on stdout)."""
        # Ctrl-C reaches it as it reaches a program in the foreground of a terminal: a test run
        # started in the background of a shell has SIGINT ignored, and that is inherited (Python
        # then installs no KeyboardInterrupt handler, and the client would ignore stop_client)
        return self.buyer.popen("env", "--default-signal=INT", sys.executable, "-m", "idlewire", "client",
                                "connect", f"http://{self.lan}.1:{self.api_port}", "--key", str(self.tmp / "buyer.key"),
                                "--interface", self.buyer_wg, "--json", "--route", f"{self.wan}.0/24", *args,
                                stdout=subprocess.PIPE, stderr=open(self.tmp / "client.log", "a"), text=True)

    def wait_tunnel(self, timeout: float = 15) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.buyer.run("ping", "-c1", "-W1", f"{self.wan}.2", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("tunnel did not come up: " + (self.tmp / "client.log").read_text()[-2000:])

    def buyer_counters(self) -> tuple[int, int]:
        """(up, down) as the buyer's WireGuard interface counted them."""
        f = self.buyer.run("wg", "show", self.buyer_wg, "dump").stdout.splitlines()[1].split("\t")
        return int(f[6]), int(f[5])

    @staticmethod
    def udp_drops(ns) -> int:
        """Datagrams the namespace's kernel dropped before a socket read them (receive buffer full)."""
        lines = [ln.split() for ln in ns.run("cat", "/proc/net/snmp").stdout.splitlines() if ln.startswith("Udp:")]
        return int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])

    def iperf(self, megabytes: int, reverse: bool = False, bitrate: str = "50M") -> subprocess.CompletedProcess:
        """MEGABYTES through the tunnel with iperf3 (TCP): up (buyer -> internet) or, reverse, down.

        The sender is paced to `bitrate` (`-b` and `--fq-rate`: the kernel spaces the packets) as a
        buyer session is when the node shapes it to its cap; bitrate "0" sends as fast as it can.
        Down runs the client in the internet namespace against a server on the buyer's tunnel
        address, so that the pacing is certainly the sender's.
        """
        pace = [] if bitrate in ("0", "0M") else ["-b", bitrate, "--fq-rate", bitrate]
        if not reverse:
            return self.buyer.run("iperf3", "-c", f"{self.wan}.2", "-n", f"{megabytes}M", *pace, "-J", timeout=300)
        addr = self.buyer_address()
        if self._down_server != addr:
            self.buyer.popen("iperf3", "-s", "-B", addr, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._down_server = addr
            time.sleep(0.3)
        return self.inet.run("iperf3", "-c", addr, "-n", f"{megabytes}M", *pace, "-J", timeout=300)

    def buyer_address(self) -> str:
        """The buyer's tunnel address (on its WireGuard interface)."""
        links = json.loads(self.buyer.run("ip", "-j", "-4", "addr", "show", "dev", self.buyer_wg).stdout)
        return links[0]["addr_info"][0]["local"]

    def open_sessions(self) -> list[dict]:
        return self.get("/sessions?state=open", admin=True)


def wait_for(cond, timeout=15.0, step=0.2):
    """cond()'s first true value, polled every `step` s; AssertionError after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("timed out")


def metric(node: NodeLab, name: str) -> float:
    """One value of the agent's /metrics."""
    for line in node.get("/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def write_node_toml(path: Path, sections: dict, overrides: dict) -> None:
    """node.toml from `sections`, with `overrides` given as SECTION__KEY=value."""
    for key, value in overrides.items():
        sec, k = key.split("__")
        sections.setdefault(sec, {})[k] = value
    path.write_text(_toml(sections))


def _toml(sections: dict) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        for k, v in values.items():
            out.append(f"{k} = {json.dumps(v)}")
        out.append("")
    return "\n".join(out)
