"""Ledger, metering rules, sessions and receipts without namespaces (synthetic counter source)."""

import base64
import json
import os
import sqlite3

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from idlewire_agent import keys, receipts
from idlewire_agent.agent import Agent, SessionError, counter_delta
from idlewire_agent.config import parse
from synthetic import SyntheticTunnel


class Clock:
    def __init__(self):
        self.t = 1_700_000_000.0

    def __call__(self):
        return self.t


def wgkey() -> str:
    return keys.wg_keypair()[1]


@pytest.fixture
def make(tmp_path):
    def make(tunnel=None, clock=None, **over):
        data = {"node": {"state_dir": str(tmp_path / "state"), "key_file": str(tmp_path / "node.key"),
                         "price_per_gb": 2.0},
                "tunnel": {"pool": "10.99.0.0/29", "private_key_file": str(tmp_path / "wg.key")},
                "metering": {"poll_interval": 5, "line_rate_mbit": 8, "unpaid_cap_mb": 1},
                "sessions": {"max": 3, "idle_timeout": 60, "expiry": 3600},
                "api": {"admin_token_file": str(tmp_path / "admin.token")}}
        for k, v in over.items():
            sec, key = k.split("__")
            data.setdefault(sec, {})[key] = v
        return Agent(parse(data), tunnel or SyntheticTunnel(), clock or Clock())
    return make


def test_counter_delta_reset_and_clamp():
    assert counter_delta(150, 100, 1e9) == (50, False, 0)
    assert counter_delta(30, 100, 1e9) == (30, True, 0)  # went down: a reset, count the new value
    assert counter_delta(100, 100, 1e9) == (0, False, 0)
    assert counter_delta(5000, 0, 1000) == (1000, False, 4000)


def test_poll_counts_once_across_restarts_and_resets(make):
    t = SyntheticTunnel()
    a = make(t)
    buyer = Ed25519PrivateKey.generate()
    s = a.open_session(receipts.pub_b64(buyer), k := wgkey())
    assert s["address"] == "10.99.0.2/32" and t.calls[-1] == ("add", k, "10.99.0.2/32")
    t.traffic(k, 1000, 2000)
    a.poll()
    t.traffic(k, 500, 0)
    a.poll()
    a.poll()  # nothing new: nothing added
    assert (a.describe(s["session"])["up"], a.describe(s["session"])["down"]) == (1500, 2000)
    # The agent restarts on the same ledger while the interface keeps its counters.
    a.ledger.close()
    b = make(t)
    t.traffic(k, 100, 100)
    b.poll()
    assert (b.describe(s["session"])["up"], b.describe(s["session"])["down"]) == (1600, 2100)
    # The interface is recreated: counters restart at zero, the peer is added back.
    t.recreate()
    b.poll()
    assert k in t.peers
    t.traffic(k, 10, 20)
    b.poll()
    assert (b.describe(s["session"])["up"], b.describe(s["session"])["down"]) == (1610, 2120)
    assert b.ledger.lifetime() == (1610, 2120)
    assert sum(d["rx"] for d in b.ledger.days()) == 1610
    assert b.ledger.integrity() == "ok"


def test_counter_going_down_without_a_new_interface(make):
    t = SyntheticTunnel()
    a = make(t)
    s = a.open_session(receipts.pub_b64(Ed25519PrivateKey.generate()), k := wgkey())
    t.traffic(k, 5000, 5000)
    a.poll()
    t.peers[k][:] = [300, 0]  # went down
    a.poll()
    d = a.describe(s["session"])
    assert (d["up"], d["down"]) == (5300, 5000)


def test_delta_above_line_rate_is_clamped(make):
    t = SyntheticTunnel()
    a = make(t)  # 8 Mbit/s x 5 s = 5 MB per poll at most
    s = a.open_session(receipts.pub_b64(Ed25519PrivateKey.generate()), k := wgkey())
    a.poll()
    t.traffic(k, 50_000_000, 0)
    a.poll()
    assert a.describe(s["session"])["up"] <= 5_000_000 * 1.2
    assert a.stats.clamps == 1


