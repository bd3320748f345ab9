"""A small network lab for tests: namespaces, veth links, bridges and wireguard-go, cleaned up.

Every name carries a per-lab random prefix, so parallel test runs never collide, and every
address used lives inside the lab's own namespaces (or loopback): test traffic stays here.

    with Lab() as lab:
        node, buyer = lab.ns("node"), lab.ns("buyer")
        lab.link(node, "10.77.0.1/24", buyer, "10.77.0.2/24")
        buyer.run("ping", "-c1", "10.77.0.1")
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field


def have_netns() -> str | None:
    """Why network-namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not shutil.which("ip"):
        return "needs iproute2"
    return None


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


@dataclass
class Netns:
    name: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    wg_sockets: list[str] = field(default_factory=list)

    def run(self, *argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.name, *argv, check=check, **kw)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)
        self.procs.append(p)
        return p

    def wireguard(self, ifname: str) -> None:
        """A WireGuard interface: the kernel's when it has one, else wireguard-go (userspace).

        wireguard-go's control socket is /var/run/wireguard/IFNAME.sock, which namespaces do not
        separate: give every WireGuard interface on the machine its own name (Lab.ifname).
        """
        if self.run("ip", "link", "add", ifname, "type", "wireguard", check=False).returncode == 0:
            return
        env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1",
               "LOG_LEVEL": "error"}
        # It daemonises: its child would hold captured pipes open forever, so no capture here.
        subprocess.run(["ip", "netns", "exec", self.name, "wireguard-go", ifname], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wg_sockets.append(f"/var/run/wireguard/{ifname}.sock")
        for _ in range(100):
            if self.run("ip", "link", "show", ifname, check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"wireguard-go did not create {ifname} in {self.name}")


class Lab:
    def __init__(self) -> None:
        self.prefix = "iw" + secrets.token_hex(3)
        self.namespaces: list[Netns] = []
        self._n = 0

    def ns(self, role: str) -> Netns:
        ns = Netns(f"{self.prefix}-{role}")
        sh("ip", "netns", "add", ns.name)
        ns.run("ip", "link", "set", "lo", "up")
        self.namespaces.append(ns)
        return ns

    def ifname(self, base: str) -> str:
        """An interface name unique on this machine (for wireguard-go's shared socket directory)."""
        self._n += 1
        return f"{base[:6]}{self.prefix[2:]}{self._n}"[:15]

    def link(self, a: Netns, addr_a: str | None, b: Netns, addr_b: str | None,
             names: tuple[str, str] | None = None) -> tuple[str, str]:
        """A veth pair between two namespaces, addressed and up; returns the interface names."""
        self._n += 1
        ia, ib = names or (f"v{self._n}a", f"v{self._n}b")
        tmp_a, tmp_b = f"{self.prefix}{self._n}a", f"{self.prefix}{self._n}b"
        sh("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        sh("ip", "link", "set", tmp_a, "netns", a.name, "name", ia)
        sh("ip", "link", "set", tmp_b, "netns", b.name, "name", ib)
        for ns, ifname, addr in ((a, ia, addr_a), (b, ib, addr_b)):
            if addr:
                ns.run("ip", "addr", "add", addr, "dev", ifname)
            ns.run("ip", "link", "set", ifname, "up")
        return ia, ib

    def close(self) -> None:
        for ns in self.namespaces:
            for p in ns.procs:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        p.kill()
            # wireguard-go daemonises: kill what still runs inside the namespace.
            pids = sh("ip", "netns", "pids", ns.name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", ns.name, check=False)
            for sock in ns.wg_sockets:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sock)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_for(fn, timeout: float = 30, every: float = 0.5, what: str = "condition"):
    """fn()'s first true value, asked every `every` seconds; AssertionError naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)
