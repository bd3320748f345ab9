#!/usr/bin/env python3
"""Node-mode bench: how fast the buyers' cap follows the owner, UPnP counters vs latency estimator.

In the home-router lab (tests/homelab.py: Debian's miniupnpd as the home router, a TBF line with a
modem-deep queue) the real agent runs on the owner's LAN in node mode with shaping on. A buyer
stand-in downloads through the node without pause: a TCP download from the internet to a port
in the buyers' masquerade block (what a buyer's clear traffic looks like on the node's WAN), so
the node's real line trees shape it to the buyers' cap. The owner then steps 0 -> 80 % -> 0 of
the line (iperf3 -R paced at 80 %). Per source:

  * follow down: seconds from the owner's start until cap_down <= line - 80 % (+ margin)
  * follow up: seconds from the owner's stop until cap_down is back to 90 % of where it was
    before the owner started (with the buyer loading the node: "cap before")
  * owner ratio: the owner's received rate / what it asked for (80 % of the line), with the buyer
    loading the node; "(alone)": the same without the buyer (what the lab itself gives)
  * ping p95 added: owner's ping p95 to the internet while busy, minus on the idle line

    sudo .venv/bin/python bench/idle.py [--line 40] [--seconds 20] [--json]

Goal (issue 17): the cap follows in <= 3 s. Figures only: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from homelab import IPERF3, HomeLab, HomeNode, have_homelab
from netlab import Lab, have_netns
from shapelab import ping_p95


def run_source(source: str, line: float, seconds: float, interval: float, latency_ms: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"idle-{source}-"))
    with Lab() as lab:
        home = HomeLab(lab, tmp / "lab", upnp=source == "upnp", line_down_mbit=line, line_up_mbit=line / 4)
        cap = line * 0.75
        node = HomeNode(home, tmp / "node", **{
            "shaping__enabled": True, "shaping__line_down_mbit": line, "shaping__line_up_mbit": line / 4,
            "shaping__cap_down_mbit": cap, "shaping__cap_up_mbit": line / 8, "shaping__floor_down_mbit": line / 40,
            "shaping__floor_up_mbit": line / 160, "home__interval": interval, "home__source": source,
            "home__reflectors": [home.server_ip], "home__latency_ms": latency_ms})
        home.iperf_server(5201)
        home.iperf_server(5202)
        node.start()
        samples: list[tuple[float, float]] = []
        delays: list[tuple[float, float]] = []  # latency source: its delay above baseline, ms
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                with contextlib.suppress(OSError, KeyError):
                    f = node.get("/health")["idle"]
                    samples.append((time.monotonic(), f["cap_down_mbit"]))
                    if f.get("delay_ms") is not None:
                        delays.append((time.monotonic(), f["delay_ms"]))
                stop.wait(0.1)

        try:
            deadline = time.time() + 40
            while time.time() < deadline and node.get("/health").get("idle", {}).get("source") != source:
                time.sleep(0.5)
            idle_p95 = ping_p95(home.owner, home.server_ip, 40, 0.05)
            # the owner alone on the line, for reference: what the lab gives it without buyers
            want = line * 0.8
            out, _ = home.owner_download(5, mbit=want).communicate(timeout=60)
            alone = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
            # the buyer stand-in: a download to the node's buyer NAT port block, all the time
            threading.Thread(target=watch, daemon=True).start()
            buyer = home.node.popen(*IPERF3, "-c", home.server_ip, "-p", "5202", "-R", "-t", str(seconds * 3 + 30),
                                    "--cport", "61500", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(8)
            t_on = time.monotonic()
            owner = home.owner_download(seconds, mbit=want)
            time.sleep(min(seconds / 2, 8))
            busy_p95 = ping_p95(home.owner, home.server_ip, 40, 0.05)
            out, _ = owner.communicate(timeout=seconds + 30)
            t_off = time.monotonic()
            got = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
            time.sleep(max(20, seconds))
            stop.set()
            buyer.kill()
        finally:
            node.stop()
        margin = line * 0.1
        down_at = next((t for t, c in samples if t >= t_on and c <= line - want + margin), None)
        before = sorted(c for t, c in samples if t_on - 3 <= t < t_on) or [cap]
        cap_before = before[len(before) // 2]
        up_at = next((t for t, c in samples if t >= t_off and c >= 0.9 * cap_before), None)
        return {"source": source, "line_mbit": line, "owner_asked_mbit": want,
                "follow_down_s": round(down_at - t_on, 2) if down_at else None,
                "follow_up_s": round(up_at - t_off, 2) if up_at else None,
                "owner_ratio": round(got / want, 3), "owner_alone_ratio": round(alone / want, 3),
                "ping_p95_idle_ms": idle_p95,
                "ping_p95_added_ms": round(busy_p95 - idle_p95, 1),
                "cap_before_mbit": cap_before,
                "cap_min_mbit": min((c for t, c in samples if t_on <= t <= t_off), default=None),
                # what the latency source saw with the buyer alone (before the owner): its false alarms
                "delay_p95_buyer_only_ms": p95([d for t, d in delays if t < t_on]),
                "delay_p95_owner_ms": p95([d for t, d in delays if t_on + 3 <= t <= t_off])}


def p95(values: list[float]) -> float | None:
    values = sorted(values)
    return round(values[int(len(values) * 0.95)], 1) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--line", type=float, default=40, help="the home line's download in Mbit/s (upload: 1/4)")
    ap.add_argument("--seconds", type=float, default=20, help="how long the owner downloads")
    ap.add_argument("--interval", type=float, default=1.0, help="[home] interval, seconds")
    ap.add_argument("--sources", default="upnp,latency", help="comma-separated: upnp, latency")
    ap.add_argument("--latency-ms", type=float, default=15, help="[home] latency_ms for the latency source")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    why = have_netns() or have_homelab()
    if why:
        print(f"bench/idle.py: {why}", file=sys.stderr)
        return 2
    rows = [run_source(s, args.line, args.seconds, args.interval, args.latency_ms) for s in args.sources.split(",")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    load = os.getloadavg()[0]
    print(f"node mode, line {args.line:g} Mbit/s, owner 0 -> 80 % -> 0, interval {args.interval:g} s, "
          f"latency_ms {args.latency_ms:g}, load {load:.1f}")
    print(f"{'source':8} {'follow down':>12} {'follow up':>10} {'owner ratio':>12} {'(alone)':>8} {'ping p95 +':>11} "
          f"{'cap before':>10} {'cap min':>8}")
    for r in rows:
        def s(v, unit=""):
            return "never" if v is None else f"{v:g}{unit}"
        print(f"{r['source']:8} {s(r['follow_down_s'], ' s'):>12} {s(r['follow_up_s'], ' s'):>10} "
              f"{r['owner_ratio']:>12.3f} {r['owner_alone_ratio']:>8.3f} {s(r['ping_p95_added_ms'], ' ms'):>11} "
              f"{s(r['cap_before_mbit']):>10} "
              f"{s(r['cap_min_mbit']):>8}"
              + (f"  delay p95 {s(r['delay_p95_buyer_only_ms'], ' ms')} buyer only, "
                 f"{s(r['delay_p95_owner_ms'], ' ms')} with the owner" if r["delay_p95_owner_ms"] is not None else ""))
    print("goal: the cap follows in <= 3 s (issue 17)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
