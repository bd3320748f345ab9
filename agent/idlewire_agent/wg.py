"""The WireGuard interface, driven through `ip` and `wg` (never restarted: peers come and go with
`wg set`). Kernel WireGuard when the kernel has it, else wireguard-go."""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from typing import NamedTuple

from . import run

log = logging.getLogger("idlewire.wg")

# `wg` and `ip` answer in milliseconds; one that does not (a wedged wireguard-go behind its UAPI
# socket) is killed after this long (run.py), and the agent never waits on one holding its lock
TIMEOUT = run.TIMEOUT


class WgError(run.CommandError):
    pass


class Peer(NamedTuple):  # a tuple: 1,000 of them every poll
    key: str
    rx: int  # bytes from the peer
    tx: int  # bytes to the peer


def _which(name: str) -> bool:
    """Is `name` an executable on PATH? (shutil.which without importing shutil, ~0.5 MB of RSS)"""
    return any(os.access(os.path.join(d, name), os.X_OK) for d in os.environ.get("PATH", os.defpath).split(":") if d)


def _run(*argv: str, input: str | None = None) -> str:
    return run.run(argv, input=input, timeout=TIMEOUT, error=WgError).stdout


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
        peers: dict[str, Peer] = {}
        for line in run.lines(("wg", "show", self.ifname, "transfer"), timeout=TIMEOUT, error=WgError):
            f = line.split("\t")
            if len(f) == 3:
                peers[f[0]] = Peer(f[0], int(f[1]), int(f[2]))
        return peers

    # --- set-up ---------------------------------------------------------------------------
    def ensure(self) -> bool:
        """Create and configure the interface if it is missing; True when it was (re)created."""
        created = False
        if self.ifindex() is None:
            created = True
            ok = run.run(("ip", "link", "add", self.ifname, "type", "wireguard"), timeout=TIMEOUT, check=False,
                         error=WgError).returncode == 0
            if not ok:
                if not _which("wireguard-go"):
                    raise WgError("no WireGuard kernel module and no wireguard-go: install one of them")
                env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1", "LOG_LEVEL": "error"}
                run.run(("wireguard-go", self.ifname), env=env, capture=False, timeout=TIMEOUT, error=WgError)
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
