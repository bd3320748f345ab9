"""Shaping, schedule, quota and isolation with real packets: namespaces, wireguard-go, tc, nft, iperf3.

One lab per module (owner LAN host, node, buyer, internet host; see tests/shapelab.py); each test
sets the shaper up the way it needs through the same incremental API the agent uses. Transfers are
4 s (bench/shaping.py runs the 10 s figures).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import threading
import time

import pytest
from idlewire_agent import isolation
from idlewire_agent.policy import DAYS, Quota, Rule
from idlewire_agent.quota import QuotaKeeper
from idlewire_agent.schedule import Scheduler
from idlewire_agent.shaping import ifb_name
from netlab import Lab, have_netns
from shapelab import (
    ADMIN_PORT,
    BUYER_TUN,
    INTERNET_HOST,
    IPERF3,
    LAN_HOST,
    MBIT,
    NODE_LAN,
    NODE_TUN,
    NODE_WAN,
    PRIVATE_TARGETS,
    ShapeLab,
    cpu_stall_us,
    iperf,
    listen,
    measured_transfer,
    ping_ok,
    ping_p95,
    received_bps,
    tcp_reachable,
)

pytestmark = pytest.mark.net
SECONDS = 4


@pytest.fixture(scope="module")
def sl(tmp_path_factory):
    why = have_netns()
    if why:
        pytest.skip(why)
    with Lab() as lab:
        s = ShapeLab.build(lab, tmp_path_factory.mktemp("shapelab"))
        s.iperf_server(port=5201)
        s.iperf_server(port=5202)
        s.iperf_server(s.lan, port=5203)
        yield s


def fresh_shaper(sl, **kw):
    """The shaper after an agent start: trees brought to the config (diffed, not rebuilt)."""
    shaper = sl.shaper(sl.shaping(**kw))
    shaper.cap_up, shaper.cap_down = shaper.sh.cap_up, shaper.sh.cap_down  # what the schedule would set
    shaper.setup()
    shaper.add_session("buyer-1", [BUYER_TUN])
    return shaper



def check_rate(measure, limit: float, what: str) -> None:
    """Achieved/limit within [0.95, 1.00] (1 % for sampling counters from a subprocess).

    The two cores are shared with other jobs (image builds, QEMU guests). When the machine is so
    overloaded that tasks wait for a CPU most of the time (PSI cpu "some" > 60 % during the run), or
    the shaping queue ran empty for more than a tenth of the time (a CPU-starved source), the run
    says nothing about the shaper: it is repeated once, and if every run was starved the test is
    skipped with the figures. A run on a machine with CPU to spare must reach the cap; no run may
    exceed it.
    """
    def run():
        s0, t0 = cpu_stall_us(), time.monotonic()
        rate, goodput, empty = measure()
        return rate, goodput, empty, (cpu_stall_us() - s0) / 1e6 / (time.monotonic() - t0)

    runs = [run()]
    if runs[0][0] < 0.95 * limit:
        runs.append(run())
    msg = f"{what}: " + ", ".join(f"{r / MBIT:.2f} Mbit/s ({r / limit:.3f}, goodput {g / MBIT:.2f}, "
                                  f"queue empty {e:.0%}, CPU pressure {c:.0%})" for r, g, e, c in runs)
    assert all(r <= 1.01 * limit and g <= limit for r, g, _, _ in runs), msg  # never above the cap
    best = max(runs)
    if best[0] < 0.95 * limit and all(e > 0.10 or c > 0.60 for _, _, e, c in runs):
        pytest.skip(f"CPU-starved runs, not a shaping measurement: {msg}")
    assert best[0] >= 0.95 * limit, msg


@pytest.mark.parametrize("cap", [5, 20, 100])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_buyer_cap_accuracy_through_tunnel(sl, cap, direction):
    """Caps count IP bytes in the tunnel (what the ledger meters); TCP goodput is ~96 % of that.

    Measured on devices, not on the shaper's classes: download on the buyer's WireGuard interface
    (received), upload on the node's IFB that carries the buyer's shaped upload (sent).
    """
    shaper = fresh_shaper(sl)
    shaper.set_caps(cap * MBIT, cap * MBIT)
    down = direction == "down"
    counter = (sl.buyer, sl.wg_buyer, "rx") if down else (sl.node, ifb_name(sl.wg_node), "tx")
    queue = (sl.node, sl.wg_node if down else ifb_name(sl.wg_node), shaper.classid("buyer-1"))
    check_rate(lambda: measured_transfer(sl.buyer, INTERNET_HOST, SECONDS, down, 5201, counter, queue),
               cap * MBIT, f"buyer {direction} {cap} Mbit/s, IP bytes")


@pytest.mark.parametrize("direction", ["up", "down"])
def test_line_rate_accuracy_100(sl, direction):
    """100 Mbit/s shaped on the WAN veth (owner traffic through the line tree and its IFB).

    The line tree's own accuracy, without the tunnel's CPU cost (wireguard-go carries 100 Mbit/s on
    a quiet machine, not always on two cores shared with image builds: the tunnel test at 100 then
    skips as CPU-starved). The line rate counts frames as the kernel sees them (overhead 0 here):
    measured on the receiver's veth.
    """
    fresh_shaper(sl, line_up=100 * MBIT, line_down=100 * MBIT, overhead=0)
    down = direction == "down"
    counter = (sl.lan, "eth0", "rx") if down else (sl.inet, "up0", "rx")
    queue = (sl.node, ifb_name("wan0") if down else "wan0", "1:10")
    check_rate(lambda: measured_transfer(sl.lan, INTERNET_HOST, SECONDS, down, 5201, counter, queue),
               100 * MBIT, f"line {direction} 100 Mbit/s, frames")


def test_owner_keeps_the_line_while_buyer_saturates(sl, tmp_path):
    line, floor, cap = 100 * MBIT, 10 * MBIT, 20 * MBIT
    fresh_shaper(sl, line_up=line, line_down=line, floor_up=floor, floor_down=floor, cap_up=cap, cap_down=cap)
    idle = ping_p95(sl.lan, INTERNET_HOST, 40)
    s0, t0 = cpu_stall_us(), time.monotonic()
    out = tmp_path / "buyer.json"
    with out.open("w") as f:
        buyer = sl.buyer.popen(*IPERF3, "-c", INTERNET_HOST, "-p", "5202", "-J", "-R", "-t", str(SECONDS + 3),
                               stdout=f, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    result: dict = {}
    pinger = threading.Thread(target=lambda: result.update(p95=ping_p95(sl.lan, INTERNET_HOST, 60)))
    pinger.start()
    owner = received_bps(iperf(sl.lan, INTERNET_HOST, SECONDS, reverse=True))
    pinger.join()
    buyer.wait(timeout=30)
    buyer_bps = received_bps(json.loads(out.read_text()))
    pressure = (cpu_stall_us() - s0) / 1e6 / (time.monotonic() - t0)
    msg = (f"owner {owner / MBIT:.1f} Mbit/s goodput (needs {0.9 * (line - floor) / MBIT:.0f}), buyer "
           f"{buyer_bps / MBIT:.1f} (floor {floor / MBIT:.0f}), owner ping p95 {idle:.1f} ms idle, "
           f"{result['p95']:.1f} ms loaded, CPU pressure {pressure:.0%}")
    ok = owner >= 0.9 * (line - floor) and buyer_bps >= 0.9 * floor and result["p95"] - idle <= 20
    if not ok and pressure > 0.60:
        pytest.skip(f"CPU-starved run (tasks waited for a CPU most of the time), not a shaping measurement: {msg}")
    assert owner >= 0.9 * (line - floor), msg
    assert buyer_bps >= 0.9 * floor, msg
    assert result["p95"] - idle <= 20, msg


def test_schedule_boundary_during_a_transfer(sl, tmp_path):
    shaper = fresh_shaper(sl)
    now = [dt.datetime(2026, 11, 23, 7, 59, 30)]  # a Monday
    rules = [Rule(tuple(range(7)), 8 * 60, 23 * 60, 5 * MBIT, 5 * MBIT)]
    sched = Scheduler(rules, (20 * MBIT, 20 * MBIT), shaper.set_caps, clock=lambda: now[0])
    assert sched.tick() == (20 * MBIT, 20 * MBIT)
    out = tmp_path / "sched.json"
    with out.open("w") as f:
        p = sl.buyer.popen(*IPERF3, "-c", INTERNET_HOST, "-p", "5201", "-J", "-R", "-t", "7",
                           stdout=f, stderr=subprocess.DEVNULL)
    time.sleep(3.0)
    before = shaper.snapshot()
    now[0] = dt.datetime(2026, 11, 23, 8, 0, 5)
    assert sched.tick() == (5 * MBIT, 5 * MBIT)
    # Classes change in place; bfifo leaves follow their ceiling. Nothing is deleted or re-added.
    assert all(x.startswith(("class change", "qdisc replace")) for x in shaper.last_batch), shaper.last_batch
    assert p.wait(timeout=30) == 0, "the transfer broke when the cap changed"
    data = json.loads(out.read_text())
    rates = [i["sum"]["bits_per_second"] / MBIT for i in data["intervals"]]
    # Goodput is ~96 % of a cap; the cores are shared with other jobs, hence the loose lower bounds.
    assert 17 <= max(rates[1:3]) <= 20.2, rates  # before the boundary
    # After it, on the same TCP connection (a second to drain what was queued at the old cap).
    assert 3.5 <= sum(rates[5:7]) / 2 <= 5.2, rates
    after = shaper.snapshot()

    def session_bytes(snap):
        dev = next(d for d in snap["devices"] if d["role"] == "buyers-down")
        return next(c["bytes"] for c in dev["classes"] if c["label"] == "session buyer-1")

    assert session_bytes(after) > session_bytes(before) > 0  # the session's class was kept, not rebuilt


def wg_transfer(sl) -> tuple[int, int]:
    """(bytes from the buyer, bytes to the buyer) of the node's peer: what the ledger meters."""
    out = sl.node.run("wg", "show", sl.wg_node, "transfer").stdout.split()
    return (int(out[1]), int(out[2])) if out else (0, 0)


