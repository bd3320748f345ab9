"""Settlement of a real node's traffic in the namespace lab (tests/net/marketlab.py): a buyer on the
internet moves traffic through a real node (agent, wireguard-go, a home router's NAT) via the hub;
the hub settles the epoch from the receipts it stored. Beside it, two more nodes speak the node
protocol to the same hub process (registered, heartbeats, a session the hub sold through its
connect to a buyer, node-signed receipts co-signed by that buyer): a twin in NG with exactly the
real node's verified bytes and caps, and an idle DE node that only adds capacity, so NG is the
underserved region (same demand, half the supply).

Checked against the README's formulas, computed here from the buyer's own saved receipts:
  * the real node's reward is pool * weight // Σ weights to the last unit, with
    weight = verified bytes * multiplier * max(reputation, floor) * uptime;
  * the two equal nodes earn in the ratio of their regions' multipliers (1.5x against 1x).
One lab for the module (one test)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

from agentlab import wait_for
from marketlab import WEB, MarketLab
from netlab import Lab, have_netns

pytestmark = pytest.mark.skipif(have_netns() is not None, reason=str(have_netns()))

DAY = 86400
PPM = 1_000_000


def _usage(chain: list[dict]) -> tuple[int, int, int]:
    """(node bytes, buyer bytes, what the node had counted when the buyer signed) of one session, from
    its receipts: the newest co-signed receipt, and the receipt before it (receipts.acknowledged)."""
    signed = [r for r in chain if "buyer" in r]
    last = signed[-1]
    before = next((r for r in chain if r["seq"] == last["seq"] - 1), None)
    return (last["up"] + last["down"], last["buyer"]["up"] + last["buyer"]["down"],
            before["up"] + before["down"] if before else 0)


def _sold(node, buyer, nid: str) -> str:
    """A session the hub sells to BUYER on the protocol-speaking NODE (the hub counts usage only in
    sessions it sold): the buyer connects through the hub as `connect --hub` does, the node takes the
    request on the channel it opened and answers with the session it opened."""
    from idlewire_agent import receipts as rc
    from idlewire_agent.keys import wg_keypair

    sid = os.urandom(8).hex()
    stop = threading.Event()

    def open_session(buyer_key, wg_key):
        assert buyer_key == rc.pub_b64(buyer.key)
        stop.set()  # one sale
        return {"session": sid, "address": "10.99.0.2/32", "node_key": rc.pub_b64(node.key)}

    t = threading.Thread(target=node.serve, args=(open_session, stop), kwargs={"wait": 2, "retry": 0.2}, daemon=True)
    t.start()
    got = wait_for(lambda: _connect(buyer, nid, wg_keypair()[1]), timeout=30)
    stop.set()
    t.join(10)
    assert got["node"] == nid and got["session"]["session"] == sid, got
    return sid


def _connect(buyer, nid: str, wg: str) -> dict | None:
    from idlewire_agent.market import MarketError

    try:
        return buyer.request("POST", "/v1/connect", {"wg_public_key": wg, "node": nid})
    except MarketError as exc:
        if exc.status != 503:  # (503: the node's channel is not open yet)
            raise
        return None


def test_an_honest_real_node_earns_the_formula_and_an_equal_node_in_an_underserved_region_earns_more(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from idlewire.economy.rules import emission_for, load_rules
    from idlewire.hub import db
    from idlewire.hub import economy as eco_db
    from idlewire_agent import receipts as rc
    from idlewire_agent.keys import wg_keypair
    from idlewire_agent.market import Market

    # a day per epoch (an hour boundary inside a short test would split its traffic), one heartbeat
    # an epoch is full uptime
    (tmp_path / "rules.toml").write_text(f"epoch_seconds = {DAY}\n[probes]\nheartbeat_seconds = {DAY}\n")
    (tmp_path / "prices.csv").write_text("0,0.25\n")
    rules = load_rules(tmp_path / "rules.toml")
    eco = eco_db.load(tmp_path / "rules.toml", tmp_path / "hub.key", tmp_path / "prices.csv")
    with Lab() as lab:
        m = MarketLab(lab, tmp_path)
        try:
            m.start_hub()
            m.start_agent()
            node = wait_for(lambda: next((n for n in m.hub("/v1/nodes") if n["channel_open"]), None), timeout=30)
            engine = db.make_engine(f"sqlite:///{m.hub_db}")
            meta = eco_db.genesis(engine, eco)
            eco_db.stake(engine, eco, node["id"], rules.staking.min_stake, src="treasury")

            client = m.client("--interval", "0.5", "--receipts", str(tmp_path / "r.json"))
            m.first_byte()
            out = m.buyer.run("iperf3", "-c", WEB, "-n", "4M", "-b", "20M", "--fq-rate", "20M", "-J", timeout=120)
            assert json.loads(out.stdout)["end"]["sum_sent"]["bytes"] >= 4_000_000
            time.sleep(1.5)
            m.stop_client(client)
            wait_for(lambda: m.ledger("SELECT count(*) FROM uploads")[0][0] == 0, timeout=30)
            saved = json.loads((tmp_path / "r.json").read_text())
            (sid,) = saved["closed"]
            chain = [r for r in saved["receipts"] if r["session"] == sid]
            wait_for(lambda: len(m.hub_chain(sid)) >= len(chain), timeout=30)

            # the twin (NG) and the idle node (DE) speak the node protocol to the same hub
            url = f"http://127.0.0.1:{m.hub_fwd.port}"
            nb, bb, seen = _usage(chain)
            verified = min(nb, bb)
            others = {}
            for name, region in (("twin", "NG"), ("idle", "DE")):
                key = Ed25519PrivateKey.generate()
                mk = Market(url, key)
                got = mk.register(wg_public_key=wg_keypair()[1], payout=rc.payout_statement(key, f"addr-{name}", name),
                                  region=region, caps=node["caps"], price_per_gb=0.5, endpoint="203.0.113.9:51820",
                                  version="0.1.0")
                others[name] = got["node"]
                mk.heartbeat(uptime=1.0, sessions=[])
                eco_db.stake(engine, eco, got["node"], rules.staking.min_stake, src="treasury")
                if name == "twin":  # one co-signed receipt for exactly the real node's verified bytes
                    buyer = Ed25519PrivateKey.generate()
                    sid = _sold(mk, Market(url, buyer), got["node"])
                    up, t = verified // 2, int(time.time())
                    stmt = rc.sign_usage(buyer, sid, up, verified - up, t)
                    assert mk.upload([rc.make_receipt(key, sid, 1, up, verified - up, t, rc.GENESIS, stmt,
                                                      buyer_key=rc.pub_b64(buyer))])["stored"] == 1

            s = eco_db.settle_epoch(engine, eco, now=meta["genesis_at"] + DAY + 1)
            assert time.time() < meta["genesis_at"] + DAY, "the test crossed midnight UTC: run it again"
            st = s.statement
            rows = {r["node_id"]: r for r in eco_db.earnings(engine)}
            me, twin, idle = rows[node["id"]], rows[others["twin"]], rows[others["idle"]]
            assert st["slashes"] == [] and idle["reward"] == 0 and idle["why_not"] == "no verified usage"

            # the formulas, from the buyer's receipts (README "The economy")
            assert me["verified_bytes"] == verified > 4_000_000
            # NG: the same demand on half the capacity: (V/c) / (2V/3c) = 1.5x; DE: 0.75x, bounded to 1x
            assert st["multipliers"] == {"DE": PPM, "NG": 3 * PPM // 2}
            short = seen - bb   # lag (the statement trails its own receipt) is not disagreement
            off = short if short > 0 else max(0, bb - nb)
            agreement = PPM - min(PPM, off * PPM // nb)
            r = rules.reputation
            rep = (r.initial_ppm * r.decay_ppm + PPM * agreement // PPM * (PPM - r.decay_ppm)) // PPM
            assert (me["uptime_ppm"], me["reputation_ppm"], me["multiplier_ppm"]) == (PPM, rep, PPM)
            twin_rep = (r.initial_ppm * r.decay_ppm + PPM * (PPM - r.decay_ppm)) // PPM
            w_me = verified * PPM * max(rep, r.floor_ppm) * PPM
            w_twin = verified * (3 * PPM // 2) * max(twin_rep, r.floor_ppm) * PPM
            pool = emission_for(rules, 0)
            assert me["reward"] == pool * w_me // (w_me + w_twin)
            assert twin["reward"] == pool * w_twin // (w_me + w_twin)
            # an honest session agrees fully, so the two equal nodes differ only by their region
            assert agreement == PPM, (nb, bb, seen)
            assert abs(twin["reward"] / me["reward"] - 1.5) < 1e-9
            engine.dispose()
        finally:
            m.close()
