"""The WireGuard interface, driven through `ip` and `wg` (never restarted: peers come and go with
`wg set`). Kernel WireGuard when the kernel has it, else wireguard-go."""

from __future__ import annotations

import ipaddress
import logging
import os
import subprocess
import threading
import time
from typing import NamedTuple

log = logging.getLogger("idlewire.wg")

# `wg` and `ip` answer in milliseconds; one that does not (a wedged wireguard-go behind its UAPI
# socket) must not hold the agent's lock, and with it the API and the metering, for ever
TIMEOUT = 10.0


class WgError(Exception):
    pass


class Peer(NamedTuple):  # a tuple: 1,000 of them every poll
    key: str
    rx: int  # bytes from the peer
    tx: int  # bytes to the peer


def _which(name: str) -> bool:
    """Is `name` an executable on PATH? (shutil.which without importing shutil, ~0.5 MB of RSS)"""
    return any(os.access(os.path.join(d, name), os.X_OK) for d in os.environ.get("PATH", os.defpath).split(":") if d)


def _no_answer(argv) -> WgError:
    return WgError(f"{' '.join(argv[:4])}: no answer in {TIMEOUT:g} s (killed)")


def _run(*argv: str, input: str | None = None) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, input=input, check=False, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise _no_answer(argv) from None
    if p.returncode != 0:
        raise WgError(f"{' '.join(argv[:4])}: {p.stderr.strip() or p.returncode}")
    return p.stdout


class Tunnel:
    def __init__(self, ifname: str, port: int, private_key: str, address: str):
        self.ifname = ifname
        self.port = port
        self.private_key = private_key
        self.address = address  # the node's address with the pool's prefix, e.g. 10.99.0.1/16

    # --- state ----------------------------------------------------------------------------
    def ifindex(self) -> int | None:
        try:
            with open(f"/sys/class/net/{self.ifname}/ifindex") as f:
                return int(f.read())
        except (FileNotFoundError, ValueError):
            return None

    def dump(self) -> dict[str, Peer]:
        """Per-peer counters from `wg show IF transfer` (rx = from the peer, tx = to the peer).

        Read line by line from the pipe: with 1,000 peers the whole output never sits in memory
        (and, unlike `wg show dump`, it does not carry the interface's private key).
        """
        argv = ("wg", "show", self.ifname, "transfer")
        peers: dict[str, Peer] = {}
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
            killed = threading.Event()

            def kill() -> None:
                killed.set()
                p.kill()

            watchdog = threading.Timer(TIMEOUT, kill)
            watchdog.start()
            try:
                for line in p.stdout:
                    f = line.split("\t")
                    if len(f) == 3:
                        peers[f[0]] = Peer(f[0], int(f[1]), int(f[2]))
                err = p.stderr.read()
            finally:
                watchdog.cancel()
        if killed.is_set():
            raise _no_answer(argv)
        if p.returncode != 0:
            raise WgError(f"{' '.join(argv)}: {err.strip() or p.returncode}")
        return peers

    # --- set-up ---------------------------------------------------------------------------
    def ensure(self) -> bool:
        """Create and configure the interface if it is missing; True when it was (re)created."""
        created = False
        if self.ifindex() is None:
            created = True
            ok = subprocess.run(["ip", "link", "add", self.ifname, "type", "wireguard"],
                                capture_output=True, check=False).returncode == 0
            if not ok:
                if not _which("wireguard-go"):
                    raise WgError("no WireGuard kernel module and no wireguard-go: install one of them")
                env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1", "LOG_LEVEL": "error"}
                subprocess.run(["wireguard-go", self.ifname], env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for _ in range(100):
                    if self.ifindex() is not None:
                        break
                    time.sleep(0.05)
                else:
                    raise WgError(f"wireguard-go did not create {self.ifname}")
            log.info("created WireGuard interface %s", self.ifname)
        _run("wg", "set", self.ifname, "private-key", "/dev/stdin", "listen-port", str(self.port),
             input=self.private_key + "\n")
        _run("ip", "address", "replace", self.address, "dev", self.ifname)
        _run("ip", "link", "set", self.ifname, "up")
        return created

    def add_peer(self, key: str, address: str) -> None:
        host = ipaddress.ip_interface(address).ip
        _run("wg", "set", self.ifname, "peer", key, "allowed-ips", f"{host}/{host.max_prefixlen}")

    def remove_peer(self, key: str) -> None:
        _run("wg", "set", self.ifname, "peer", key, "remove")
