#!/usr/bin/env python3
"""Node and router mode bench: how fast the buyers' share follows the owner, and what the owner keeps.

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

Router mode (source "router"): the node is the home router, so the owner's traffic crosses its
shaper. The lab (run_router) is the node's namespace holding the roles' rendered firewall and
router tables (as tests/net/test_router.py loads them), a WAN port to the internet through the
same modem-like TBF line (deep queue), and br-lan with the owner's laptop on it; the real agent
runs there with home.mode = "router" and shaping on, its line set to --router-shape of the modem's
rate (the sqm habit: the queue must live in the node, not the modem). There is no cap to watch
(router mode measures nothing: the HTB tree gives the owner priority packet by packet), so the
follow figures are read from the buyer's own rate (iperf3 intervals of 0.2 s): follow down = the
first interval after the owner starts where the buyer gets <= line - 80 % (+ margin), follow up =
the first after the owner stops where the buyer is back at 90 % of its rate before. Two more
figures for issue 17's router test: "owner full", the owner's unpaced download with the buyer
saturating its cap / (line - floor) (goal >= 0.9), and the ping p95 added by the buyer alone
(goal <= 20 ms) and by the owner's own 80 % download alone (the part of "ping p95 +" that is his).

    sudo .venv/bin/python bench/idle.py [--line 40] [--seconds 20] [--sources upnp,latency,router]
                                        [--cc reno|bbr] [--trace DIR] [--json]

The senders' TCP decides what the modem's queue does: a loss-based one (reno, cubic) fills it
as a bufferbloated line does, BBR keeps it short (5-8 ms here: this lab's base RTT is 0.1 ms and
this kernel has no netem to give it a real one). A new namespace inherits the host's choice;
--cc sets it in the lab's senders. --trace keeps each node-mode run's cap and delay samples.

Goal (issue 17): the cap follows in <= 3 s. Figures only: nothing here is asserted.
The node-mode lines are read from /health's cap; the router line from the buyer's rate.
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

from homelab import IPERF3, HomeLab, HomeNode, congestion_control, have_homelab
from netlab import Lab, have_netns
from rolerender import render
from shapelab import ping_p95

SERVER, ISP, PUBLIC, LAN_GW, OWNER = "11.22.0.2", "11.22.33.1", "11.22.33.2", "192.168.8.1", "192.168.8.10"


def run_source(source: str, line: float, seconds: float, interval: float, latency_ms: float,
               trace: Path | None = None, cc: str | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"idle-{source}-"))
    with Lab() as lab:
        home = HomeLab(lab, tmp / "lab", upnp=source == "upnp", line_down_mbit=line, line_up_mbit=line / 4, cc=cc)
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
        if trace:  # the run's samples, times from the owner's start: to see why a figure came out as it did
            trace.write_text(json.dumps({"t_on": 0, "t_off": round(t_off - t_on, 3),
                                         "cap_down": [(round(t - t_on, 3), c) for t, c in samples],
                                         "delay_ms": [(round(t - t_on, 3), d) for t, d in delays]}))
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


class RouterHome:
    """Router mode's home: the node is the router (what HomeNode needs of a HomeLab: lab, node).

        srv 11.22.0.2 ── inet ── up1 (the modem: TBF at the line rate, 150 ms queue) ── wan0 11.22.33.2
                                                                                     node (router)
                                                     owner 192.168.8.10 ── lan1 ── br-lan 192.168.8.1

    The node's namespace holds the roles' firewall.nft and router.nft (buyers' NAT block, the
    owner's NAT outside it), the agent's HTB line trees on wan0 and its IFB."""

    def __init__(self, lab: Lab, tmp: Path, line_down_mbit: float, queue_ms: int = 150, cc: str | None = None):
        self.lab, self.tmp = lab, tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.inet, self.server = lab.ns("inet"), lab.ns("srv")
        self.node, self.owner = lab.ns("rtr"), lab.ns("own")
        self.server_ip = SERVER
        ia, ib = lab.link(self.inet, "11.22.0.1/24", self.server, f"{SERVER}/24")
        self.server.run("ip", "route", "add", "default", "via", "11.22.0.1")
        # veth hands 64 KiB GSO aggregates across, a wire carries one MTU (tests/shapelab.py does the
        # same): the sender's aggregates would land in the modem's queue as one burst, and one takes
        # 14 ms to leave at 38 Mbit/s, waits no owner's ping has behind a real line
        self.inet.run("ip", "link", "set", ia, "gso_max_segs", "1")
        self.server.run("ip", "link", "set", ib, "gso_max_segs", "1")
        self.inet.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        inet_if, _ = lab.link(self.inet, f"{ISP}/24", self.node, f"{PUBLIC}/24", names=("up1", "wan0"))
        HomeLab._tbf(self.inet, inet_if, line_down_mbit, queue_ms)
        self.inet.run("ip", "link", "set", inet_if, "gso_max_segs", "1")
        self.node.run("ip", "link", "set", "wan0", "gso_max_segs", "1")
        n = self.node.run
        n("ip", "route", "add", "default", "via", ISP)
        n("sysctl", "-qw", "net.ipv4.ip_forward=1")
        # br-lan and one LAN port, as 10-idlewire-br-lan.* and 11-idlewire-lan-ports.network make them
        n("ip", "link", "add", "br-lan", "type", "bridge")
        n("ip", "addr", "add", f"{LAN_GW}/24", "dev", "br-lan")
        n("ip", "link", "set", "br-lan", "up")
        lab.link(self.node, None, self.owner, f"{OWNER}/24", names=("lan1", "eth0"))
        n("ip", "link", "set", "lan1", "master", "br-lan")
        n("ip", "link", "set", "lan1", "gso_max_segs", "1")
        self.owner.run("ip", "link", "set", "eth0", "gso_max_segs", "1")
        self.owner.run("ip", "route", "add", "default", "via", LAN_GW)
        if cc:
            congestion_control(cc, self.server, self.owner, self.node)

    def load_tables(self, tunnel: str) -> None:
        wan_vars = {"agent_wan_interface": "wan0", "agent_tunnel_interface": tunnel}
        for name in ("firewall.nft", "router.nft"):
            f = self.tmp / name
            f.write_text(render("firewall", f"etc/idlewire/{name}.j2", wan_vars))
            self.node.run("nft", "-f", str(f))

    # the internet's iperf3 server and the owner's download: HomeLab's own (the same server, server_ip
    # and owner attributes), so both homes measure the owner the same way
    iperf_server = HomeLab.iperf_server
    owner_download = HomeLab.owner_download


def run_router(line: float, seconds: float, shape: float, cc: str | None = None) -> dict:
    """Router mode: the owner's figures with a buyer saturating its cap through the node's shaper."""
    tmp = Path(tempfile.mkdtemp(prefix="idle-router-"))
    cfg_line = round(line * shape, 2)  # what the owner configures: a little under the modem's rate
    cap, floor = cfg_line * 0.75, cfg_line / 40
    want = cfg_line * 0.8
    with Lab() as lab:
        home = RouterHome(lab, tmp / "lab", line, cc=cc)
        node = HomeNode(home, tmp / "node", **{
            "interfaces__wan": "wan0", "home__mode": "router",
            "shaping__enabled": True, "shaping__line_down_mbit": cfg_line, "shaping__line_up_mbit": cfg_line / 4,
            "shaping__cap_down_mbit": cap, "shaping__cap_up_mbit": cfg_line / 8, "shaping__floor_down_mbit": floor,
            "shaping__floor_up_mbit": cfg_line / 160})
        home.load_tables(node.wg)
        for port in (5201, 5202, 5203):
            home.iperf_server(port)
        node.start()
        try:
            deadline = time.time() + 20  # the shaper's line trees: an HTB root on wan0 and on its IFB
            while time.time() < deadline and home.node.run("tc", "qdisc", "show").stdout.count("htb 1: root") < 2:
                time.sleep(0.5)
            idle_p95 = ping_p95(home.owner, SERVER, 40, 0.05)
            owner = home.owner_download(8, mbit=want)
            time.sleep(3)
            alone_p95 = ping_p95(home.owner, SERVER, 40, 0.05)  # what the owner's own download adds
            out, _ = owner.communicate(timeout=60)
            alone = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
            total = seconds * 3 + 40
            # the buyer stand-in: a download to the buyers' NAT port block (what a buyer's clear traffic
            # is on the WAN), every 0.2 s of it recorded
            t_buyer = time.monotonic()
            buyer = home.node.popen(*IPERF3, "-c", SERVER, "-p", "5202", "-R", "-J", "-i", "0.2", "-t", str(total),
                                    "--cport", "61500", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(5)
            buyer_p95 = ping_p95(home.owner, SERVER, 40, 0.05)  # the buyer alone, saturating its cap
            # the owner takes all it can (unpaced) with the buyer on: what "owner first" leaves him
            out, _ = home.owner_download(8, port=5203).communicate(timeout=60)
            full = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
            time.sleep(6)
            t_on = time.monotonic()
            owner = home.owner_download(seconds, mbit=want)
            time.sleep(min(seconds / 2, 8))
            busy_p95 = ping_p95(home.owner, SERVER, 40, 0.05)
            out, _ = owner.communicate(timeout=seconds + 30)
            t_off = time.monotonic()
            got = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
            bout, _ = buyer.communicate(timeout=total + 60)
        finally:
            node.stop()
    # the buyer's rate per interval, on the monotonic clock (its start ~ t_buyer: a local connect)
    rates = [(t_buyer + iv["sum"]["end"], iv["sum"]["bits_per_second"] / 1e6) for iv in json.loads(bout)["intervals"]]
    margin = cfg_line * 0.1
    down_at = next((t for t, r in rates if t >= t_on + 0.2 and r <= cfg_line - want + margin), None)
    before = sorted(r for t, r in rates if t_on - 3 <= t < t_on) or [cap]
    buyer_before = before[len(before) // 2]
    up_at = next((t for t, r in rates if t >= t_off + 0.2 and r >= 0.9 * buyer_before), None)
    during = sorted(r for t, r in rates if t_on + 3 <= t <= t_off)
    return {"source": "router", "line_mbit": line, "shaped_line_mbit": cfg_line, "owner_asked_mbit": want,
            "follow_down_s": round(down_at - t_on, 2) if down_at else None,
            "follow_up_s": round(up_at - t_off, 2) if up_at else None,
            "owner_ratio": round(got / want, 3), "owner_alone_ratio": round(alone / want, 3),
            "owner_full_mbit": round(full, 2), "owner_full_ratio": round(full / (cfg_line - floor), 3),
            "ping_p95_idle_ms": idle_p95,
            "ping_p95_added_ms": round(busy_p95 - idle_p95, 1),
            "ping_p95_added_buyer_only_ms": round(buyer_p95 - idle_p95, 1),
            "ping_p95_added_owner_only_ms": round(alone_p95 - idle_p95, 1),
            # the node-mode columns, here the buyer's own rate (Mbit/s): before the owner, median during
            "cap_before_mbit": round(buyer_before, 1),
            "cap_min_mbit": round(during[len(during) // 2], 1) if during else None,
            "delay_p95_buyer_only_ms": None, "delay_p95_owner_ms": None}


def host_cc() -> str:
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def p95(values: list[float]) -> float | None:
    values = sorted(values)
    return round(values[int(len(values) * 0.95)], 1) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--line", type=float, default=40, help="the home line's download in Mbit/s (upload: 1/4)")
    ap.add_argument("--seconds", type=float, default=20, help="how long the owner downloads")
    ap.add_argument("--interval", type=float, default=1.0, help="[home] interval, seconds")
    ap.add_argument("--sources", default="upnp,latency,router",
                    help="comma-separated: upnp, latency (node mode), router (router mode)")
    ap.add_argument("--router-shape", type=float, default=0.95,
                    help="router mode: the line the node shapes to, as a fraction of the modem's rate")
    ap.add_argument("--latency-ms", type=float, default=15, help="[home] latency_ms for the latency source")
    ap.add_argument("--cc", help="the senders' TCP congestion control (default: this host's, "
                    f"{host_cc()}): loss-based reno/cubic fill a bufferbloated modem's queue, bbr keeps it "
                    "short; a namespace may use those in net.ipv4.tcp_allowed_congestion_control")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--trace", type=Path, metavar="DIR",
                    help="node mode: write each source's cap and delay samples to DIR/<source>.json")
    args = ap.parse_args()
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
    allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split()
    if args.cc and args.cc not in allowed:
        print(f"bench/idle.py: --cc {args.cc}: a namespace may only use {', '.join(allowed)} "
              "(net.ipv4.tcp_allowed_congestion_control)", file=sys.stderr)
        return 2
    why = have_netns() or have_homelab()
    if why:
        print(f"bench/idle.py: {why}", file=sys.stderr)
        return 2
    rows = [run_router(args.line, args.seconds, args.router_shape, args.cc) if s == "router" else
            run_source(s, args.line, args.seconds, args.interval, args.latency_ms,
                       args.trace / f"{s}.json" if args.trace else None, args.cc) for s in args.sources.split(",")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    load = os.getloadavg()[0]
    print(f"line {args.line:g} Mbit/s, owner 0 -> 80 % -> 0, node mode interval {args.interval:g} s, "
          f"latency_ms {args.latency_ms:g}, TCP {args.cc or host_cc()}, load {load:.1f}")
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
    for r in rows:
        if r["source"] == "router":
            print(f"router: shaped line {r['shaped_line_mbit']:g} Mbit/s; the cap columns are the buyer's rate; "
                  f"owner full {r['owner_full_mbit']:g} Mbit/s = {r['owner_full_ratio']:.3f} of line - floor "
                  f"(goal >= 0.9); ping p95 + {r['ping_p95_added_buyer_only_ms']:g} ms with the buyer alone "
                  f"(goal <= 20 ms), + {r['ping_p95_added_owner_only_ms']:g} ms with the owner's 80 % alone")
    print("goal: the cap follows in <= 3 s (issue 17)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
