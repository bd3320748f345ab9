"""The node agent for real: wireguard-go on node and buyer, iperf3 through the tunnel."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from agentlab import NodeLab, metric, wait_for

pytestmark = pytest.mark.net
WG_DATA = 1452


@pytest.fixture
def make_node(lab, tmp_path):
    made = []

    def make(**overrides):
        n = NodeLab(lab, tmp_path, 150, **overrides)
        made.append(n)
        n.start()
        return n

    yield make
    for n in made:
        n.stop()


@pytest.fixture
def node(make_node):
    return make_node()


def test_metered_bytes_match_the_buyer_and_receipts_verify(make_node, tmp_path):
    """200 MB up and 100 MB down through the tunnel, the sender paced to 50 Mbit/s as the node's
    shaping paces a session at its cap: the metered bytes are within 1 % of what the buyer's
    WireGuard interface counted, raw, nothing subtracted."""
    node = make_node(receipts__keep_closed=3)
    rfile = tmp_path / "receipts.json"
    client = node.client("--interval", "1", "--receipts", str(rfile))
    node.wait_tunnel()
    (s,) = node.open_sessions()
    drops0 = node.udp_drops(node.node), node.udp_drops(node.buyer)
    up = node.iperf(200)
    down = node.iperf(100, reverse=True)
    assert up.returncode == 0 and down.returncode == 0, up.stdout[-500:] + down.stdout[-500:]
    time.sleep(1.5)  # a poll and a co-signed report after the last byte
    b_up, b_down = node.buyer_counters()
    ses = node.session(s["session"])
    assert b_up > 200e6 and b_down > 100e6
    err_up, err_down = (ses["up"] - b_up) / b_up, (ses["down"] - b_down) / b_down
    # Datagrams a receiving kernel dropped before wireguard-go read them (its 208 KB socket buffer
    # overflowing on a loaded host) were counted by the sender only: reported, not subtracted.
    lost_up = (node.udp_drops(node.node) - drops0[0]) * WG_DATA
    lost_down = (node.udp_drops(node.buyer) - drops0[1]) * WG_DATA
    figures = (f"metering error up {err_up:+.4%}, down {err_down:+.4%} raw; UDP bytes dropped by the receiving "
               f"kernel: {lost_up} up, {lost_down} down; net of them up "
               f"{(ses['up'] - b_up + lost_up) / b_up:+.4%}, down {(ses['down'] - b_down + lost_down) / b_down:+.4%}")
    print(figures)
    assert abs(err_up) <= 0.01 and abs(err_down) <= 0.01, figures
    assert ses["cost"] == pytest.approx((ses["up"] + ses["down"]) / 1e9 * 0.5)
    node.stop_client(client)  # Ctrl-C: close the session, save the receipts
    reports = [json.loads(line) for line in client.stdout.read().splitlines()]
    assert reports and all(r["agreed"] for r in reports)
    assert node.session(s["session"])["state"] == "closed"
    # The receipts verify; tampering, reordering and forging are each caught.
    node_key = node.get("/health")["node_key"]
    ok = subprocess.run([sys.executable, "-m", "idlewire", "receipts", "verify", str(rfile), "--json",
                         "--node-key", node_key], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["ok"]
    rs = json.loads(rfile.read_text())["receipts"]  # the client saves {"receipts", "closed"}
    assert len(rs) >= 3 and rs[-1]["final"] == "buyer"
    bad = [dict(r) for r in rs]
    bad[1]["up"] += 1000
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(bad))
    res = subprocess.run([sys.executable, "-m", "idlewire", "receipts", "verify", str(tampered)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "receipt #2" in res.stdout and "signature" in res.stdout
    # Retention (keep_closed = 3): between polls the agent trims the closed chain to its last 3
    # receipts behind a signed checkpoint; what the API exports still verifies, from there.
    pruned = wait_for(lambda: len(rs2 := node.get(f"/receipts?session={s['session']}", admin=True)) == 4 and rs2)
    assert pruned[0]["type"] == "checkpoint" and pruned[1:] == rs[-3:]
    rfile.write_text(json.dumps(pruned))
    ok = subprocess.run([sys.executable, "-m", "idlewire", "receipts", "verify", str(rfile), "--node-key", node_key],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and f"receipts 1-{pruned[0]['seq']} pruned by the node" in ok.stdout, ok.stdout


def test_kill9_mid_transfer_counts_nothing_twice(node):
    """kill -9 the agent 10 times while a buyer sends (80 Mbit/s, paced): nothing counted twice,
    at most one poll interval lost, the ledger intact."""
    client = node.client("--interval", "1")
    node.wait_tunnel()
    (s,) = node.open_sessions()
    rate_mbit, kills = 80, 10
    drops0 = node.udp_drops(node.node)
    iperf = node.buyer.popen("iperf3", "-c", f"{node.wan}.2", "-t", "40", "-b", f"{rate_mbit}M", "--fq-rate",
                             f"{rate_mbit}M", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    for _ in range(kills):
        time.sleep(1.0 + random.random() * 0.6)  # anywhere in a poll cycle (0.5 s)
        node.kill9()
        time.sleep(0.2)
        node.start()
    assert time.time() - t0 < 38, "the kills outlasted the transfer"
    assert iperf.wait(60) == 0
    time.sleep(1.5)
    b_up, _ = node.buyer_counters()
    ses = node.session(s["session"])
    assert ses["state"] == "open"
    assert b_up > 300e6
    lost = (node.udp_drops(node.node) - drops0) * WG_DATA  # reported, not subtracted
    figures = f"metered {ses['up']}, buyer counted {b_up} ({ses['up'] - b_up:+d}); UDP bytes dropped {lost}"
    print(figures)
    # Never counted twice; at most one poll interval (0.5 s at the sending rate) lost.
    assert ses["up"] <= b_up, figures
    assert ses["up"] >= b_up - rate_mbit * 1e6 / 8 * 0.5, figures
    assert node.integrity() == "ok"
    metrics = node.get("/metrics")
    assert "\nidlewire_sessions_open 1\n" in metrics
    client.terminate()  # SIGTERM ends the session as Ctrl-C does
    client.wait(30)
    assert node.session(s["session"])["state"] == "closed"


def test_interface_recreated_mid_session(node):
    node.client("--interval", "1")
    node.wait_tunnel()
    (s,) = node.open_sessions()
    assert node.iperf(15).returncode == 0
    time.sleep(1.2)
    first = node.session(s["session"])["up"]
    assert first > 15e6
    node.node.run("ip", "link", "del", node.wg)  # wireguard-go exits with its interface
    wait_for(lambda: node.node.run("wg", "show", node.wg, "peers", check=False).stdout.strip())
    node.wait_tunnel(30)  # the buyer's tunnel works again through the recreated interface
    assert node.iperf(15).returncode == 0
    time.sleep(1.2)
    b_up, _ = node.buyer_counters()
    ses = node.session(s["session"])
    lost = node.udp_drops(node.node) * WG_DATA  # reported, not subtracted
    assert ses["up"] > first + 15e6
    assert abs(ses["up"] - b_up) <= 0.01 * b_up, (ses["up"], b_up, lost)
    assert metric(node, "idlewire_counter_resets_total") >= 1


def test_buyer_that_stops_cosigning_is_cut_off(make_node, tmp_path):
    node = make_node(metering__unpaid_cap_mb=5)
    script = f"""