def test_session_limits_expiry_idle_and_unpaid(make):
    t, clock = SyntheticTunnel(), Clock()
    # One buyer key reopening after an unpaid close, sessions idle before any handshake deadline:
    # test_agent_admission.py covers the back-off and the deadline.
    a = make(t, clock, sessions__unpaid_backoff=0, sessions__handshake_timeout=3600)
    buyer = Ed25519PrivateKey.generate()
    bk = receipts.pub_b64(buyer)
    ids = [a.open_session(bk, wgkey())["session"] for _ in range(3)]
    with pytest.raises(SessionError) as e:
        a.open_session(bk, wgkey())
    assert e.value.status == 503
    with pytest.raises(SessionError) as e:
        a.open_session(bk, "not-a-key")
    assert e.value.status == 400
    assert len({a.describe(i)["address"] for i in ids}) == 3
    # Idle: no traffic from the buyer for longer than idle_timeout.
    clock.t += 61
    a.poll()
    assert {a.describe(i)["reason"] for i in ids} == {"idle"}
    assert not t.peers
    # Closed sessions free their addresses; unpaid usage beyond the cap cuts a session off.
    s = a.open_session(bk, k := wgkey())
    t.traffic(k, 600_000, 600_000)
    a.poll()
    assert a.describe(s["session"])["state"] == "closed" and a.describe(s["session"])["reason"] == "unpaid"
    # Co-signed usage is paid: the same traffic with a co-signature keeps the session open.
    s = a.open_session(bk, k := wgkey())
    t.traffic(k, 600_000, 600_000)
    a.ledger.db.execute("UPDATE sessions SET rx = 1200000 WHERE id = ?", (s["session"],))  # as a poll would
    r = a.cosign(s["session"], bk, receipts.sign_usage(buyer, s["session"], 1_200_000, 0, int(clock.t)))
    assert r["agreed"] and r["receipt"]["seq"] == 1
    a.ledger.db.execute("UPDATE peers SET rx_raw = 600000, tx_raw = 600000 WHERE wg_key = ?", (k,))
    a.poll()
    assert a.describe(s["session"])["state"] == "open"
    clock.t += 3601
    a.poll()
    assert a.describe(s["session"])["reason"] == "expired"


def test_cosign_rejects_bad_signatures_and_other_buyers(make):
    a = make()
    buyer, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    s = a.open_session(receipts.pub_b64(buyer), wgkey())["session"]
    stmt = receipts.sign_usage(buyer, s, 10, 10, 1)
    with pytest.raises(SessionError) as e:
        a.cosign(s, receipts.pub_b64(other), stmt)
    assert e.value.status == 404
    forged = {**stmt, "up": 11}
    with pytest.raises(SessionError) as e:
        a.cosign(s, receipts.pub_b64(buyer), forged)
    assert e.value.status == 400
    a.cosign(s, receipts.pub_b64(buyer), stmt)
    with pytest.raises(SessionError) as e:  # cumulative figures never go down
        a.cosign(s, receipts.pub_b64(buyer), receipts.sign_usage(buyer, s, 5, 10, 2))
    assert e.value.status == 409


def _chain(n=4):
    node = Ed25519PrivateKey.generate()
    buyer = Ed25519PrivateKey.generate()
    out, prev = [], receipts.GENESIS
    for i in range(1, n + 1):
        r = receipts.make_receipt(node, "abc", i, i * 100, i * 200, 1000 + i, prev,
                                  receipts.sign_usage(buyer, "abc", i * 100, i * 200, 1000 + i))
        out.append(r)
        prev = receipts.receipt_hash(r)
    return node, out


def test_receipt_chain_verifies():
    node, rs = _chain()
    assert receipts.verify(rs) is None
    assert receipts.verify(rs, receipts.pub_b64(node)) is None
    assert "another node key" in receipts.verify(rs, receipts.pub_b64(Ed25519PrivateKey.generate())).reason


