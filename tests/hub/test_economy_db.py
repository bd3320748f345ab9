"""The economy on the hub's database (SQLite and a real PostgreSQL): epochs settled from the receipts,
heartbeats and flags the hub stored, through the pure core; the ledger, stakes, slashes with
evidence, the statement a node checks, and what several hub processes do to one epoch."""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import sys
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hublab import ROOT
from idlewire.economy.rules import Rules, emission_for, parse_rules
from idlewire.economy.settle import tokens_for
from idlewire.hub import db
from idlewire.hub import economy as eco_db
from idlewire.hub.service import Hub, Signed
from idlewire_agent import merkle
from idlewire_agent import receipts as rc
from idlewire_agent.keys import wg_keypair
from test_hub import CAPS, chain, lagging

HOUR = 3600
T0 = 1_800_000_000 // HOUR * HOUR   # epoch 0 starts here
RULES = parse_rules({"epoch_seconds": HOUR})
_nonce = itertools.count()


def fixed_key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)


class World:
    """A hub in this process on DB_URL with a clock the test moves; nodes, buyers and receipts."""

    def __init__(self, url: str, tmp_path, rules: Rules = RULES):
        self.engine = db.make_engine(url)
        db.migrate(self.engine)
        self.t = [float(T0)]
        self.hub = Hub(self.engine, clock=lambda: self.t[0])
        prices = tmp_path / f"prices-{next(_nonce)}.csv"
        prices.write_text("0,0.25\n")
        self.eco = eco_db.Economy(rules, fixed_key(99), eco_db.pricefeed.FilePriceFeed(prices))
        eco_db.genesis(self.engine, self.eco, now=self.t[0])
        self.keys: dict[str, Ed25519PrivateKey] = {}
        self.sold: set[tuple[str, str]] = set()

    def auth(self, key) -> Signed:
        pub = base64.b64encode(key.public_key().public_bytes_raw()).decode()
        return Signed(pub, f"nonce{next(_nonce):012d}", int(self.t[0]) + 1000)

    def node(self, i: int, region: str = "DE") -> str:
        key = fixed_key(i)
        out = self.hub.register(self.auth(key), {
            "wg_public_key": wg_keypair()[1], "payout": rc.payout_statement(key, f"addr{i}", f"unit{i}"),
            "region": region, "caps": {**CAPS, "max_sessions": 1000}, "price_per_gb": 0.5,
            "endpoint": "203.0.113.7:51820", "version": "1"})
        self.keys[out["node"]] = key
        return out["node"]

    def beats(self, nid: str, n: int = 60) -> None:
        for _ in range(n):
            self.hub.heartbeat(nid, self.auth(self.keys[nid]), {"uptime": 1.0})

    def sell(self, nid: str, buyer, sid: str | None = None) -> str:
        """A session the hub sells to BUYER (a key, or its base64) on node NID, as `connect --hub` buys
        one: the buyer's request queued for the node, the node's channel takes it, the node answers
        with the session it opened (SID, or a new id)."""
        buyer_key = buyer if isinstance(buyer, str) else rc.pub_b64(buyer)
        node = self.auth(self.keys[nid])
        self.hub.claim(nid, node)  # the node's channel is open
        rid, _ = self.hub.queue_open(Signed(buyer_key, f"nonce{next(_nonce):012d}", int(self.t[0]) + 1000),
                                     {"wg_public_key": wg_keypair()[1], "node": nid})
        (req,) = self.hub.claim(nid, self.auth(self.keys[nid]))
        assert req["id"] == rid and req["body"]["buyer_key"] == buyer_key
        sid = sid or os.urandom(8).hex()
        self.hub.answer(nid, self.auth(self.keys[nid]), rid, {"ok": True, "result": {"session": sid}})
        self.sold.add((nid, sid))
        return sid

    def upload(self, nid: str, entries: list[dict], sell: bool = True) -> dict:
        """Store ENTRIES as node NID uploads them; each session not sold yet is sold first (SELL) to
        the buyer its receipts name, as the hub would have sold it."""
        for e in entries if sell else ():
            if (nid, e["session"]) not in self.sold:
                buyer = e.get("buyer_key") or (e.get("buyer") or {}).get("key") or rc.pub_b64(fixed_key(50))
                self.sell(nid, buyer, e["session"])
        return self.hub.store_receipts(nid, self.auth(self.keys[nid]), entries)

    def settle(self, **kw):
        return eco_db.settle_epoch(self.engine, self.eco, now=self.t[0], **kw)


