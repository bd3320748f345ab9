"""The home router over UPnP IGD (or NAT-PMP): the WireGuard port mapped for buyers, and the
router's WAN byte counters.

Driven through miniupnpc's `upnpc` CLI, which Debian (miniupnpc) and OpenWrt (miniupnpc) both
package; nothing is linked or pip-installed. `upnpc -s` discovers the IGD once (SSDP, ~2 s); every
later call names its description URL (`-u`) and takes milliseconds. A router with NAT-PMP only
is driven with libnatpmp's `natpmpc` (Debian package natpmpc), mapping but no counters.

* **Port mapping** (`PortMapper`): UDP `[tunnel] port` on the router's public address → this
  node's LAN address, same port (another one if a second node behind the same router holds it),
  leased for `[home] upnp_lease` s and renewed at half the lease; removed when the agent stops.
  `status()` is what /health, the log and the hub report: the public endpoint, or "not
  reachable from the internet: forward UDP PORT to this node (ADDR) on your router".
* **WAN counters** (`Igd.counters()`): `GetTotalBytesReceived/Sent` of the router's WAN, which
  idle.py turns into the owner's traffic. IGD v1 counters are 32-bit: `wrap_delta` handles the wrap.

Every command goes through `run()`, over run.py (the agent's one way to run a command): each has a
timeout, so a hung router cannot hang the agent.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
import socket
import threading
import time

from . import run as _run

log = logging.getLogger("idlewire.upnp")

UPNPC = "upnpc"
NATPMPC = "natpmpc"
DESCRIPTION = "idlewire"
WRAP = 1 << 32


def run(argv: list[str], timeout: float = 10) -> tuple[int, str]:
    """(exit code, stdout+stderr) of a command through run.py (its timeout, its process-group kill,
    its ledger-lock check); 127 when missing, 124 on timeout."""
    try:
        p = _run.run(argv, timeout=timeout, check=False)
    except _run.CommandError as exc:
        if "not found" in str(exc):
            return 127, f"{argv[0]}: not installed"
        if "no answer" in str(exc):
            return 124, f"{argv[0]}: no answer in {timeout:g} s"
        return 126, str(exc)
    return p.returncode, (p.stdout or "") + (p.stderr or "")


def _field(text: str, pattern: str) -> str | None:
    m = re.search(pattern, text, re.M)
    return clean(m[1]) if m else None


def clean(text: str, limit: int = 200) -> str:
    """What a router (or anything answering SSDP on the LAN) said, safe for /health and the log:
    printable ASCII only, bounded."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


def wrap_delta(new: int, old: int) -> int:
    """Bytes between two readings of a counter that may be 32-bit (IGD v1): a counter that went
    down wrapped when the old reading fits 32 bits, else it was reset (count the new value)."""
    if new >= old:
        return new - old
    return new + WRAP - old if old < WRAP else new


class Igd:
    """One Internet Gateway Device found on the LAN (what `upnpc -s` printed)."""

    how = "upnp"

    def __init__(self, url: str, lan_ip: str, external_ip: str):
        self.url, self.lan_ip, self.external_ip = url, lan_ip, external_ip

    @classmethod
    def parse(cls, text: str) -> Igd | None:
        url = _field(text, r"^\s*desc:\s*(\S+)")
        if not url or not re.search(r"^Found valid IGD", text, re.M):
            return None
        return cls(url, _field(text, r"^Local LAN ip address\s*:\s*(\S+)") or "",
                   _field(text, r"^ExternalIPAddress\s*=\s*(\S+)") or "")

    def counters(self, timeout: float = 5) -> tuple[int, int] | None:
        """(bytes received, bytes sent) on the router's WAN, or None when it does not say."""
        rc, out = run([UPNPC, "-u", self.url, "-s"], timeout)
        m = re.search(r"^Bytes:\s*Sent:\s*(\d+)\s+Recv:\s*(\d+)", out, re.M)
        if rc != 0 or not m:
            return None
        ext = _field(out, r"^ExternalIPAddress\s*=\s*(\S+)")
        if ext:
            self.external_ip = ext
        return int(m[2]), int(m[1])

    def add(self, lan_ip: str, port: int, ext_port: int, lease: int) -> tuple[bool, str]:
        rc, out = run([UPNPC, "-u", self.url, "-e", DESCRIPTION, "-a", lan_ip, str(port), str(ext_port),
                       "UDP", str(lease)])
        ok = rc == 0 and re.search(rf"external \S+:{ext_port} UDP is redirected", out) is not None
        why = _field(out, r"(AddPortMapping\(.*)$") or clean((out.strip().splitlines() or ["no answer"])[-1])
        return ok, why

    def delete(self, ext_port: int) -> bool:
        rc, out = run([UPNPC, "-u", self.url, "-d", str(ext_port), "UDP"])
        return rc == 0 and "failed" not in out