@pytest.mark.parametrize("attack, index, words", [
    ("tamper", 2, "signature"), ("reorder", 1, "seq"), ("forge", 2, "chain"), ("drop", 2, "seq"),
    ("rollback", 2, "went down"), ("buyer", 1, "buyer"),
])
def test_receipt_attacks_name_the_first_bad_one(attack, index, words):
    node, rs = _chain()
    rs = [dict(r) for r in rs]
    if attack == "tamper":
        rs[2]["down"] += 1
    elif attack == "reorder":
        rs[1], rs[2] = rs[2], rs[1]
    elif attack == "forge":  # a well-formed receipt signed by another key
        other = Ed25519PrivateKey.generate()
        rs[2] = receipts.make_receipt(other, "abc", 3, 300, 600, 1003, receipts.receipt_hash(rs[1]))
        rs[2]["node"] = rs[1]["node"]
        body = {k: v for k, v in rs[2].items() if k != "sig"}
        rs[2]["sig"] = base64.b64encode(other.sign(receipts.canonical(body))).decode()
        p = receipts.verify(rs)
        assert p.index == 2 and "signature" in p.reason
        # ... and one validly signed by the node but not chained is caught by the hash chain:
        rs[2] = receipts.make_receipt(node, "abc", 3, 300, 600, 1003, "f" * 64)
    elif attack == "drop":
        del rs[1]
        index = 1
    elif attack == "rollback":
        rs[2] = receipts.make_receipt(node, "abc", 3, 50, 600, 1003, receipts.receipt_hash(rs[1]))
    elif attack == "buyer":
        rs[1] = receipts.make_receipt(node, "abc", 2, 200, 400, 1002, receipts.receipt_hash(rs[0]),
                                      {**rs[1]["buyer"], "up": 1})
    p = receipts.verify(rs)
    assert p is not None and p.index == index and words in p.reason, p


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """`idlewire ARGV…` in this process: (exit status, stdout)."""
    from idlewire.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().out


def test_receipts_cli(tmp_path, make, capsys):
    _, rs = _chain()
    f = tmp_path / "r.json"
    f.write_text("\n".join(json.dumps(r) for r in rs))
    code, out = _cli(capsys, "receipts", "verify", str(f), "--json")
    assert code == 0 and json.loads(out)["ok"]
    rs[3]["time"] = 1
    f.write_text(json.dumps(rs))
    code, out = _cli(capsys, "receipts", "verify", str(f))
    assert code == 1 and "receipt #4" in out
    # A chain the node pruned: verified from its checkpoint, and said so.
    node, rs = _chain(6)
    f.write_text(json.dumps([receipts.make_checkpoint(node, rs[3]), *rs[4:]]))
    code, out = _cli(capsys, "receipts", "verify", str(f))
    assert code == 0 and "receipts 1-4 pruned by the node" in out, out
    code, out = _cli(capsys, "receipts", "verify", str(f), "--json")
    assert json.loads(out)["checkpoints"] == {"abc": 4}
    f.write_text(json.dumps(rs[4:]))  # the same without the checkpoint: a truncated file
    code, out = _cli(capsys, "receipts", "verify", str(f))
    assert code == 1 and "expected 1" in out


