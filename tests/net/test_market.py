"""The node in the market, with real parts: `idlewire hub serve` on the "internet", the agent with
wireguard-go behind a home router (Debian's miniupnpd, nftables NAT) that forwards nothing inbound
but what the node maps over UPnP, a buyer outside running `idlewire client connect --hub`
(tests/net/marketlab.py draws the lab)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

from agentlab import wait_for
from homelab import have_homelab
from marketlab import WEB, MarketLab
from netlab import Lab, have_netns

pytestmark = pytest.mark.skipif((have_netns() or have_homelab()) is not None,
                                reason=str(have_netns() or have_homelab()))


@pytest.fixture
def market(tmp_path, request):
    with Lab() as lab:
        m = MarketLab(lab, tmp_path, upnp=getattr(request, "param", True))
        try:
            yield m
        finally:
            m.close()


def _node(m: MarketLab) -> dict:
    nodes = m.hub("/v1/nodes")
    nodes = nodes.get("nodes", nodes) if isinstance(nodes, dict) else nodes
    return nodes[0] if nodes and nodes[0]["channel_open"] else {}


def _reports(client) -> list[dict]:
    return [json.loads(line) for line in client.stdout.read().splitlines() if line.startswith("{")]


def test_a_buyer_from_the_internet_cosigns_through_the_hub_and_every_receipt_reaches_it(market, capsys):
    m = market
    m.start_hub()
    m.start_agent()
    node = wait_for(lambda: _node(m), timeout=40)
    # the endpoint the node told the hub is the UPnP mapping on its home router: the router forwards
    # that port to the node, and nothing else (no rule by hand)
    assert node["endpoint"] == f"{m.public}:{m.port}" and node["region"] == "DE" and node["reachable"]
    assert f"dport {m.port} dnat ip to {m.home.node_ip}:{m.port}" in m.home.nat_rules()
    assert m.health()["reachability"]["endpoint"] == node["endpoint"]
    # the node's API is on its loopback only: from the internet nothing answers
    assert not m.buyer_can_reach(m.public, m.api_port)
    assert not m.buyer_can_reach(m.home.node_ip, m.api_port)

    client = m.client("--interval", "0.5", "--receipts", str(m.tmp / "r.json"))
    m.first_byte()
    up = m.buyer.run("iperf3", "-c", WEB, "-n", "3M", "-b", "20M", "--fq-rate", "20M", "-J", timeout=120)
    assert json.loads(up.stdout)["end"]["sum_sent"]["bytes"] >= 3_000_000
    sid = wait_for(lambda: (m.ledger("SELECT id FROM sessions WHERE state = 'open'") or [[None]])[0][0])
    wait_for(lambda: len(m.hub_receipts()) >= 2, timeout=20)

    # traffic goes on (a receipt every co-signature) while the hub dies mid-upload (kill -9) and
    # comes back, then the agent dies (kill -9) with receipts queued or in flight and starts again
    bg = m.buyer.popen("iperf3", "-c", WEB, "-b", "4M", "--fq-rate", "4M", "-t", "9", stdout=subprocess.DEVNULL)
    time.sleep(2)
    m.kill_hub()
    time.sleep(1.5)
    m.start_hub()
    time.sleep(2)
    m.kill9_agent()
    m.start_agent()
    bg.wait(60)
    time.sleep(1.5)
    m.stop_client(client)  # Ctrl-C: the session is closed through the hub, receipts saved
    reports = _reports(client)
    assert reports and reports[-1]["session"] == sid

    closed = m.ledger("SELECT state, reason FROM sessions WHERE id = ?", sid)[0]
    assert closed == ("closed", "buyer")
    wait_for(lambda: m.ledger("SELECT count(*) FROM uploads")[0][0] == 0, timeout=30)

    # none lost, none twice: the hub holds exactly the node's receipts, the final one included
    ours = m.node_receipts()
    hubs = m.hub_receipts()
    assert {k: h for k, (_, h) in hubs.items()} == ours
    flags = m.hub_flags()
    # An honest session is never flagged: no equivocation, and no disagreement either. Each buyer
    # statement travels through the hub's relay while the node counts on, so a receipt may count far
    # more than the statement it carries: that lag is no disagreement (receipts.acknowledged holds a
    # statement to the count the node had answered with before it).
    assert not {k for k, _ in flags} & {"equivocation", "disagreement"}, flags
    seqs = sorted(q for (s, q) in ours if s == sid)
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 4
    from idlewire_agent import receipts as rc

    chain = m.hub_chain(sid)
    problem = rc.verify(chain, node["node_key"], closed=True)
    assert problem is None, problem
    assert chain[-1]["final"] == "buyer"
    lagged = [r["seq"] for r in chain if "buyer" in r and not rc.agreed(
        r["up"] + r["down"], r["buyer"]["up"] + r["buyer"]["down"], 0.02)]
    with capsys.disabled():
        print(f"\n{len(chain)} receipts; counted beyond 2 % + 64 KiB more than the statement they carry "
              f"(lag, flagged as disagreement before): seq {lagged}; flags: {flags}")
    # ... and what the buyer saved (read through the hub) is the same chain
    saved = json.loads((m.tmp / "r.json").read_text())
    assert [rc.receipt_hash(r) for r in saved["receipts"]] == [rc.receipt_hash(r) for r in chain]
    assert saved["closed"] == [sid]
    # the hub counts the buyer's co-signed bytes
    assert max(r["buyer"]["up"] for r in chain if "buyer" in r) >= 3_000_000
    log = m.log.read_text()
    assert "channel: hub:" in log  # the node saw the hub go away, and carried on
    assert "Traceback" not in log, log[-3000:]


def test_connect_to_first_byte(market, capsys):
    """`idlewire client connect --hub` started -> first byte back through the tunnel, 20 times."""
    m = market
    m.start_hub()
    m.start_agent()
    wait_for(lambda: _node(m), timeout=40)
    times, answers = [], []
    for _ in range(20):
        t0 = time.monotonic()
        client = m.client("--interval", "5")
        got, t1 = m.first_byte()
        times.append(t1 - t0)
        answers.append(got - t0)
        m.stop_client(client)
        assert client.returncode == 0, (m.tmp / "client.log").read_text()[-2000:]
    wait_for(lambda: m.ledger("SELECT count(*) FROM sessions WHERE state = 'closed'")[0][0] == 20)
    # the hub heard of every one of those short sessions: none holds a place any more
    wait_for(lambda: _node(m).get("open_sessions") == 0, timeout=5)
    with capsys.disabled():
        print(f"\nconnect --hub to first byte through the tunnel: median {statistics.median(times):.3f} s, "
              f"min {min(times):.3f} s, max {max(times):.3f} s over {len(times)} connects; the hub's answer "
              f"median {statistics.median(answers):.3f} s after the start (the CLI's start included), the tunnel "
              f"median {statistics.median(t - a for t, a in zip(times, answers, strict=True)):.3f} s after it")


@pytest.mark.parametrize("market", [False], indirect=True, ids=["router-without-upnp"])
def test_a_node_behind_a_router_without_upnp_says_it_is_unreachable(market):
    """UPnP off on the home router: the node says so in /health, once in its log and to the hub
    (no endpoint), with the fix; the hub sends no buyer to a node that none could reach."""
    m = market
    m.start_hub()
    m.start_agent()
    node = wait_for(lambda: _node(m), timeout=40)
    assert node["endpoint"] == "" and node["reachable"] is False
    r = m.health()["reachability"]
    fix = f"forward UDP {m.port} on your router to {m.home.node_ip}"
    assert r["reachable"] is False and fix in r["message"] and "no UPnP IGD" in r["why"], r
    assert node["unreachable"] == r["message"]  # the hub keeps the node's own line, with the fix
    client = m.client("--interval", "5")
    client.communicate(timeout=60)
    assert client.returncode != 0
    assert "no node with free capacity in region DE is online" in (m.tmp / "client.log").read_text()
    log = m.log.read_text()
    assert log.count(fix) == 2, log  # once from the mapper, once in the registration line
    assert f"lists it as not reachable from the internet: {fix}" in log
