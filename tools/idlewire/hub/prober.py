"""The hub's prober: buy a short session from a node as an ordinary buyer would (the reference
client's own code: POST /v1/connect, a WireGuard interface, co-signed usage relayed through the
hub, the close), measure throughput and latency through the tunnel against the cap the node
advertises, and store the result (economy.record_probe) for settlement to judge.

The prober buys with the hub's statement key: settlement knows that buyer as the prober
(rules.probes.prober_buyer), whose word alone makes a node's inflated count an offence.

Measurement, through the tunnel only (the target's network is routed into it):
  latency    median TCP connect time to TARGET's host:port, 3 tries
  throughput the bytes WireGuard received while reading TARGET (an HTTP URL serving more than the
             node can send in SECONDS) for SECONDS, x 8 / seconds
A node that cannot be reached (no channel, no answer, no handshake) is a probe with reached=False.
Needs root (it creates a network interface), like `idlewire client connect`.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import time
import urllib.request
from urllib.parse import urlsplit

from . import economy


def _latency_ms(host: str, port: int, tries: int = 3, timeout: float = 3.0) -> float | None:
    got = []
    for _ in range(tries):
        t = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=timeout):
                got.append((time.monotonic() - t) * 1000)
        except OSError:
            continue
    return statistics.median(got) if got else None


def _read_for(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=max(1.0, seconds)) as resp:  # noqa: S310 (the operator's URL)
            while time.monotonic() < deadline and resp.read(1 << 16):
                pass


def probe(engine, eco: economy.Economy, hub_url: str, node: dict, target: str, seconds: float,
          interface: str = "iwprobe0") -> dict:
    """Probe one node (a row of queries.nodes) and store the result; returns the stored row."""
    from ..cmd_client import HubBuyer, NodeError, bring_up, counters, parse_endpoint, tear_down
    from ..errors import UserError

    nid, adv = node["id"], float(node["caps"].get("down_mbit") or 0)
    parts = urlsplit(target)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    from idlewire_agent import keys

    priv, pub = keys.wg_keypair()
    buyer = HubBuyer(hub_url, eco.key)
    try:
        got = buyer.hub("POST", "/v1/connect", {"wg_public_key": pub, "node": nid})
    except NodeError as exc:
        return economy.record_probe(engine, nid, False, 0, adv, 0, f"connect: {exc}")
    buyer.node = got["node"]
    s = got["session"]
    sid = s["session"]
    opened = False
    try:
        if not got.get("endpoint"):
            return economy.record_probe(engine, nid, False, 0, adv, 0, "no public endpoint")
        ep_host, ep_port = parse_endpoint(got["endpoint"])
        bring_up(interface, priv, {**s, "endpoint_host": ep_host, "endpoint_port": ep_port}, ep_host,
                 [f"{socket.gethostbyname(host)}/32"])
        opened = True
        latency = _latency_ms(host, port)
        if latency is None:
            return economy.record_probe(engine, nid, False, 0, adv, 0, f"no connection to {host}:{port} "
                                        "through the tunnel")
        _, down0 = counters(interface)
        t = time.monotonic()
        try:
            _read_for(target, seconds)
        except OSError as exc:
            detail = f"reading {target}: {exc}"
        else:
            detail = ""
        elapsed = time.monotonic() - t
        up, down = counters(interface)
        mbit = (down - down0) * 8 / max(elapsed, 1e-6) / 1e6
        try:
            buyer.cosign(sid, up, down)  # the prober pays for what it used, as any buyer
        except NodeError as exc:
            detail = (detail + f"; co-sign: {exc}").lstrip("; ")
        return economy.record_probe(engine, nid, True, mbit, adv, latency,
                                    detail or f"{mbit:.1f} of {adv:g} Mbit/s, {latency:.0f} ms")
    except UserError as exc:
        return economy.record_probe(engine, nid, False, 0, adv, 0, str(exc))
    finally:
        with contextlib.suppress(NodeError):
            buyer.close(sid)
        if opened:
            tear_down(interface)