def test_quota_closes_sessions_refuses_new_and_survives_restart(sl, tmp_path):
    shaper = fresh_shaper(sl, cap_up=50 * MBIT, cap_down=50 * MBIT)
    state = tmp_path / "quota.json"
    closed: list[str] = []
    receipts: list[tuple[int, int]] = []

    def close_all(reason: str) -> None:  # what the session manager does at the quota
        receipts.append(wg_transfer(sl))  # final receipt: the peer's last counters
        sl.node.run("wg", "set", sl.wg_node, "peer", sl.buyer_pub, "remove")
        shaper.remove_session("buyer-1")
        closed.append(reason)

    clock = [dt.datetime(2026, 11, 20, 12, 0)]
    keeper = QuotaKeeper(Quota(monthly_bytes=8_000_000, reset_day=21, max_sessions=4), state,
                         on_exhausted=close_all, clock=lambda: clock[0])
    assert keeper.admit(0) == (True, "")
    sl.iperf_server(port=5204, once=True)  # the transfer is cut off: its server is not reused
    with (tmp_path / "q.json").open("w") as f:
        p = sl.buyer.popen(*IPERF3, "-c", INTERNET_HOST, "-p", "5204", "-J", "-R", "-t", "8",
                           stdout=f, stderr=subprocess.DEVNULL)
    last = wg_transfer(sl)
    deadline = time.monotonic() + 8
    while not closed and time.monotonic() < deadline:
        time.sleep(0.2)
        cur = wg_transfer(sl)
        keeper.add_usage(max(0, cur[0] - last[0]), max(0, cur[1] - last[1]))
        last = cur
    assert closed, "the quota was never reached"
    assert keeper.used >= 8_000_000 and receipts and sum(receipts[0]) > 0
    p.terminate()
    assert not ping_ok(sl.buyer, INTERNET_HOST), "the session still carries traffic after the quota"
    ok, why = keeper.admit(0)
    assert not ok and "quota" in why
    # The agent restarts: the verdict comes back from the state file.
    again = QuotaKeeper(Quota(monthly_bytes=8_000_000, reset_day=21, max_sessions=4), state,
                        clock=lambda: clock[0])
    assert not again.admit(0)[0] and again.exhausted
    # The next period (reset day 21) admits again.
    clock[0] = dt.datetime(2026, 11, 21, 0, 1)
    assert again.admit(0) == (True, "")
    assert again.admit(4)[0] is False  # max concurrent sessions
    # Put the peer back for the other tests (the buyer re-keys at once).
    sl.reconnect_buyer()
    assert ping_ok(sl.buyer, INTERNET_HOST)


