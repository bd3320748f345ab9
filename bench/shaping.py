#!/usr/bin/env python3
"""Shaping bench: achieved/cap per cap and direction, owner latency idle vs loaded, leaf qdisc used.

Runs in network namespaces (root): owner LAN host, node, buyer (wireguard-go tunnel), internet host;
see tests/shapelab.py. Every figure is measured with iperf3 (TCP) and device byte counters:

  * buyer caps (through the tunnel): the cap counts IP bytes in the tunnel (what is metered);
    "IP/cap" is measured on the receiving device, "goodput/cap" is iperf3's TCP payload rate;
  * line (WAN veth, owner traffic, no tunnel): frames per second against the line rate;
  * owner with a buyer saturating its cap: owner's download and ping p95 idle vs loaded;
  * "CPU wait" (PSI cpu some) per run: how starved the machine was while measuring.

    sudo .venv/bin/python bench/shaping.py [--seconds 10] [--caps 5,20,100] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from idlewire_agent.shaping import ifb_name
from netlab import Lab, have_netns
from shapelab import (
    BUYER_TUN,
    INTERNET_HOST,
    IPERF3,
    MBIT,
    ShapeLab,
    cpu_stall_us,
    measured_transfer,
    ping_p95,
    received_bps,
)


def pressured(fn):
    """Run fn(); return its result and the share of wall time tasks waited for a CPU meanwhile."""
    s0, t0 = cpu_stall_us(), time.monotonic()
    out = fn()
    return out, (cpu_stall_us() - s0) / 1e6 / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10, help="length of each measured transfer (default 10)")
    ap.add_argument("--caps", default="5,20,100", help="buyer caps in Mbit/s, comma-separated")
    ap.add_argument("--line", type=float, default=100, help="line rate for the line and owner runs, Mbit/s")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    why = have_netns()
    if why:
        print(f"bench/shaping.py: {why}", file=sys.stderr)
        return 2
    caps = [float(c) for c in args.caps.split(",")]
    secs = args.seconds
    results: dict = {"seconds": secs, "buyer": [], "line": [], "owner": {}}
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        sl = ShapeLab.build(lab, Path(tmp))
        sl.iperf_server(port=5201)
        sl.iperf_server(port=5202)
        shaper = sl.shaper(sl.shaping(line_up=1000 * MBIT, line_down=1000 * MBIT))
        shaper.setup()
        shaper.add_session("bench", [BUYER_TUN])
        results["leaf_qdisc"] = shaper.leaf
        total = len(caps) * 2 + 2 + 1
        done = 0

        def progress(what: str) -> None:
            nonlocal done
            done += 1
            print(f"[{done}/{total}] {what}", file=sys.stderr, flush=True)

        for cap in caps:
            shaper.set_caps(int(cap * MBIT), int(cap * MBIT))
            for direction in ("up", "down"):
                down = direction == "down"
                counter = (sl.buyer, sl.wg_buyer, "rx") if down else (sl.node, ifb_name(sl.wg_node), "tx")
                (ip, good, _), cpu = pressured(
                    lambda: measured_transfer(sl.buyer, INTERNET_HOST, secs, down, 5201, counter))  # noqa: B023
                results["buyer"].append({"cap_mbit": cap, "direction": direction, "ip_mbit": ip / MBIT,
                                         "cpu_pressure": cpu,
                                         "goodput_mbit": good / MBIT, "ip_ratio": ip / (cap * MBIT),
                                         "goodput_ratio": good / (cap * MBIT)})
                progress(f"buyer {direction} {cap:g} Mbit/s")
        line = int(args.line * MBIT)
        shaper = sl.shaper(sl.shaping(line_up=line, line_down=line, overhead=0))
        shaper.setup()
        for direction in ("up", "down"):
            down = direction == "down"
            counter = (sl.lan, "eth0", "rx") if down else (sl.inet, "up0", "rx")
            (rate, good, _), cpu = pressured(
                lambda: measured_transfer(sl.lan, INTERNET_HOST, secs, down, 5201, counter))  # noqa: B023
            results["line"].append({"line_mbit": args.line, "direction": direction, "frames_mbit": rate / MBIT,
                                    "cpu_pressure": cpu,
                                    "goodput_mbit": good / MBIT, "ratio": rate / line})
            progress(f"line {direction} {args.line:g} Mbit/s")
        # Owner priority: buyer saturates a 20 Mbit/s cap while the owner downloads.
        floor, cap = 10 * MBIT, 20 * MBIT
        shaper = sl.shaper(sl.shaping(line_up=line, line_down=line, floor_up=floor, floor_down=floor,
                                      cap_up=cap, cap_down=cap))
        shaper.cap_up = shaper.cap_down = cap
        shaper.setup()
        idle = ping_p95(sl.lan, INTERNET_HOST, 100)
        out = Path(tmp) / "buyer.json"
        with out.open("w") as f:
            buyer = sl.buyer.popen(*IPERF3, "-c", INTERNET_HOST, "-p", "5202", "-J", "-R", "-t", str(secs + 3),
                                   stdout=f, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        loaded: dict = {}
        pinger = threading.Thread(target=lambda: loaded.update(p95=ping_p95(sl.lan, INTERNET_HOST,
                                                                            int(secs * 10), 0.1)))
        pinger.start()
        (owner_rate, owner_good, _), cpu = pressured(
            lambda: measured_transfer(sl.lan, INTERNET_HOST, secs, True, 5201, (sl.lan, "eth0", "rx")))
        pinger.join()
        buyer.wait(timeout=60)
        buyer_good = received_bps(json.loads(out.read_text()))
        results["owner"] = {"line_mbit": line / MBIT, "floor_mbit": floor / MBIT, "buyer_cap_mbit": cap / MBIT,
                            "owner_frames_mbit": owner_rate / MBIT, "owner_goodput_mbit": owner_good / MBIT,
                            "owner_share_of_line_minus_floor": owner_rate / (line - floor),
                            "buyer_goodput_mbit": buyer_good / MBIT,
                            "ping_p95_idle_ms": idle, "ping_p95_loaded_ms": loaded["p95"], "cpu_pressure": cpu}
        progress("owner priority")
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"leaf qdisc: {results['leaf_qdisc']}"
          + (" (fallback; this kernel has neither fq_codel nor cake)" if results["leaf_qdisc"] == "bfifo" else ""))
    print(f"\nbuyer caps through the WireGuard tunnel, {secs:g} s TCP runs")
    print(f"{'cap Mbit/s':>10} {'dir':>5} {'IP Mbit/s':>10} {'IP/cap':>7} {'goodput':>8} {'goodput/cap':>11} "
          f"{'CPU wait':>8}")
    for r in results["buyer"]:
        print(f"{r['cap_mbit']:>10g} {r['direction']:>5} {r['ip_mbit']:>10.2f} {r['ip_ratio']:>7.3f} "
              f"{r['goodput_mbit']:>8.2f} {r['goodput_ratio']:>11.3f} {r['cpu_pressure']:>8.0%}")
    print(f"\nline shaping on the WAN veth (owner traffic, no tunnel), {secs:g} s TCP runs")
    print(f"{'line Mbit/s':>11} {'dir':>5} {'frames Mbit/s':>14} {'frames/line':>11} {'goodput':>8} {'CPU wait':>8}")
    for r in results["line"]:
        print(f"{r['line_mbit']:>11g} {r['direction']:>5} {r['frames_mbit']:>14.2f} {r['ratio']:>11.3f} "
              f"{r['goodput_mbit']:>8.2f} {r['cpu_pressure']:>8.0%}")
    o = results["owner"]
    print(f"\nowner download while a buyer saturates its {o['buyer_cap_mbit']:g} Mbit/s cap "
          f"(line {o['line_mbit']:g}, buyer floor {o['floor_mbit']:g} Mbit/s)")
    print(f"  owner {o['owner_frames_mbit']:.1f} Mbit/s frames ({o['owner_goodput_mbit']:.1f} goodput) = "
          f"{o['owner_share_of_line_minus_floor']:.3f} of line - floor; buyer {o['buyer_goodput_mbit']:.1f} goodput")
    print(f"  owner ping p95: idle {o['ping_p95_idle_ms']:.2f} ms, loaded {o['ping_p95_loaded_ms']:.2f} ms "
          f"(+{o['ping_p95_loaded_ms'] - o['ping_p95_idle_ms']:.2f} ms); CPU wait {o['cpu_pressure']:.0%}")
    print("\nCPU wait: share of the time some task waited for a CPU (PSI); the cores are shared with other"
          "\njobs, and high values mean the traffic sources, not the shaper, set the pace.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