def ledger_sums_to_zero(engine) -> None:
    bal = eco_db.balances(engine)
    assert sum(bal.values()) == 0
    assert all(v >= 0 for k, v in bal.items() if k != "mint"), bal


def staked_world(url, tmp_path) -> tuple[World, str, str]:
    w = World(url, tmp_path)
    a, b = w.node(1, "DE"), w.node(2, "DE")
    for n in (a, b):
        eco_db.stake(w.engine, w.eco, n, RULES.staking.min_stake, src="treasury", now=w.t[0])
    eco_db.fund(w.engine, w.eco, "buyer:" + base64.b64encode(fixed_key(50).public_key().public_bytes_raw()).decode(),
                10**12, "market", now=w.t[0])
    return w, a, b


def test_an_epoch_settles_from_the_stored_receipts_once(db_url, tmp_path):
    w, a, b = staked_world(db_url, tmp_path)
    w.beats(a)
    w.beats(b)
    # 5 co-signed receipts, running totals 4,000 … 20,000,000 bytes (step 1 MB)
    w.upload(a, chain(w.keys[a], "s" * 16, 5, buyer_key=fixed_key(50), step=1_000_000))
    with pytest.raises(eco_db.EconomyError, match="epoch 0 has not ended"):
        w.settle()
    w.t[0] = T0 + HOUR + 5
    s = w.settle()
    st = s.statement
    assert merkle.verify_statement(st, w.eco.hub_key)
    assert st["epoch"] == 0 and st["emission"] == emission_for(RULES, 0)
    # the one node with verified usage takes the whole pool, to the last unit
    rows = {r["node_id"]: r for r in eco_db.earnings(w.engine)}
    assert rows[a]["reward"] == st["minted"] == st["emission"]
    assert rows[b]["reward"] == 0 and rows[b]["why_not"] == "no verified usage"
    assert rows[a]["verified_bytes"] == 20_000_000 and rows[a]["uptime_ppm"] == 1_000_000
    want, _ = tokens_for(RULES, 20_000_000, 250_000)
    assert st["burned"] == want > 0
    genesis = sum(g.amount for g in RULES.genesis)
    assert st["supply"] == genesis + st["minted"] - st["burned"]
    ledger_sums_to_zero(w.engine)
    assert eco_db.balances(w.engine, "payout:addr1") == {"payout:addr1": st["minted"]}
    # the node's answer: its leaf and proof check against the signed statement
    got = eco_db.node_earnings(w.engine, a)
    assert merkle.check_reward(got["statement"], got["leaf"], got["proof"], a, w.eco.hub_key) is None
    assert eco_db.node_earnings(w.engine, b)["leaf"] is None
    # a second settle of epoch 0 (another hub process, or a retry) changes nothing
    entries = _count(w.engine, db.econ_entries)
    again = w.settle(epoch=0)
    assert again.already and again.hash == s.hash and _count(w.engine, db.econ_entries) == entries
    with pytest.raises(eco_db.EconomyError, match="epoch 1 is not settled yet"):
        w.settle(epoch=2)


def _count(engine, table) -> int:
    from sqlalchemy import func, select

    with db.read(engine) as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar()


def build(url, tmp_path) -> str:
    w, a, b = staked_world(url, tmp_path)
    c = w.node(3, "NG")
    eco_db.stake(w.engine, w.eco, c, RULES.staking.min_stake, src="treasury", now=w.t[0])
    for n in (a, b, c):
        w.beats(n, 45)
    w.upload(a, chain(w.keys[a], "a" * 16, 4, buyer_key=fixed_key(50), step=3_000_000))
    w.upload(c, chain(w.keys[c], "c" * 16, 3, buyer_key=fixed_key(50), step=2_000_000))
    w.upload(b, chain(w.keys[b], "b" * 16, 2, buyer_key=fixed_key(50), step=2_000_000, cosign=False))
    w.t[0] = T0 + HOUR + 1
    return w.settle().hash