def test_incremental_changes_touch_only_what_changed(sl, tmp_path):
    shaper = fresh_shaper(sl)
    assert shaper.setup() == []  # nothing to do: the live tree is the desired one
    lines = shaper.add_session("buyer-2", ["10.213.0.3"])
    assert len(lines) == 6 and all("1:101" in x or "101:" in x or "prio 101" in x for x in lines), lines
    assert not any("root" in x or " del " in x for x in lines)
    lines = shaper.set_caps(7 * MBIT, 9 * MBIT)
    assert lines and all(x.startswith(("class change", "qdisc replace")) for x in lines), lines
    lines = shaper.remove_session("buyer-2")
    assert sorted(x.split(" dev ")[0] for x in lines) == ["class del", "class del", "filter del", "filter del"]
    # The agent restarts: a new Shaper from the state file finds the tree as it left it.
    again = sl.shaper(sl.shaping())
    assert (again.cap_up, again.cap_down) == (7 * MBIT, 9 * MBIT) and set(again.sessions) == {"buyer-1"}
    assert again.setup() == []
    assert again.sync_sessions({"buyer-1": [BUYER_TUN]}) == []  # the sessions that survived: no change
    # `idlewire-agent shaping show` prints the live trees with rates and counters.
    assert ping_ok(sl.buyer, INTERNET_HOST)
    conf = tmp_path / "node.toml"
    conf.write_text(f'[shaping]\nenabled = true\nwan_interface = "wan0"\ntunnel_interface = "{sl.wg_node}"\n'
                    'line_up_mbit = 200\nline_down_mbit = 200\ncap_up_mbit = 20\ncap_down_mbit = 20\n'
                    "[quota]\nmax_sessions = 4\n")
    show = sl.node.run(sys.executable, "-m", "idlewire_agent", "shaping", "show", "--config", str(conf),
                       "--state", str(again.state_path)).stdout
    assert "leaf qdisc: bfifo (fallback: this kernel has neither fq_codel nor cake)" in show, show
    assert "buyer caps: up 7 Mbit/s, down 9 Mbit/s" in show
    for line in ("line-up      wan0", f"buyers-down  {sl.wg_node}", f"buyers-up    ifb4{sl.wg_node}"):
        assert line in show.splitlines(), show
    owner = next(x for x in show.splitlines() if "owner" in x)
    assert "rate   190Mbit ceil   200Mbit  sent" in owner, owner
    session = next(x for x in show.splitlines() if "session buyer-1" in x)
    assert int(session.split("sent")[1].split("B")[0]) > 0, session
    js = json.loads(sl.node.run(sys.executable, "-m", "idlewire_agent", "shaping", "show", "--json", "--config",
                                str(conf), "--state", str(again.state_path)).stdout)
    assert js["leaf_qdisc"] == "bfifo" and len(js["devices"]) == 4