import sys, time
sys.argv = ['x']
from pathlib import Path
from idlewire.cmd_client import Buyer, load_key, bring_up, counters
from idlewire_agent import keys
b = Buyer('http://{node.lan}.1:{node.api_port}', load_key(Path('{tmp_path}/bad.key')))
priv, pub = keys.wg_keypair()
s = b.open(pub)
bring_up('{node.buyer_wg}', priv, s, '{node.lan}.1', ['{node.wan}.0/24'])
print(s['session'], flush=True)
up, down = counters('{node.buyer_wg}')
b.cosign(s['session'], up, down)   # one honest report, then silence
time.sleep(60)
"""
    p = node.buyer.popen(sys.executable, "-c", script, stdout=subprocess.PIPE, text=True)
    sid = p.stdout.readline().strip()
    node.wait_tunnel()
    iperf = node.buyer.popen("iperf3", "-c", f"{node.wan}.2", "-n", "20M", "-b", "100M",  # > the 5 MB cap
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ses = wait_for(lambda: (s := node.session(sid))["state"] == "closed" and s)
    assert ses["reason"] == "unpaid"
    assert node.buyer.run("ping", "-c1", "-W1", f"{node.wan}.2", check=False).returncode != 0
    rs = node.get(f"/receipts?session={sid}", admin=True)
    from idlewire_agent import receipts
    assert receipts.verify(rs) is None
    assert "buyer" in rs[0] and "buyer" not in rs[-1]
    assert rs[-1]["up"] > 5e6
    p.kill()
    iperf.kill()


def test_api_refuses_to_listen_on_the_wan(lab, tmp_path):
    n = NodeLab(lab, tmp_path, 152, api__listen=["10.152.2.1"])
    with pytest.raises(RuntimeError, match="WAN or tunnel interface"):
        n.start()
    n.stop()


def test_agent_refuses_sessions_without_isolation(make_node, tmp_path):
    """No buyer gets a tunnel while the nftables isolation table is not loaded ([firewall] required)."""
    node = make_node(firewall__required=True)
    from idlewire.cmd_client import Buyer, load_key
    from idlewire.errors import UserError
    from idlewire_agent import keys

    # From this (host) namespace the API is reached only through the lab's loopback forwarder.
    buyer = Buyer(f"http://127.0.0.1:{node.fwd.port}", load_key(tmp_path / "buyer.key"))
    with pytest.raises(UserError, match="isolation"):
        buyer.open(keys.wg_keypair()[1])
    assert node.open_sessions() == []


def test_a_wedged_wireguard_go_stalls_the_agent_for_seconds_not_for_ever(node):
    """wireguard-go stopped (SIGSTOP) mid-session: `wg show` blocks on its control socket. SIGUSR1
    shows the agent waiting there; it kills `wg` after wg.TIMEOUT, logs the failed poll and goes
    on answering its API; once wireguard-go runs again, so does the metering."""
    (pid,) = [int(p) for p in subprocess.run(["pgrep", "-f", f"^wireguard-go {node.wg}$"], capture_output=True,
                                             text=True).stdout.split()]
    os.kill(pid, signal.SIGSTOP)
    try:
        # kill -USR1: every thread's stack in the log; once the next poll has started, it waits in wg.dump
        def stacks_show_the_wait() -> bool:
            node.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.3)
            return "in dump" in node.log.read_text()

        wait_for(stacks_show_the_wait, timeout=8, step=0.7)
        wait_for(lambda: "no answer in 10 s" in node.log.read_text(), timeout=30, step=0.5)
        t0 = time.time()
        assert node.get("/health")["node_key"]  # the lock is free again: the API answers
        assert time.time() - t0 < 12
    finally:
        os.kill(pid, signal.SIGCONT)
    assert metric(node, "idlewire_poll_errors_total") >= 1
    errors, polls = metric(node, "idlewire_poll_errors_total"), metric(node, "idlewire_polls_total")
    wait_for(lambda: metric(node, "idlewire_polls_total") >= polls + 2, timeout=15)
    assert metric(node, "idlewire_poll_errors_total") == errors