class NatPmp(Igd):
    """A router that speaks NAT-PMP (RFC 6886) but not UPnP IGD, driven with libnatpmp's
    `natpmpc` (Debian: natpmpc; OpenWrt: natpmpc? not packaged everywhere). No byte counters."""

    how = "nat-pmp"

    @classmethod
    def probe(cls, timeout: float = 10) -> NatPmp | None:
        rc, out = run([NATPMPC], timeout)
        ext = _field(out, r"^Public IP address\s*:\s*(\S+)")
        gw = _field(out, r"^using gateway\s*:\s*(\S+)")
        if rc != 0 or not ext:
            return None
        return cls(f"nat-pmp://{gw}", lan_address(gw or "192.0.2.1"), ext)

    def counters(self, timeout: float = 5) -> tuple[int, int] | None:
        return None

    def add(self, lan_ip: str, port: int, ext_port: int, lease: int) -> tuple[bool, str]:
        rc, out = run([NATPMPC, "-a", str(ext_port), str(port), "udp", str(lease)])
        got = _field(out, r"^Mapped public port (\d+) protocol UDP")
        if rc == 0 and got == str(ext_port):
            self.internal = port  # NAT-PMP removes a mapping by its internal port
            return True, ""
        return False, f"NAT-PMP mapping refused ({clean((out.strip().splitlines() or ['no answer'])[-1])})"

    def delete(self, ext_port: int) -> bool:
        rc, out = run([NATPMPC, "-a", "0", str(getattr(self, "internal", ext_port)), "udp", "0"])
        return rc == 0 and re.search(r"^Mapped public port 0 ", out, re.M) is not None


def discover(timeout: float = 10) -> tuple[Igd | None, str]:
    """(the IGD, "") or (None, why not): one SSDP discovery with `upnpc -s`, then NAT-PMP to the
    default gateway with `natpmpc` when no IGD answered."""
    rc, out = run([UPNPC, "-s"], timeout)
    igd = Igd.parse(out)
    if igd is not None:
        return igd, ""
    if rc == 127:
        why = "upnpc is not installed (Debian/OpenWrt package miniupnpc)"
    elif "No IGD UPnP Device found" in out or "No valid UPNP Internet Gateway Device found" in out:
        why = "no UPnP IGD answered on the LAN (UPnP off on the router?)"
    elif re.search(r"Found a \(not connected\?\) IGD", out):
        why = "the router's UPnP IGD says its WAN is not connected"
    else:
        why = clean((out.strip().splitlines() or ["upnpc failed"])[-1])
    pmp = NatPmp.probe(timeout)
    if pmp is not None:
        return pmp, ""
    return None, why + "; no NAT-PMP either"