def test_lost_record_reasserts_the_tree(sl):
    """After a failed batch the shaper forgets what it applied and re-asserts every object: a live
    HTB root must then be kept (HTB cannot be `qdisc replace`d), and a class changed by hand is put
    back. Before, every later apply failed and the agent could not start until the trees went."""
    shaper = fresh_shaper(sl)
    sl.node.run("tc", "class", "change", "dev", "wan0", "classid", "1:1", "htb", "rate", "5mbit", "ceil", "5mbit")
    shaper.applied = {}
    shaper._save()
    again = sl.shaper(sl.shaping())  # the agent restarts with that record
    lines = again.setup()
    assert not any(" root " in x for x in lines), lines
    assert "ceil 200Mbit" in sl.node.run("tc", "class", "show", "dev", "wan0", "classid", "1:1").stdout
    assert again.setup() == []


SEND_RAW = """
import socket, sys
dst, proto, payload, n = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
for _ in range(n):
    s.sendto(payload, (dst, 0))
"""
SEND_UDP = """
import socket, sys
dst, sport, dport, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", sport))
for _ in range(n):
    s.sendto(b"x" * 64, (dst, dport))
"""


def class_packets(ns, dev: str) -> dict[str, int]:
    """{classid: packets sent} of a device's classes (iproute2 6.1 prints no JSON for HTB classes)."""
    out = ns.run("tc", "-s", "class", "show", "dev", dev).stdout
    return {m[1]: int(m[2]) for m in re.finditer(r"class \S+ (\S+) .*?\n\s*Sent \d+ bytes (\d+) pkt", out)}