def test_ledger_file_is_wal_and_secrets_are_0600(make, tmp_path):
    a = make()
    a.poll()
    db = sqlite3.connect(tmp_path / "state" / "ledger.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for name in ("node.key", "admin.token"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o600


def test_health_offers_the_units_signed_payout_address_and_caps(make, tmp_path):
    from idlewire_agent.config import apply_unit, parse_unit

    plain = make()
    assert plain.offer()["unit"] is None and plain.offer()["payout"] is None
    plain.ledger.close()
    data = {"node": {"state_dir": str(tmp_path / "state2"), "key_file": str(tmp_path / "node.key"),
                     "unit_file": str(tmp_path / "unit.toml")},
            "tunnel": {"pool": "10.99.0.0/29", "private_key_file": str(tmp_path / "wg.key")},
            "api": {"admin_token_file": str(tmp_path / "admin.token")},
            "shaping": {"line_up_mbit": 20, "line_down_mbit": 100, "cap_up_mbit": 10, "cap_down_mbit": 50}}
    cfg = parse(data)
    unit, problems = parse_unit({"unit": "shop-9", "hostname": "iw-9", "payout_address": "bc1qowner9",
                                 "caps": {"up_mbit": 4, "monthly_gb": 0}}, str(tmp_path / "unit.toml"))
    assert problems == []
    apply_unit(cfg, unit)
    a = Agent(cfg, SyntheticTunnel(), Clock())
    offer = a.offer()
    assert offer["unit"] == {"unit": "shop-9", "hostname": "iw-9", "payout_address": "bc1qowner9"}
    stmt = offer["payout"]
    assert stmt["address"] == "bc1qowner9" and stmt["node"] == a.node_pub and stmt["unit"] == "shop-9"
    assert receipts.payout_valid(stmt, a.node_pub)  # signed by the key that signs the receipts
    assert not receipts.payout_valid({**stmt, "address": "bc1qthief"}, a.node_pub)
    assert not receipts.payout_valid(stmt, receipts.pub_b64(Ed25519PrivateKey.generate()))
    caps = offer["caps"]
    assert (caps["up_mbit"], caps["down_mbit"], caps["monthly_gb"]) == (4, 50, 0)
    assert caps["from_unit"] == ["monthly_gb", "up_mbit"]
    json.dumps(offer)  # what /health sends


def test_nonces_outlive_a_restart_and_expire(tmp_path):
    from idlewire_agent.ledger import Ledger

    path = str(tmp_path / "ledger.sqlite")
    led = Ledger(path)
    assert led.use_nonce("n" * 16, expires=1100, now=1000)
    assert not led.use_nonce("n" * 16, expires=1101, now=1001)  # a replay
    led.db.close()  # as after kill -9: nothing but what was committed
    led = Ledger(path)
    assert not led.use_nonce("n" * 16, expires=1102, now=1050)  # still refused after the restart
    assert led.use_nonce("n" * 16, expires=1300, now=1200)  # its time is out of the window anyway
    assert led.use_nonce("m" * 16, expires=1150, now=1100)
    led.record([], 1250)  # a poll prunes what expired
    assert [r[0] for r in led.db.execute("SELECT nonce FROM nonces")] == ["n" * 16]


def test_receipt_retention_trims_closed_chains_behind_a_checkpoint_then_deletes_them(make):
    clock = Clock()
    a = make(clock=clock, receipts__keep_closed=5, receipts__keep_days=2, sessions__idle_timeout=86400)
    buyer = Ed25519PrivateKey.generate()
    bk = receipts.pub_b64(buyer)
    done, live = (a.open_session(bk, wgkey())["session"] for _ in range(2))
    for i in range(1, 21):
        clock.t += 5
        for sid in (done, live):
            a.cosign(sid, bk, receipts.sign_usage(buyer, sid, i * 1000, i * 10, int(clock.t)))
    a.close_session(done, "buyer")  # the closing receipt: seq 21
    before = a.receipts(done)
    assert [r["seq"] for r in before] == list(range(1, 22))
    steps = 0
    while a.prune_receipts(batch=4):  # small batches: every committed state must verify
        steps += 1
        assert receipts.verify(a.receipts(done)) is None
        assert steps < 20
    assert steps >= 4
    kept = a.receipts(done)
    assert [r["seq"] for r in kept] == list(range(16, 22))  # checkpoint for 16, then the last 5
    assert receipts.is_checkpoint(kept[0]) and kept[0]["hash"] == receipts.receipt_hash(before[15])
    assert kept[1:] == before[16:]
    assert receipts.verify(kept, a.node_pub) is None
    assert receipts.checkpoints(kept) == {done: 16}
    assert len(a.receipts(live)) == 20  # open sessions keep every receipt
    # A co-signature after the close extends the trimmed chain, which is trimmed again (statements
    # claim at most what was carried: the traffic as polls would have counted it).
    a.ledger.db.execute("UPDATE sessions SET rx = 100000, tx = 1000 WHERE id = ?", (done,))
    a.cosign(done, bk, receipts.sign_usage(buyer, done, 99_000, 990, int(clock.t)))
    while a.prune_receipts():
        pass
    assert [r["seq"] for r in a.receipts(done)] == list(range(17, 23))
    assert receipts.verify(a.receipts(done)) is None
    # keep_days after the close, the whole chain goes; the open session's stays.
    clock.t += 2 * 86400 + 1
    while a.prune_receipts(batch=4):
        assert receipts.verify(a.receipts(done)) is None
    assert a.receipts(done) == [] and len(a.receipts(live)) == 20
    with pytest.raises(SessionError) as e:
        a.cosign(done, bk, receipts.sign_usage(buyer, done, 100_000, 1000, int(clock.t)))
    assert e.value.status == 409 and "deleted" in str(e.value)
    assert not a.prune_receipts()


@pytest.mark.parametrize("attack, words", [
    ("drop_checkpoint", "expected 1"), ("tamper_checkpoint", "signature"), ("wrong_hash", "chain broken"),
    ("checkpoint_mid_chain", "inside the chain"), ("forged_checkpoint", "signature"), ("gap_after", "seq"),
])
def test_checkpoint_attacks_are_caught(attack, words):
    node, rs = _chain(6)
    cp = receipts.make_checkpoint(node, rs[2])
    chain = [cp, *rs[3:]]
    assert receipts.verify(chain) is None and receipts.checkpoints(chain) == {"abc": 3}
    if attack == "drop_checkpoint":  # someone else truncated the file: no declared starting point
        chain = chain[1:]
    elif attack == "tamper_checkpoint":
        chain[0] = {**cp, "up": 1}
    elif attack == "wrong_hash":  # a genuine checkpoint, but for another receipt than the one pruned
        chain[0] = receipts.make_checkpoint(node, {**rs[2], "time": 1})
    elif attack == "checkpoint_mid_chain":
        chain = [*rs[:3], cp, *rs[3:]]
    elif attack == "forged_checkpoint":
        other = receipts.make_checkpoint(Ed25519PrivateKey.generate(), rs[2])
        chain[0] = {**other, "node": cp["node"]}
    elif attack == "gap_after":
        del chain[1]
    p = receipts.verify(chain)
    assert p is not None and words in p.reason, p


def test_schema_1_ledger_is_upgraded(tmp_path):
    from idlewire_agent.ledger import SCHEMA, Ledger

    path = tmp_path / "ledger.sqlite"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE sessions (id TEXT PRIMARY KEY, buyer_key TEXT NOT NULL, wg_key TEXT NOT NULL, "
                      "address TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', created REAL "
                      "NOT NULL, expires REAL NOT NULL, last_active REAL NOT NULL, closed_at REAL, rx INTEGER NOT "
                      "NULL DEFAULT 0, tx INTEGER NOT NULL DEFAULT 0, paid_up INTEGER NOT NULL DEFAULT 0, paid_down "
                      "INTEGER NOT NULL DEFAULT 0, paid_time REAL NOT NULL DEFAULT 0);"
                      "INSERT INTO sessions (id, buyer_key, wg_key, address, state, created, expires, last_active) "
                      "VALUES ('s1', 'b', 'w', '10.99.0.2/32', 'closed', 1, 2, 1);")
    old.close()
    led = Ledger(str(path))
    assert led.session("s1")["retention"] == 0
    assert int(led.meta("schema")) == SCHEMA == 2


def test_a_wedged_wg_is_killed_and_reported_not_waited_for(tmp_path, monkeypatch):
    """A `wg` that never answers (wireguard-go wedged behind its UAPI socket) must not hold the
    agent's lock — and with it the API and the metering — for ever: it is killed, a WgError."""
    import time

    from idlewire_agent import wg

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "wg").write_text("#!/bin/sh\nexec sleep 30\n")
    (fake / "wg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setattr(wg, "TIMEOUT", 0.5)
    t = wg.Tunnel("iwtest0", 51820, "k", "10.99.0.1/16")
    for call in (t.dump, lambda: t.remove_peer("x" * 43 + "=")):
        t0 = time.monotonic()
        with pytest.raises(wg.WgError, match=r"no answer in 0\.5 s"):
            call()
        assert time.monotonic() - t0 < 5
