"""A real node that forges usage, in the namespace lab (tests/net/marketlab.py): the agent as
shipped, started through tests/net/forgery.py so every receipt it signs states 50 % more bytes than
its meter counted (what an owner with root over the node could make it do). Three buyers, each with
its own key, move traffic through it via the hub with the reference client, co-signing their own
counters; the node uploads its inflated receipts. The epoch's settlement, under the reference
rules (three different buyers disputing a node's counts make it an offence), slashes the node for
inflated usage, and the slash's evidence is the receipts: the ids of each session's newest
co-signed receipt, and those receipts themselves, the very ones each buyer saved, node-signed
figures above the buyer's co-signed ones. The node earns nothing that epoch.
One lab for the module (one test)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

from agentlab import wait_for
from marketlab import ENV, WEB, MarketLab
from netlab import Lab, have_netns

pytestmark = pytest.mark.skipif(have_netns() is not None, reason=str(have_netns()))

DAY = 86400
PPM = 1_000_000
FACTOR = 1.5


def _quiet_statements(client, n: int, timeout: float = 20) -> None:
    """Wait until the buyer has co-signed the same counters N times in a row (its --json lines): the
    traffic is over and the node's receipt before the newest counts all of it (a statement is held
    to the receipt before the one acknowledging it: receipts.acknowledged)."""
    deadline, last, same = time.monotonic() + timeout, None, 0
    while same < n:
        ready, _, _ = select.select([client.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "the buyer's statements did not settle"
        line = client.stdout.readline()
        assert line, "the client exited"
        got = json.loads(line)
        now = (got["up"], got["down"])
        same = same + 1 if now == last else 1
        last = now


def test_a_real_node_that_forges_usage_is_slashed_with_the_receipts_as_evidence(tmp_path):
    from idlewire.hub import db
    from idlewire.hub import economy as eco_db
    from idlewire_agent import receipts as rc

    # a day per epoch (an hour boundary inside a short test would split its traffic); the rest of
    # the rules are the reference network's (staking.inflated_min_buyers = 3)
    (tmp_path / "rules.toml").write_text(f"epoch_seconds = {DAY}\n[probes]\nheartbeat_seconds = {DAY}\n")
    (tmp_path / "prices.csv").write_text("0,0.25\n")
    eco = eco_db.load(tmp_path / "rules.toml", tmp_path / "hub.key", tmp_path / "prices.csv")
    rules = eco.rules
    assert rules.staking.inflated_min_buyers == 3
    with Lab() as lab:
        m = MarketLab(lab, tmp_path)
        try:
            m.start_hub()
            m.agent = m.node.popen(  # the shipped agent, its receipt maker wrapped by the test
                sys.executable, "-c", f"import forgery; forgery.run_agent({FACTOR}, '--config', {str(m.cfg)!r})",
                stdout=open(m.log, "a"), stderr=subprocess.STDOUT,  # noqa: SIM115 (the process's)
                env={**ENV, "PYTHONPATH": f"{Path(__file__).parent}:{ENV['PYTHONPATH']}"})
            node = wait_for(lambda: next((n for n in m.hub("/v1/nodes") if n["channel_open"]), None), timeout=30)
            engine = db.make_engine(f"sqlite:///{m.hub_db}")
            meta = eco_db.genesis(engine, eco)
            eco_db.stake(engine, eco, node["id"], rules.staking.min_stake, src="treasury")

            saved = {}
            for i in range(3):  # three buyers, three keys, one session each
                m.buyer_key = tmp_path / f"buyer{i}.key"
                client = m.client("--interval", "0.5", "--receipts", str(tmp_path / f"r{i}.json"))
                m.first_byte()
                # 4 MB: the node's extra half is beyond the rules' tolerance (market.tolerance_bytes, 1 MiB)
                m.buyer.run("iperf3", "-c", WEB, "-n", "4M", "-b", "50M", "--fq-rate", "50M", timeout=60)
                _quiet_statements(client, 3)
                m.stop_client(client)
                got = json.loads((tmp_path / f"r{i}.json").read_text())
                (sid,) = got["closed"]
                saved[sid] = [r for r in got["receipts"] if r["session"] == sid]
            assert len({json.loads((tmp_path / f"r{i}.json").read_text())["receipts"][0]["buyer_key"]
                        for i in range(3)}) == 3
            wait_for(lambda: m.ledger("SELECT count(*) FROM uploads")[0][0] == 0, timeout=30)
            for sid, chain in saved.items():
                wait_for(lambda sid=sid, chain=chain: len(m.hub_chain(sid)) >= len(chain), timeout=30)

            s = eco_db.settle_epoch(engine, eco, now=meta["genesis_at"] + DAY + 1)
            assert time.time() < meta["genesis_at"] + DAY, "the test crossed midnight UTC: run it again"
            st = s.statement
            (sl,) = st["slashes"]
            newest = {sid: max(r["seq"] for r in chain if "buyer" in r) for sid, chain in saved.items()}
            assert (sl["node"], sl["kind"]) == (node["id"], "inflated_usage")
            assert sl["evidence"] == sorted(f"{node['id']}/{sid}/{seq}" for sid, seq in newest.items())
            assert sl["amount"] == rules.staking.min_stake * rules.staking.slash_inflated_usage_ppm // PPM
            with db.read(engine) as conn:
                ev = json.loads(conn.execute(db.econ_slashes.select()).mappings().one()["evidence"])
            assert ev["ids"] == sl["evidence"]
            # the evidence is the receipts themselves: the ones the buyers hold, node-signed, each
            # stating more than its buyer co-signed
            for record in ev["records"]:
                sid = record["session"]
                (mine,) = [r for r in saved[sid] if r["seq"] == record["seq"]]
                assert rc.receipt_hash(record) == rc.receipt_hash(mine) and rc.node_signed(record)
                assert record["node"] == node["node_key"]
                node_bytes = record["up"] + record["down"]
                buyer_bytes = record["buyer"]["up"] + record["buyer"]["down"]
                assert node_bytes - buyer_bytes > rules.market.tolerance_bytes and buyer_bytes > 3_500_000, record
            assert len(ev["records"]) == 3
            (mine,) = [r for r in eco_db.earnings(engine) if r["node_id"] == node["id"]]
            assert mine["reward"] == 0 and mine["why_not"] == "slashed this epoch"
            engine.dispose()
        finally:
            m.close()
