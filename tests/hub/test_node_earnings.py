"""Earnings on the node: the real Agent and Seller against a real hub process; the epoch is settled
from the receipts the node uploaded; the node fetches its reward over its signed channel, checks the
statement's signature and its Merkle proof itself, and shows it in /health and /metrics. A tampered
leaf, a proof from another epoch or a statement by another key is shown as refused, never as earned."""

from __future__ import annotations

import copy

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from idlewire.economy.rules import Rules
from idlewire.hub import db
from idlewire.hub import economy as eco_db
from idlewire_agent import merkle
from idlewire_agent.market import check_earnings
from test_economy_db import fixed_key
from test_hub import sold
from test_seller import Seller, _agent, _session, hub  # noqa: F401 (the fixture)


def test_the_node_checks_and_shows_its_reward(tmp_path, hub):  # noqa: F811
    engine = db.make_engine(hub.db_url)
    prices = tmp_path / "prices.csv"
    prices.write_text("0,0.25\n")
    eco = eco_db.Economy(Rules(), fixed_key(9), eco_db.pricefeed.FilePriceFeed(prices))
    meta = eco_db.genesis(engine, eco)
    a = _agent(tmp_path, hub.url)
    seller = Seller(a, hub.url)
    a.ledger.enable_uploads()
    nid = seller.register()["node"]
    assert check_earnings(seller.market.earnings(), nid, None) == {"state": "no epoch settled yet"}
    seller.market.heartbeat(uptime=1.0, sessions=[])
    eco_db.stake(engine, eco, nid, Rules().staking.min_stake, src="treasury")
    buyer = Ed25519PrivateKey.generate()
    sold(hub, nid, _session(a, buyer, 3), buyer=buyer)  # a session the hub sold to BUYER
    assert seller.upload_once() == 3
    s = eco_db.settle_epoch(engine, eco, now=meta["genesis_at"] + 86400 + 1)
    assert s.statement["rewarded"] == 1

    got = seller.fetch_earnings()
    assert got["state"] == "verified" and got["epoch"] == 0, got
    assert got["reward"] == s.statement["minted"] > 0 and got["statement"] == s.hash
    assert got["region"] == "DE" and got["verified_bytes"] == 9000
    assert a.offer()["earnings"] == got  # what /health shows
    assert "idlewire_earnings_verified 1" in a.metrics()
    assert f"idlewire_earnings_reward {got['reward']}" in a.metrics()

    answer = seller.market.earnings()
    bad = copy.deepcopy(answer)
    bad["leaf"]["reward"] += 1
    assert check_earnings(bad, nid, got["hub_key"])["state"].startswith("refused: the reward leaf is not in")
    bad = copy.deepcopy(answer)
    bad["leaf"]["node"] = "0" * 20
    assert "not for this node" in check_earnings(bad, nid, None)["state"]
    forged = merkle.sign_statement(Ed25519PrivateKey.generate(), {**answer["statement"], "hub": "x"})
    assert check_earnings({**answer, "statement": forged}, nid, got["hub_key"])["state"].startswith("refused")
    # a hub that swaps its statement key after the node pinned the first one is refused too
    other = eco_db.Economy(Rules(), fixed_key(10), eco.prices)
    forged = merkle.sign_statement(other.key, {**answer["statement"], "hub": other.hub_key})
    assert check_earnings({**answer, "statement": forged}, nid, seller.hub_key)["state"].startswith("refused")
    engine.dispose()