def test_settlement_is_deterministic_across_databases(db_url, tmp_path):
    """Same records → the same statement hash, on SQLite and on PostgreSQL alike."""
    assert build(db_url, tmp_path) == build(f"sqlite:///{tmp_path / 'other.sqlite'}", tmp_path)


def test_equivocation_is_slashed_with_both_receipts_as_evidence(db_url, tmp_path):
    w, a, _b = staked_world(db_url, tmp_path)
    w.beats(a)
    first = chain(w.keys[a], "e" * 16, 3, buyer_key=fixed_key(50), step=1_000_000)
    w.upload(a, first)
    other = chain(w.keys[a], "e" * 16, 3, buyer_key=fixed_key(50), step=1_500_000)
    out = w.upload(a, other)
    assert [f["kind"] for f in out["flags"]] == ["equivocation"]
    w.t[0] = T0 + HOUR + 1
    st = w.settle().statement
    (sl,) = st["slashes"]
    assert sl["node"] == a and sl["kind"] == "equivocation"
    assert sl["amount"] == RULES.staking.min_stake * RULES.staking.slash_equivocation_ppm // 1_000_000
    with db.read(w.engine) as conn:
        ev = json.loads(conn.execute(db.econ_slashes.select()).mappings().one()["evidence"])
    (pair,) = ev["records"]
    assert {r["hash"] if "hash" in r else rc.receipt_hash(r) for r in pair} == {rc.receipt_hash(first[0]),
                                                                                rc.receipt_hash(other[0])}
    assert eco_db.earnings(w.engine, a)[0]["why_not"] == "slashed this epoch"
    assert eco_db.balances(w.engine, "slashed") == {"slashed": sl["amount"]}
    ledger_sums_to_zero(w.engine)


def test_usage_counts_only_in_sessions_the_hub_sold_and_forged_cosignatures_are_slashed(db_url, tmp_path):
    """#16's hole: a node invented sessions co-signed by a "buyer" key it controls, and the hub took
    them (and the key they named) as verified usage. The hub counts usage only in sessions it sold
    (connect --hub), co-signed by the buyer it sold each to. A session it never opened (a buyer on
    the owner's LAN, or an invented one) is refused without a slash: it proves nothing about the
    hub's buyers. A sold session co-signed by another key, or with a co-signature that is no
    signature, is forged usage: refused, and slashed with the node-signed receipts as evidence."""
    from idlewire.hub.service import HubError

    w, a, b = staked_world(db_url, tmp_path)
    w.beats(a)
    w.beats(b)
    buyer, mine = fixed_key(50), fixed_key(60)  # the buyer the hub sells to; a key the node controls
    # a session the hub never opened, co-signed by the node's own key: refused, nothing stored or flagged
    invented = chain(w.keys[a], "1" * 16, 3, buyer_key=mine, step=10_000_000)
    w.hub.heartbeat(a, w.auth(w.keys[a]), {"uptime": 1.0, "sessions": [{"session": "1" * 16, "head": ""}]})
    with pytest.raises(HubError) as e:
        w.upload(a, invented, sell=False)
    assert e.value.status == 409 and "\n" not in e.value.message, e.value.message
    assert "1" * 16 in e.value.message and "not opened through this hub" in e.value.message
    # a session the hub sold to `buyer`, co-signed by the node's key: forged usage
    sid = w.sell(a, buyer)
    forged = chain(w.keys[a], sid, 3, buyer_key=mine, step=10_000_000)
    with pytest.raises(HubError) as e:
        w.upload(a, forged)
    assert e.value.status == 422 and "forged usage" in e.value.message and "\n" not in e.value.message
    # a co-signature that is no signature, in another sold session: forged usage too
    sid2 = w.sell(a, buyer)
    stmt = {**rc.sign_usage(buyer, sid2, 5_000_000, 5_000_000, 1_700_000_001), "up": 50_000_000}
    fabricated = [rc.make_receipt(w.keys[a], sid2, 1, 50_000_000, 5_000_000, 1_700_000_001, rc.GENESIS, stmt)]
    with pytest.raises(HubError) as e:
        w.upload(a, fabricated)
    assert e.value.status == 422 and "forged usage" in e.value.message
    # b's sold session, co-signed by its buyer, counts
    assert w.upload(b, chain(w.keys[b], w.sell(b, buyer), 3, buyer_key=buyer, step=10_000_000))["stored"] == 3
    with db.read(w.engine) as conn:
        s = db.sessions.c
        keys = dict(conn.execute(db.sessions.select().with_only_columns(s.session, s.buyer_key)).all())
        assert _count(w.engine, db.receipts) == 3
    assert keys[sid] == keys[sid2] == rc.pub_b64(buyer)  # the receipts did not rewrite the session's buyer
    # nor can the node move a sold session to another buyer by answering that buyer's request with it
    with pytest.raises(HubError) as e:
        w.sell(a, fixed_key(51), sid=sid)
    assert e.value.status == 409 and "sold before" in e.value.message
    with db.read(w.engine) as conn:
        q = db.requests.c
        assert conn.execute(db.requests.select().with_only_columns(q.state).where(
            q.buyer_key == rc.pub_b64(fixed_key(51)))).scalar() == "failed"  # the buyer hears it failed
        assert conn.execute(db.sessions.select().with_only_columns(db.sessions.c.buyer_key).where(
            db.sessions.c.session == sid)).scalar() == rc.pub_b64(buyer)
    w.t[0] = T0 + HOUR + 1
    st = w.settle().statement
    (sl,) = st["slashes"]
    assert (sl["node"], sl["kind"]) == (a, "forged_usage")
    assert sl["amount"] == RULES.staking.min_stake * RULES.staking.slash_forged_usage_ppm // 1_000_000
    with db.read(w.engine) as conn:
        ev = json.loads(conn.execute(db.econ_slashes.select()).mappings().one()["evidence"])
    assert len(ev["ids"]) == 2
    got = sorted(rc.receipt_hash(r) for records in ev["records"] for r in records)
    assert got == sorted(rc.receipt_hash(r) for r in forged + fabricated)
    rows = {r["node_id"]: r for r in eco_db.earnings(w.engine)}
    assert rows[a]["verified_bytes"] == 0 and rows[a]["reward"] == 0
    assert rows[b]["verified_bytes"] == 120_000_000 and rows[b]["reward"] == st["minted"] > 0
    assert st["burned"] == tokens_for(RULES, 120_000_000, 250_000)[0]  # the buyer pays for b's usage alone
    ledger_sums_to_zero(w.engine)