@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_only_tcp_and_udp_in_the_buyers_port_block_are_buyers(sl, direction):
    """The line tree puts the buyers' NAT port block in their class. u32's port match is two bytes at
    a fixed offset whatever the protocol: an owner's ICMP (its type or checksum there) or IPsec ESP
    (its SPI) with those bytes in the block went to the buyers' capped class, and so did the latency
    source's own echo replies, which then measured the buyers' queue. Raw packets with 0xf1 there
    must stay the owner's; UDP from a port in the block is the buyers'."""
    fresh_shaper(sl)
    if direction == "egress":  # the node sends on wan0: its "sport" bytes are the L4 header's first two
        src, dst, dev, at = sl.node, INTERNET_HOST, "wan0", 0
    else:  # the internet sends to the node: its IFB matches "dport", bytes 2-3
        src, dst, dev, at = sl.inet, NODE_WAN, ifb_name("wan0"), 2
    head = bytearray(8)
    head[at] = 0xF1
    before = class_packets(sl.node, dev)
    for proto in (1, 50):  # ICMP (type 241 / a checksum), ESP (an SPI)
        src.run(sys.executable, "-c", SEND_RAW, dst, str(proto), bytes(head).hex() + "00" * 56, "40")
    time.sleep(0.3)
    mid = class_packets(sl.node, dev)
    owner, buyers = mid["1:10"] - before["1:10"], mid["1:20"] - before["1:20"]
    assert buyers == 0 and owner >= 80, f"owner class +{owner}, buyers' class +{buyers} packets"
    # the control: UDP with the buyers' NAT port (the firewall's block) on the node's side is theirs
    sport, dport = ("61500", "9") if direction == "egress" else ("5000", "61500")
    src.run(sys.executable, "-c", SEND_UDP, dst, sport, dport, "40")
    time.sleep(0.3)
    after = class_packets(sl.node, dev)
    assert after["1:20"] - mid["1:20"] >= 40, (before, mid, after)