def lan_address(towards: str = "192.0.2.1") -> str:
    """The address this host leaves by towards `towards` (by default the internet: behind a home
    router, its LAN address), from the routing table: a UDP socket connected, no packet sent. ""
    when there is no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((towards, 5351))
            return s.getsockname()[0]
    except OSError:
        return ""


def is_public(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return ip.is_global


class PortMapper:
    """Keeps the WireGuard port mapped on the home router while the agent runs.

    `run(stop)` discovers the router, maps, renews at half the lease and retries discovery every
    `retry` s while there is none; on stop the mapping is removed. `status()` is thread-safe.
    """

    def __init__(self, port: int, lease: int = 3600, retry: float = 60, discover_fn=discover, on_public=None):
        self.port, self.lease, self.retry = port, lease, retry
        self.discover = discover_fn
        self.on_public = on_public  # called with the router's public address (isolation.Guard.report)
        self.igd: Igd | None = None
        self.ext_port: int | None = None
        self.why = "not checked yet"
        self.renewed = 0.0
        self.lock = threading.Lock()
        self.checked = threading.Event()  # set after the first attempt: the market registers then

    def endpoint(self) -> str:
        """HOST:PORT the internet reaches this node's WireGuard at through the mapping, or ""."""
        with self.lock:
            return f"{self.igd.external_ip}:{self.ext_port}" if self.igd and self.ext_port else ""

    def status(self) -> dict:
        """What /health and the hub report: reachable with the endpoint, or why not and the fix."""
        with self.lock:
            if self.igd is not None and self.ext_port is not None:
                return {"reachable": True, "how": self.igd.how, "endpoint": f"{self.igd.external_ip}:{self.ext_port}",
                        "lan_address": self.igd.lan_ip, "lease_s": self.lease, "renewed": round(self.renewed)}
            lan = (self.igd.lan_ip if self.igd else "") or lan_address() or "this node's LAN address"
            return {"reachable": False, "why": self.why,
                    "message": f"not reachable from the internet: forward UDP {self.port} on your router to {lan}",
                    "fix": f"forward UDP {self.port} to {lan} on the home router, or enable UPnP IGD on it"}

    def map_once(self) -> bool:
        """Discover if needed and (re)map; True when the port is mapped."""
        igd = self.igd
        if igd is None:
            igd, why = self.discover()
            if igd is None:
                with self.lock:
                    self.why = why
                return False
        if not is_public(igd.external_ip):
            with self.lock:
                self.igd, self.ext_port = igd, None
                self.why = (f"the router's WAN address {igd.external_ip or '?'} is not public (double NAT or "
                            "carrier-grade NAT): a mapping on it does not reach the internet")
            return False
        if self.on_public is not None:  # buyers are kept from the router's public address too
            self.on_public(igd.external_ip)
        wanted = [self.ext_port or self.port] + [random.randrange(49152, 65536) for _ in range(3)]  # noqa: S311
        why = ""
        for ext in wanted:
            ok, why = igd.add(igd.lan_ip, self.port, ext, self.lease)
            if ok:
                with self.lock:
                    first = self.ext_port is None
                    self.igd, self.ext_port, self.renewed, self.why = igd, ext, time.time(), ""
                if first:
                    log.info("UDP %d mapped on the home router (%s): buyers reach this node at %s:%d (lease %d s)",
                             self.port, igd.how, igd.external_ip, ext, self.lease)
                return True
            if "718" not in why and "Conflict" not in why:
                break
        with self.lock:
            self.igd, self.ext_port = None, None  # rediscover next time (the router may have changed)
            self.why = f"the router refused the mapping: {why}"
        return False

    def remove(self) -> None:
        with self.lock:
            igd, ext = self.igd, self.ext_port
            self.ext_port = None
            self.why = "the agent stopped"
        if igd is not None and ext is not None:
            if igd.delete(ext):
                log.info("UDP %d mapping removed from the home router", ext)
            else:
                log.warning("could not remove the UDP %d mapping from the home router (it expires with its lease)",
                            ext)

    def run(self, stop: threading.Event) -> None:
        was = None
        while not stop.is_set():
            try:
                ok = self.map_once()
            except Exception:  # a router's odd answer must not stop renewals
                log.exception("UPnP port mapping failed")
                ok = False
            self.checked.set()
            if ok is not was and not ok:  # once when it becomes so, not at every retry
                log.warning("%s (%s)", self.status()["message"], self.why)
            was = ok
            stop.wait(max(5.0, self.lease / 2) if ok else self.retry)
        self.remove()