def test_unbonded_stake_returns_after_the_delay(db_url, tmp_path):
    rules = parse_rules({"epoch_seconds": HOUR, "staking": {"unbonding_epochs": 2}})
    w = World(db_url, tmp_path, rules)
    a = w.node(1)
    eco_db.stake(w.engine, w.eco, a, 3 * 10**9, src="treasury", now=w.t[0])
    with pytest.raises(eco_db.EconomyError, match="requested"):
        eco_db.unbond(w.engine, w.eco, a, 4 * 10**9, now=w.t[0])
    u = eco_db.unbond(w.engine, w.eco, a, 10**9, now=w.t[0])
    assert u["release_epoch"] == 2 and u["bonded"] == 2 * 10**9
    for e in range(3):
        w.t[0] = T0 + (e + 1) * HOUR + 1
        w.settle()
        held = eco_db.balances(w.engine, "payout:addr1").get("payout:addr1", 0)
        assert held == (10**9 if e == 2 else 0)
    assert eco_db.balances(w.engine, "unbonding:")[f"unbonding:{a}"] == 0
    with pytest.raises(eco_db.EconomyError, match="payout:addr1 holds 1000000000 base units"):
        eco_db.stake(w.engine, w.eco, a, 10**12, now=w.t[0])
    ledger_sums_to_zero(w.engine)


def test_a_hub_with_other_rules_or_key_is_refused(db_url, tmp_path):
    w = World(db_url, tmp_path)
    other = eco_db.Economy(parse_rules({"epoch_seconds": 60}), w.eco.key, w.eco.prices)
    with pytest.raises(eco_db.EconomyError, match="same --rules"):
        eco_db.settle_epoch(w.engine, other, now=T0 + 10 * HOUR)
    other = eco_db.Economy(RULES, fixed_key(7), w.eco.prices)
    with pytest.raises(eco_db.EconomyError, match="same statement key"):
        eco_db.settle_epoch(w.engine, other, now=T0 + 10 * HOUR)


