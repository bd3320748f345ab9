"""Property tests (hypothesis) of settlement on the hub's database: random small worlds — nodes staked
or not, sessions co-signed or not, buyers that agree or claim less than the node, heartbeats — settled
for two epochs through `hub.economy.settle_epoch`, and the invariants of the pure core checked on the
tables: the ledger sums to zero, supply changes by minted - burned, an epoch's rewards are its mint
(≤ emission + carry, the rest carried), no reward without verified receipts, no stake or balance
below zero, and the same records give the same statement hash."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from idlewire.hub import economy as eco_db
from test_economy_db import HOUR, RULES, T0, World, chain, fixed_key

node_st = st.fixed_dictionaries({
    "staked": st.booleans(),
    "beats": st.integers(0, 70),
    "region": st.sampled_from(["DE", "NG", "JP"]),
    "sessions": st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5_000_000), st.booleans(),
                                   st.sampled_from([1.0, 0.99, 0.5])), max_size=3),
})


def run(world_spec: list[dict], tmp: Path) -> tuple[list[dict], World]:
    w = World(f"sqlite:///{tmp / 'hub.sqlite'}", tmp)
    buyer = fixed_key(60)
    eco_db.fund(w.engine, w.eco, "buyer:" + eco_db.core.public_b64(buyer), 10**9, "market", now=w.t[0])
    out = []
    for epoch in range(2):
        w.t[0] = T0 + epoch * HOUR + 1
        for i, spec in enumerate(world_spec):
            nid = w.node(i + 1, spec["region"])
            if epoch == 0 and spec["staked"]:
                eco_db.stake(w.engine, w.eco, nid, RULES.staking.min_stake, src="treasury", now=w.t[0])
            w.beats(nid, spec["beats"])
            for k, (n, step, cosign, factor) in enumerate(spec["sessions"]):
                w.upload(nid, chain(w.keys[nid], f"{epoch}{i}{k}".ljust(16, "x"), n, buyer_key=buyer, step=step,
                                    cosign=cosign, buyer_factor=factor))
        w.t[0] = T0 + (epoch + 1) * HOUR + 1
        s = w.settle()
        out.append({"statement": s.statement, "hash": s.hash, "rows": eco_db.earnings(w.engine),
                    "balances": eco_db.balances(w.engine)})
    return out, w


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(node_st, min_size=1, max_size=3))
def test_settlement_invariants_hold_on_the_database(world_spec):
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        epochs, w = run(world_spec, Path(a))
        supply = sum(g.amount for g in RULES.genesis)
        for e in epochs:
            st_, bal = e["statement"], e["balances"]
            assert sum(bal.values()) == 0
            assert all(v >= 0 for k, v in bal.items() if k != "mint")
            assert st_["supply"] == supply + st_["minted"] - st_["burned"] == -bal["mint"] - bal.get("burn", 0)
            supply = st_["supply"]
            assert sum(r["reward"] for r in e["rows"]) == st_["minted"] <= st_["emission"] + st_["carried_in"]
            assert st_["carried_out"] == st_["emission"] + st_["carried_in"] - st_["minted"]
            assert all(r["verified_bytes"] > 0 and r["stake"] >= RULES.staking.min_stake
                       for r in e["rows"] if r["reward"])
        w.engine.dispose()
        again, w2 = run(world_spec, Path(b))
        assert [e["hash"] for e in again] == [e["hash"] for e in epochs]
        w2.engine.dispose()
