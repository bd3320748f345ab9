#!/usr/bin/env python3
"""Metering at scale: 1,000 sessions on one node. Prints measured figures against the goals.

    sudo .venv/bin/python bench/meter.py [--sessions 1000] [--megabytes 200] [--kills 10]

Part 1 (real): the agent runs as on a node (Debian's /usr/bin/python3 with python3-cryptography,
PYTHONPATH=agent, the unit's MALLOC_ARENA_MAX, the role's entry script) in a network namespace with
a wireguard-go interface; 1,000 sessions are opened through the signed API (1,000 real WireGuard
peers), plus one real buyer (`idlewire client connect` on wireguard-go) that sends MEGABYTES up and
half as much down through the tunnel with iperf3, paced at --bitrate as the node's shaping paces a
session at its cap. Reports the agent's CPU per poll cycle (its own /metrics: poll thread + the
`wg show transfer` child), its RSS, and the metering error against the bytes the buyer's WireGuard
counted: raw, and beside it net of the UDP datagrams a receiving kernel dropped (reported, not
what the goal is judged on). Then kills the agent with SIGKILL KILLS times mid-transfer and reports
double counting, loss and `PRAGMA integrity_check`.

Part 2 (synthetic): the same poll code in-process against a synthetic counter source in which all
1,000 peers' counters change every cycle (the worst case for ledger writes, which idle real peers
do not exercise). Reports CPU per poll cycle.

Run it from the checkout it should measure, with that checkout first on PYTHONPATH (the buyer
client runs as a subprocess):
    sudo PYTHONPATH=$PWD/tools:$PWD/agent:$PWD/tests .venv/bin/python bench/meter.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "net"), str(REPO / "agent"), str(REPO / "tools")]

WG_DATA = 1452  # a full WireGuard data message on a 1420-byte MTU


def metric(node, name: str) -> float:
    for line in node.get("/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def rss_kb(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    vals = {ln.split(":")[0]: int(ln.split()[1]) for ln in status.splitlines() if ln.startswith(("VmRSS", "VmHWM"))}
    return vals["VmRSS"], vals["VmHWM"]


def open_sessions(node, n: int) -> float:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from idlewire.cmd_client import Buyer
    from idlewire_agent import keys

    t0 = time.time()
    for i in range(n):
        b = Buyer(node.url, Ed25519PrivateKey.generate())
        b.open(keys.wg_keypair()[1])
        if (i + 1) % 100 == 0:
            rate = (i + 1) / (time.time() - t0)
            print(f"  {i + 1}/{n} sessions open ({rate:.0f}/s, ETA {(n - i - 1) / rate:.0f}s)", file=sys.stderr)
    return time.time() - t0


def real(args) -> dict:
    from agentlab import NodeLab
    from netlab import Lab, have_netns

    why = have_netns()
    if why:
        sys.exit(f"bench/meter.py: {why}")
    out: dict = {}
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="iw-bench-") as tmp:
        node = NodeLab(lab, Path(tmp), 170, sessions__max=args.sessions + 10, tunnel__pool="10.170.64.0/18",
                       metering__poll_interval=args.poll, sessions__idle_timeout=3600)
        # As the service runs it: the role's unit environment and its /usr/bin/idlewire-agent script.
        node.python = ["env", f"PYTHONPATH={REPO / 'agent'}", "MALLOC_ARENA_MAX=1", args.agent_python]
        node.entry = ["-c", "import sys; from idlewire_agent.__main__ import main; sys.exit(main())"]
        node.start()
        pid = node.proc.pid
        rss0 = rss_kb(pid)[0]
        print(f"opening {args.sessions} sessions through the API (real wireguard-go peers) ...", file=sys.stderr)
        secs = open_sessions(node, args.sessions)
        out["open_seconds"] = round(secs, 1)
        peers = len(node.node.run("wg", "show", node.wg, "peers").stdout.split())
        out["peers_on_interface"] = peers
        # Polls with 1,000 idle peers.
        p0, c0 = metric(node, "idlewire_polls_total"), metric(node, "idlewire_poll_cpu_seconds_total")
        time.sleep(args.poll * 6 + 0.2)
        p1, c1 = metric(node, "idlewire_polls_total"), metric(node, "idlewire_poll_cpu_seconds_total")
        out["cpu_ms_per_poll_1000_idle_peers"] = round((c1 - c0) / max(p1 - p0, 1) * 1000, 2)
        out["polls_measured"] = int(p1 - p0)
        # One real buyer through the tunnel.
        client = node.client("--interval", "2")
        node.wait_tunnel(30)
        sid = json.loads(client.stdout.readline())["session"]  # its first co-signed report
        d0n, d0b = node.udp_drops(node.node), node.udp_drops(node.buyer)
        print(f"sending {args.megabytes} MB up and {args.megabytes // 2} MB down through the tunnel, paced at "
              f"{args.bitrate}bit/s ...", file=sys.stderr)
        p0, c0 = metric(node, "idlewire_polls_total"), metric(node, "idlewire_poll_cpu_seconds_total")
        t0 = time.time()
        up = node.iperf(args.megabytes, bitrate=args.bitrate)
        down = node.iperf(args.megabytes // 2, reverse=True, bitrate=args.bitrate)
        secs = time.time() - t0
        assert up.returncode == 0 and down.returncode == 0, up.stderr + down.stderr
        time.sleep(args.poll * 2 + 0.5)
        p1, c1 = metric(node, "idlewire_polls_total"), metric(node, "idlewire_poll_cpu_seconds_total")
        out["cpu_ms_per_poll_1000_peers_with_traffic"] = round((c1 - c0) / max(p1 - p0, 1) * 1000, 2)
        b_up, b_down = node.buyer_counters()
        ses = node.session(sid)
        drops_up = (node.udp_drops(node.node) - d0n) * WG_DATA
        drops_down = (node.udp_drops(node.buyer) - d0b) * WG_DATA
        out["transfer"] = {"seconds": round(secs, 1), "paced_at": args.bitrate, "iperf_mbit_s": round(
            json.loads(up.stdout)["end"]["sum_sent"]["bits_per_second"] / 1e6, 1)}
        out["wire_up_bytes"] = b_up
        out["wire_down_bytes"] = b_down
        out["metered_up_bytes"] = ses["up"]
        out["metered_down_bytes"] = ses["down"]
        out["udp_dropped_bytes_up_down"] = [drops_up, drops_down]
        out["error_up_percent_raw"] = round((ses["up"] - b_up) / b_up * 100, 4)
        out["error_down_percent_raw"] = round((ses["down"] - b_down) / b_down * 100, 4)
        out["error_up_percent_net_of_udp_drops"] = round((ses["up"] - (b_up - drops_up)) / b_up * 100, 4)
        out["error_down_percent_net_of_udp_drops"] = round((ses["down"] - (b_down + drops_down)) / b_down * 100, 4)
        rss, hwm = rss_kb(pid)
        roll = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path(f"/proc/{pid}/smaps_rollup").read_text()
                .splitlines()[1:]}
        out["agent_rss_mb"] = {"at_start": round(rss0 / 1024, 1), "now": round(rss / 1024, 1),
                               "peak": round(hwm / 1024, 1),
                               "private_uss": round((roll["Private_Clean"] + roll["Private_Dirty"]) / 1024, 1),
                               "shared_with_other_processes": round(roll["Shared_Clean"] / 1024, 1)}
        out["agent_python"] = subprocess.run([args.agent_python, "-c", "import sys, cryptography; print("
                                              "sys.version.split()[0], 'cryptography', cryptography.__version__)"],
                                             capture_output=True, text=True).stdout.strip()
        if args.kills:
            out["kill9"] = kills(node, sid, args)
        client.terminate()
        client.wait(20)
        node.stop()
    return out


def kills(node, sid: str, args) -> dict:
    print(f"kill -9 the agent {args.kills} times mid-transfer ...", file=sys.stderr)
    rate = 80
    before_b, _ = node.buyer_counters()
    before_n = node.session(sid)["up"]
    iperf = node.buyer.popen("iperf3", "-c", f"{node.wan}.2", "-t", str(int(args.kills * 2.5 + 5)), "-b",
                             f"{rate}M", "--fq-rate", f"{rate}M", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d0 = node.udp_drops(node.node)
    for i in range(args.kills):
        time.sleep(1.0 + secrets.randbelow(500) / 1000)
        node.kill9()
        time.sleep(0.2)
        node.start()
        print(f"  kill {i + 1}/{args.kills}", file=sys.stderr)
    iperf.wait(120)
    time.sleep(args.poll * 2 + 0.5)
    b_up, _ = node.buyer_counters()
    n_up = node.session(sid)["up"]
    sent = b_up - before_b
    counted = n_up - before_n
    return {"kills": args.kills, "sent_bytes": sent, "counted_bytes": counted,
            "difference_bytes": counted - sent, "udp_dropped_bytes": (node.udp_drops(node.node) - d0) * WG_DATA,
            "one_poll_interval_bytes_at_rate": int(rate * 1e6 / 8 * args.poll),
            "integrity_check": node.integrity()}


def synthetic(args) -> dict:
    from idlewire_agent import keys
    from idlewire_agent.agent import Agent
    from idlewire_agent.config import parse
    from synthetic import SyntheticTunnel

    with tempfile.TemporaryDirectory(prefix="iw-bench-") as tmp:
        cfg = parse({"node": {"state_dir": f"{tmp}/state", "key_file": f"{tmp}/node.key"},
                     "tunnel": {"pool": "10.99.0.0/16", "private_key_file": f"{tmp}/wg.key"},
                     "sessions": {"max": args.sessions + 1, "idle_timeout": 86400},
                     "metering": {"unpaid_cap_mb": 1e6},
                     "api": {"admin_token_file": f"{tmp}/admin.token"}})
        t = SyntheticTunnel()
        a = Agent(cfg, t)
        wg = [keys.wg_keypair()[1] for _ in range(args.sessions)]
        for k in wg:
            a.open_session("buyer", k)
        a.poll()
        cpu = []
        for _ in range(args.cycles):
            for k in wg:
                t.traffic(k, 1_000_000, 3_000_000)
            c0 = time.thread_time()
            a.poll()
            cpu.append(time.thread_time() - c0)
        total = sum(a.describe(s["id"])["up"] for s in a.ledger.sessions("open", limit=1 << 30))
        cpu.sort()
        return {"source": "synthetic counter source (all peers change every cycle)", "sessions": args.sessions,
                "cycles": args.cycles, "cpu_ms_per_poll_median": round(cpu[len(cpu) // 2] * 1000, 2),
                "cpu_ms_per_poll_p95": round(cpu[int(len(cpu) * 0.95)] * 1000, 2),
                "counted_exactly": total == args.sessions * args.cycles * 1_000_000}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--megabytes", type=int, default=200)
    p.add_argument("--bitrate", default="50M", help="pace of the metered transfer (iperf3 -b and --fq-rate), as "
                   "the node's shaping paces a session at its cap; 0 = as fast as it goes")
    p.add_argument("--agent-python", default="/usr/bin/python3", help="the interpreter the agent runs on "
                   "(default: Debian's, with python3-cryptography)")
    p.add_argument("--poll", type=float, default=5.0, help="agent poll interval, seconds")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--cycles", type=int, default=40, help="synthetic poll cycles")
    p.add_argument("--skip-real", action="store_true", help="only the synthetic part (no root needed)")
    p.add_argument("--json", action="store_true", help="print JSON only")
    args = p.parse_args()
    res = {"synthetic": synthetic(args)}
    if not args.skip_real:
        res["real"] = real(args)
    res["bench_self_cpu_s"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 1)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(json.dumps(res, indent=1))
    s, r = res["synthetic"], res.get("real")
    print("\nsummary (goal in brackets)")
    print(f"  CPU per poll, {s['sessions']} peers all changing (synthetic counters): "
          f"{s['cpu_ms_per_poll_median']} ms median, {s['cpu_ms_per_poll_p95']} ms p95  [<= 50 ms]")
    if r:
        print(f"  CPU per poll, {r['peers_on_interface']} real wireguard-go peers, idle: "
              f"{r['cpu_ms_per_poll_1000_idle_peers']} ms; with one active buyer: "
              f"{r['cpu_ms_per_poll_1000_peers_with_traffic']} ms  [<= 50 ms]")
        print(f"  agent RSS ({r['agent_python']}): {r['agent_rss_mb']['now']} MB now, "
              f"{r['agent_rss_mb']['peak']} MB peak, of which {r['agent_rss_mb']['shared_with_other_processes']} MB "
              f"shared libraries; private {r['agent_rss_mb']['private_uss']} MB  [<= 30 MB]")
        print(f"  metering error vs the buyer's WireGuard bytes, paced at {r['transfer']['paced_at']}: up "
              f"{r['error_up_percent_raw']} %, down {r['error_down_percent_raw']} % raw  [<= 1 %]; UDP bytes the "
              f"receiving kernel dropped: {r['udp_dropped_bytes_up_down']}, net of them: up "
              f"{r['error_up_percent_net_of_udp_drops']} %, down {r['error_down_percent_net_of_udp_drops']} %")
        if "kill9" in r:
            k = r["kill9"]
            print(f"  kill -9 x{k['kills']}: counted {k['counted_bytes']} of {k['sent_bytes']} bytes sent "
                  f"(difference {k['difference_bytes']}, of which UDP dropped {k['udp_dropped_bytes']}; one poll "
                  f"interval = {k['one_poll_interval_bytes_at_rate']}); integrity_check {k['integrity_check']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