def test_an_upgraded_node_replaces_the_old_port_filters(sl):
    """A node upgraded from an agent whose port filter had no protocol match: the next start's diff
    deletes and re-adds filter 11 (its recorded spec changed) and adds 14, and an owner's ICMP then
    stays in the owner's class."""
    shaper = fresh_shaper(sl)
    old = "parent 1: protocol ip prio 11 u32 match ip sport 0xf000 0xf000 flowid 1:20"
    for pref in ("11", "14"):
        sl.node.run("tc", "filter", "del", "dev", "wan0", "parent", "1:", "prio", pref)
    sl.node.run("tc", "filter", "add", "dev", "wan0", *old.split())
    shaper.applied["wan0 1::11"] = old
    shaper.applied.pop("wan0 1::14")
    shaper._save()
    lines = sl.shaper(sl.shaping()).setup()  # the new agent starts with the old record
    assert "filter del dev wan0 parent 1: prio 11" in lines and any("prio 14" in x for x in lines), lines
    head = bytearray(8)
    head[0] = 0xF1
    before = class_packets(sl.node, "wan0")
    sl.node.run(sys.executable, "-c", SEND_RAW, INTERNET_HOST, "1", bytes(head).hex() + "00" * 56, "20")
    time.sleep(0.3)
    after = class_packets(sl.node, "wan0")
    assert after["1:20"] == before["1:20"] and after["1:10"] - before["1:10"] >= 20, (before, after)


def test_buyer_reaches_the_internet_only(sl):
    fresh_shaper(sl)
    assert isolation.table_loaded("idlewire", sl.node.name)
    listen(sl.node, ADMIN_PORT)
    listen(sl.lan, 8080)
    for port in (25, 8080):
        listen(sl.inet, port, INTERNET_HOST)
    # Controls: everything below exists and answers when the firewall does not stand in between.
    assert ping_ok(sl.lan, "10.99.0.1") and tcp_reachable(sl.lan, INTERNET_HOST, 25)
    assert tcp_reachable(sl.lan, NODE_LAN, ADMIN_PORT)  # the owner's LAN reaches the admin API
    assert ping_ok(sl.node, LAN_HOST) and tcp_reachable(sl.node, LAN_HOST, 8080)
    # The buyer: the internet host, yes.
    assert ping_ok(sl.buyer, INTERNET_HOST) and tcp_reachable(sl.buyer, INTERNET_HOST, 8080)
    # Everything else, no.
    assert not ping_ok(sl.buyer, LAN_HOST) and not tcp_reachable(sl.buyer, LAN_HOST, 8080)
    for addr in (NODE_TUN, NODE_WAN, NODE_LAN):
        assert not tcp_reachable(sl.buyer, addr, ADMIN_PORT), addr
    for net, addr in PRIVATE_TARGETS.items():
        assert not ping_ok(sl.buyer, addr), net
    assert not tcp_reachable(sl.buyer, INTERNET_HOST, 25)
    # The admin API from the WAN: no.
    assert not tcp_reachable(sl.inet, NODE_WAN, ADMIN_PORT)
    # Allow-list mode: only the listed networks.
    sl.inet.run("ip", "addr", "add", "198.51.100.20/32", "dev", "lo")
    try:
        sl.load_firewall(firewall_allowed_networks=["198.51.100.10/32"])
        assert ping_ok(sl.buyer, INTERNET_HOST)
        assert not ping_ok(sl.buyer, "198.51.100.20")
    finally:
        sl.load_firewall()
    assert ping_ok(sl.buyer, "198.51.100.20")


def test_rendered_firewall_variants_pass_nft_check(sl, tmp_path):
    variants = [{}, {"firewall_tunnel_ipv6": True, "firewall_allowed_networks": ["198.51.100.0/24", "2001:db8::/32"],
                     "firewall_blocked_udp_ports": [53], "firewall_extra_blocked_networks": ["203.0.113.0/28"]},
                {"firewall_admin_tcp_ports": [], "firewall_blocked_tcp_ports": [], "firewall_wan_interface": ""}]
    for i, v in enumerate(variants):
        path = tmp_path / f"fw{i}.nft"
        path.write_text(sl.firewall_text(**v))
        p = sl.node.run("nft", "-c", "-f", str(path), check=False)
        assert p.returncode == 0, (v, p.stderr)
    bad = tmp_path / "bad.nft"
    bad.write_text(sl.firewall_text(firewall_blocked_networks_v4=["10.0.0.0/33"]))
    assert sl.node.run("nft", "-c", "-f", str(bad), check=False).returncode != 0  # the check can fail


def test_days_are_monday_first():
    assert DAYS[0] == "mon" and dt.date(2026, 11, 23).weekday() == 0