def test_hub_processes_racing_to_settle_mint_once(db_url, tmp_path):
    """Four `idlewire hub settle --epoch 0` processes at once: one settles, the others find it settled."""
    rules = tmp_path / "rules.toml"
    rules.write_text("epoch_seconds = 1\n")
    prices = tmp_path / "prices.csv"
    prices.write_text("0,0.25\n")
    key = tmp_path / "hub.key"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tools'}:{ROOT / 'agent'}"}
    args = [sys.executable, "-m", "idlewire", "hub", "settle", "--db", db_url, "--rules", str(rules),
            "--prices", str(prices), "--key", str(key), "--epoch", "0", "--json"]
    subprocess.run([*args[:-3], "--json"], env=env, capture_output=True, text=True, timeout=60)  # genesis
    import time

    time.sleep(1.2)
    outs = []

    def run():
        outs.append(subprocess.run(args, env=env, capture_output=True, text=True, timeout=120))

    ts = [threading.Thread(target=run) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    got = [json.loads(o.stdout) for o in outs]
    assert sorted(g["already"] for g in got) == [False, True, True, True]
    assert len({g["hash"] for g in got}) == 1
    engine = db.make_engine(db_url)
    assert _count(engine, db.econ_epochs) == 1
    ledger_sums_to_zero(engine)
    engine.dispose()


def test_settle_cli_refusals_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tools'}:{ROOT / 'agent'}"}
    url = f"sqlite:///{tmp_path / 'h.sqlite'}"
    base = [sys.executable, "-m", "idlewire", "hub"]
    out = subprocess.run([*base, "settle", "--db", url, "--prices", str(tmp_path / "nope.csv"), "--key",
                          str(tmp_path / "k")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "no such price file" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    (tmp_path / "p.csv").write_text("0,0.25\n")
    common = ["--db", url, "--prices", str(tmp_path / "p.csv"), "--key", str(tmp_path / "k")]
    out = subprocess.run([*base, "stake", "nosuchnode", "10", *common], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "not registered" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([*base, "settle", *common], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "has not ended" in out.stderr
    assert oct(os.stat(tmp_path / "k").st_mode & 0o777) == "0o600"


def test_failed_probes_cost_uptime_and_stake_with_the_measurements_as_evidence(db_url, tmp_path):
    """A node advertising 50 Mbit/s that the prober measures at 5: every probe fails, its uptime is 0,
    and at probes.slash_after_failures failures it is slashed with the probe ids and measurements."""
    w, a, b = staked_world(db_url, tmp_path)
    for n in (a, b):
        w.beats(n)
        w.upload(n, chain(w.keys[n], n[:16], 3, buyer_key=fixed_key(50), step=1_000_000))
    for i in range(3):
        w.t[0] = T0 + 100 + i
        eco_db.record_probe(w.engine, a, True, 5, 50, 20, now=w.t[0])
        eco_db.record_probe(w.engine, b, True, 48, 50, 20, now=w.t[0])
    w.t[0] = T0 + HOUR + 1
    st = w.settle().statement
    (sl,) = st["slashes"]
    assert sl["node"] == a and sl["kind"] == "failed_probes" and len(sl["evidence"]) == 3
    rows = {r["node_id"]: r for r in eco_db.earnings(w.engine)}
    assert rows[a]["uptime_ppm"] == 0 and rows[a]["reward"] == 0 and rows[a]["why_not"] == "slashed this epoch"
    assert rows[b]["uptime_ppm"] == 1_000_000 and rows[b]["reward"] == st["minted"]
    with db.read(w.engine) as conn:
        ev = json.loads(conn.execute(db.econ_slashes.select()).mappings().one()["evidence"])
    assert sorted(r["id"] for r in ev["records"]) == sorted(sl["evidence"])
    assert {(r["mbit"], r["advertised_mbit"]) for r in ev["records"]} == {(5, 50)}
    assert sl["amount"] == RULES.staking.min_stake * RULES.staking.slash_failed_probes_ppm // 1_000_000


def test_hub_serve_settles_on_its_schedule(tmp_path):
    """`hub serve --settle-every 1` with 1-second epochs: the statements appear at /v1/epochs by themselves."""
    import time
    import urllib.request

    from hublab import free_port

    (tmp_path / "rules.toml").write_text("epoch_seconds = 1\n")
    (tmp_path / "prices.csv").write_text("0,0.25\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tools'}:{ROOT / 'agent'}"}
    proc = subprocess.Popen([sys.executable, "-m", "idlewire", "hub", "serve", "--db", f"sqlite:///{tmp_path / 'h.db'}",
                             "--listen", f"127.0.0.1:{port}", "--settle-every", "1", "--rules",
                             str(tmp_path / "rules.toml"), "--prices", str(tmp_path / "prices.csv"), "--key",
                             str(tmp_path / "k"), "--log-level", "warning"], env=env)
    try:
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/epochs", timeout=5) as r:
                    got = json.load(r)
            except OSError:
                continue
        assert len(got) >= 2, got
        assert [e["epoch"] for e in got] == list(range(len(got) - 1, -1, -1))
    finally:
        proc.terminate()
        proc.wait(10)


def test_usage_of_a_session_first_heard_in_a_heartbeat_burns_its_buyers_tokens(db_url, tmp_path):
    """A session the hub sold reaches it in the node's heartbeat before the node's answer does (the
    heartbeat goes at once when a session opens): the answer still binds the buyer whose tokens the
    usage burns."""
    w, a, _ = staked_world(db_url, tmp_path)
    w.hub.heartbeat(a, w.auth(w.keys[a]), {"uptime": 1.0, "sessions": [{"session": "h" * 16, "head": ""}]})
    w.upload(a, chain(w.keys[a], "h" * 16, 2, buyer_key=fixed_key(50), step=10_000_000))
    w.t[0] = T0 + HOUR + 1
    st = w.settle().statement
    assert st["burned"] == tokens_for(RULES, 80_000_000, 250_000)[0] > 0


def test_usage_the_prober_disputes_is_inflated_and_slashed_with_the_receipts(db_url, tmp_path):
    """The prober buys with the hub's key: a node that signs for twice what the prober co-signed is
    slashed for inflated usage on the prober's word alone, the receipts in the evidence."""
    w, a, b = staked_world(db_url, tmp_path)
    w.beats(a)
    # (3 receipts: the prober's last statement, 60 MB, is short of the 80 MB counted in the receipt
    # before it, beyond what lag explains)
    w.upload(a, chain(w.keys[a], "p" * 16, 3, buyer_key=w.eco.key, step=10_000_000, buyer_factor=0.5))
    w.upload(b, chain(w.keys[b], "q" * 16, 3, buyer_key=fixed_key(50), step=10_000_000, buyer_factor=0.5))
    w.t[0] = T0 + HOUR + 1
    st = w.settle().statement
    (sl,) = st["slashes"]  # one stingy ordinary buyer does not get b slashed
    assert (sl["node"], sl["kind"]) == (a, "inflated_usage") and sl["evidence"] == [f"{a}/{'p' * 16}/3"]
    with db.read(w.engine) as conn:
        ev = json.loads(conn.execute(db.econ_slashes.select()).mappings().one()["evidence"])
    (r,) = ev["records"]
    assert r["seq"] == 3 and r["buyer"]["key"] == w.eco.hub_key and r["down"] == 2 * r["buyer"]["down"]


def test_lag_is_not_inflation_statements_are_held_to_the_count_before_them(db_url, tmp_path):
    """A buyer signs its counters and the node counts on while the statement travels: each receipt
    counts more than the statement it carries (receipts.acknowledged). Settlement holds a statement
    to the node's count in the receipt before it, across the epoch boundary too, so an honest node
    whose short probe session lags by a whole receipt is verified, not slashed for inflation (which
    the prober's word alone would do), and every byte the buyer signed counts once."""
    w, a, _ = staked_world(db_url, tmp_path)
    w.beats(a)
    mb = 1_000_000
    probe = lagging(w.keys[a], "l" * 16, [8 * mb, 16 * mb, 24 * mb], [0, 8 * mb, 16 * mb + 1], buyer=w.eco.key)
    # the old rule (node's newest count against the buyer's newest statement) called this inflated
    assert not rc.agreed(24 * mb, 16 * mb + 1, RULES.market.tolerance_ppm / 1e6)
    w.upload(a, probe)
    # the next epoch's receipts (after the checkpoint of the last one sent): still one receipt behind
    more = lagging(w.keys[a], "l" * 16, [32 * mb, 40 * mb], [24 * mb, 32 * mb], start=4,
                   prev=rc.receipt_hash(probe[-1]), buyer=w.eco.key)
    w.t[0] = T0 + HOUR + 1
    assert w.upload(a, [rc.make_checkpoint(w.keys[a], probe[-1]), *more])["stored"] == 2
    st = w.settle().statement
    assert st["slashes"] == []
    (row,) = [r for r in eco_db.earnings(w.engine) if r["node_id"] == a]
    assert row["verified_bytes"] == 16 * mb + 1 and row["reward"] > 0
    w.beats(a)
    w.t[0] = T0 + 2 * HOUR + 1
    st = w.settle().statement
    assert st["slashes"] == []
    (row,) = [r for r in eco_db.earnings(w.engine) if r["node_id"] == a]
    assert row["verified_bytes"] == 32 * mb - (16 * mb + 1)


def test_requests_no_node_could_serve_count_in_their_regions_demand(db_url, tmp_path):
    """A buyer asking for a region where no node is online is refused (503) and the hub stores the
    request; settlement counts each buyer holding tokens once in the region's demand (as much as the
    epoch's mean buyer session), so the multiplier of the underserved region rises. Retries and
    buyers without tokens add nothing."""
    from idlewire.economy.scores import multipliers
    from idlewire.hub.service import HubError

    w, a, _ = staked_world(db_url, tmp_path)
    c = w.node(3, "NG")
    eco_db.stake(w.engine, w.eco, c, RULES.staking.min_stake, src="treasury", now=w.t[0])
    # (asked while c's channel is not open yet: the sales below open it)
    for key in (fixed_key(50), fixed_key(50), fixed_key(51)):  # funded (twice), and one without tokens
        with pytest.raises(HubError) as e:
            w.hub.queue_open(w.auth(key), {"region": "NG", "wg_public_key": wg_keypair()[1]})
        assert e.value.status == 503
    for n in (a, c):
        w.beats(n)
        w.upload(n, chain(w.keys[n], n[:8].ljust(16, "s"), 5, buyer_key=fixed_key(50), step=1_000_000))
    with db.read(w.engine) as conn:
        assert len(conn.execute(db.unserved.select()).all()) == 2   # one row per buyer and minute
    w.t[0] = T0 + HOUR + 1
    st = w.settle().statement
    # 20 MB verified in each region; NG also one funded buyer's request (the mean session: 20 MB)
    want = multipliers(RULES, {"DE": 20_000_000, "NG": 40_000_000}, {"DE": CAPS["down_mbit"], "NG": CAPS["down_mbit"]})
    assert st["multipliers"] == want and want["NG"] > want["DE"] == 1_000_000
    rows = {r["node_id"]: r for r in eco_db.earnings(w.engine)}
    wa, wc = (rows[n]["verified_bytes"] * rows[n]["multiplier_ppm"] * rows[n]["reputation_ppm"] * rows[n]["uptime_ppm"]
              for n in (a, c))
    assert rows[c]["reward"] == st["emission"] * wc // (wa + wc) > rows[a]["reward"]


def test_a_final_receipt_the_buyer_did_not_sign_keeps_what_it_signed_before(db_url, tmp_path):
    """A session closed while the buyer was gone ends with a receipt only the node signed: that
    receipt proves nothing more, and the co-signed receipts before it still count."""
    w, a, _ = staked_world(db_url, tmp_path)
    w.beats(a)
    signed = chain(w.keys[a], "f" * 16, 3, buyer_key=fixed_key(50), step=1_000_000)
    final = chain(w.keys[a], "f" * 16, 1, start=4, prev=rc.receipt_hash(signed[-1]), step=1_000_000, cosign=False)
    w.upload(a, signed + final)
    w.t[0] = T0 + HOUR + 1
    w.settle()
    (row,) = [r for r in eco_db.earnings(w.engine) if r["node_id"] == a]
    assert row["verified_bytes"] == 12_000_000 and row["reward"] > 0
