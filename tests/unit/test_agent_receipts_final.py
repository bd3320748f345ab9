"""Receipts as an attacker reads them: a chain cut short, duplicated JSON keys, NaN, and buyer
co-signatures that switch keys mid-session (issue 14.5). The node's real Agent issues the chains."""

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from idlewire_agent import keys, receipts
from idlewire_agent.agent import Agent
from idlewire_agent.config import parse
from synthetic import SyntheticTunnel
from test_agent_core import _cli


@pytest.fixture
def agent(tmp_path):
    data = {"node": {"state_dir": str(tmp_path / "state"), "key_file": str(tmp_path / "node.key")},
            "tunnel": {"pool": "10.99.0.0/29", "private_key_file": str(tmp_path / "wg.key")},
            "metering": {"poll_interval": 5, "line_rate_mbit": 8, "unpaid_cap_mb": 1},
            "api": {"admin_token_file": str(tmp_path / "admin.token")}}
    return Agent(parse(data), SyntheticTunnel())


def _session(a, buyer, n=3, close=True, sold=False):
    """A session with n co-signed receipts (and the final one when closed): (sid, chain). SOLD: as if
    the marketplace hub had sold it."""
    k = keys.wg_keypair()[1]
    sid = a.open_session(receipts.pub_b64(buyer), k, sold=sold)["session"]
    for i in range(1, n + 1):
        a.tunnel.traffic(k, 1000, 2000)
        a.poll()
        a.cosign(sid, receipts.pub_b64(buyer), receipts.sign_usage(buyer, sid, 1000 * i, 2000 * i, 100 + i))
    if close:
        a.close_session(sid, "buyer")
    return sid, a.receipts(sid)


def test_a_closed_chain_ends_in_the_final_receipt_and_binds_the_buyer(agent):
    buyer = Ed25519PrivateKey.generate()
    sid, rs = _session(agent, buyer)
    assert [r.get("final") for r in rs] == [None, None, None, "buyer"]
    assert all(r["buyer_key"] == receipts.pub_b64(buyer) for r in rs)
    assert (rs[-1]["up"], rs[-1]["down"]) == (3000, 6000)  # the totals
    chains = {}
    assert receipts.verify(rs, agent.node_pub, receipts.pub_b64(buyer), closed=True, chains=chains) is None
    assert chains[sid].final == "buyer" and chains[sid].buyer_key == receipts.pub_b64(buyer)
    # Co-signed after the close: still final, still verifies.
    agent.cosign(sid, receipts.pub_b64(buyer), receipts.sign_usage(buyer, sid, 3000, 6000, 200))
    rs = agent.receipts(sid)
    assert rs[-1]["final"] == "buyer" and "buyer" in rs[-1]
    assert receipts.verify(rs, closed=True) is None


def test_truncation_is_caught_when_the_session_is_known_closed(agent, tmp_path, capsys):
    buyer = Ed25519PrivateKey.generate()
    sid, rs = _session(agent, buyer)
    cut = rs[:-1]
    p = receipts.verify(cut, closed={sid})
    assert p is not None and "truncated" in p.reason and p.seq == 3
    assert receipts.verify(cut) is None  # nobody said it is closed: an open session's chain
    f = tmp_path / "r.json"
    f.write_text(json.dumps(cut))
    code, out = _cli(capsys, "receipts", "verify", str(f))
    assert code == 0 and "open: no final receipt yet" in out, out
    code, out = _cli(capsys, "receipts", "verify", str(f), "--closed")
    assert code == 1 and "truncated" in out, out
    # The file the client saves says which sessions it saw closed.
    f.write_text(json.dumps({"receipts": cut, "closed": [sid]}))
    code, out = _cli(capsys, "receipts", "verify", str(f), "--json")
    assert code == 1 and "truncated" in json.loads(out)["first_bad"]["reason"]
    f.write_text(json.dumps({"receipts": rs, "closed": [sid]}))
    code, out = _cli(capsys, "receipts", "verify", str(f), "--json")
    assert code == 0 and json.loads(out)["totals"][sid]["state"] == "closed"
    # An open session's chain is reported open, not failed.
    sid2, rs2 = _session(agent, buyer, n=2, close=False)
    f.write_text(json.dumps(rs2))
    code, out = _cli(capsys, "receipts", "verify", str(f), "--json")
    res = json.loads(out)
    assert code == 0 and res["ok"] and res["totals"][sid2]["state"] == "open"
    # A receipt without "final" after the final one: refused.
    bad = [*rs, receipts.make_receipt(agent.node_key, sid, 5, 3000, 6000, rs[-1]["time"], receipts.receipt_hash(rs[-1]),
                                      buyer_key=rs[0]["buyer_key"])]
    assert "after the session's final receipt" in receipts.verify(bad).reason


def test_co_signatures_by_another_buyer_key_are_caught(agent, tmp_path, capsys):
    buyer, mallory = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    sid, rs = _session(agent, buyer)
    # A chain the node signed, with one co-signature swapped for another key's (re-signed by the node,
    # as a colluding or buggy node would): the binding catches it.
    node = agent.node_key
    forged, prev = [], receipts.GENESIS
    for r in rs:
        stmt = r.get("buyer")
        if r["seq"] == 2:
            stmt = receipts.sign_usage(mallory, sid, stmt["up"], stmt["down"], stmt["time"])
        n = receipts.make_receipt(node, sid, r["seq"], r["up"], r["down"], r["time"], prev, stmt,
                                  buyer_key=r["buyer_key"], final=r.get("final"))
        forged.append(n)
        prev = receipts.receipt_hash(n)
    p = receipts.verify(forged)
    assert p.index == 1 and "another buyer key" in p.reason
    # Receipts from before the binding (no buyer_key): the first co-signature binds.
    legacy, prev = [], receipts.GENESIS
    for i, who in enumerate((buyer, buyer, mallory), 1):
        n = receipts.make_receipt(node, "old", i, i, i, i, prev, receipts.sign_usage(who, "old", i, i, i))
        legacy.append(n)
        prev = receipts.receipt_hash(n)
    assert "switched keys" in receipts.verify(legacy).reason
    assert receipts.verify(legacy[:2]) is None
    # --buyer-key pins it from outside.
    f = tmp_path / "r.json"
    f.write_text(json.dumps(rs))
    assert _cli(capsys, "receipts", "verify", str(f), "--buyer-key", receipts.pub_b64(buyer))[0] == 0
    code, out = _cli(capsys, "receipts", "verify", str(f), "--buyer-key", receipts.pub_b64(mallory))
    assert code == 1 and "buyer key given" in out, out
    f.write_text(json.dumps(legacy[:2]))
    code, out = _cli(capsys, "receipts", "verify", str(f), "--buyer-key", receipts.pub_b64(mallory))
    assert code == 1 and "another buyer key" in out, out


@pytest.mark.parametrize("text, words", [
    ('[{"v": 1, "up": 5, "up": 500}]', "duplicate key 'up'"),
    ('[{"v": 1, "buyer": {"up": 1, "up": 2}}]', "duplicate key 'up'"),
    ('[{"v": 1, "up": NaN}]', "NaN"),
    ('{"v": 1, "up": Infinity}\n', "Infinity"),
    ('[{"v": 1, "up": -1e400}]', "overflows to Infinity"),
    ('{"v": 1}\n{"v": 1, "seq": 1, "seq": 2}\n', "duplicate key 'seq'"),  # JSON lines
])
def test_strict_json_refuses_what_parsers_read_differently(text, words, tmp_path, capsys):
    with pytest.raises(receipts.StrictJSONError, match=words):
        receipts.load_file(text)
    f = tmp_path / "r.json"
    f.write_text(text)
    code, out = _cli(capsys, "receipts", "verify", str(f))
    assert code == 1 and "BAD" in out and words in out, out


def test_a_duplicated_key_in_a_real_receipt_is_bad(agent, tmp_path, capsys):
    buyer = Ed25519PrivateKey.generate()
    _, rs = _session(agent, buyer)
    text = json.dumps(rs).replace('"up": 3000,', '"up": 3000, "up": 9000000,', 1)
    assert text.count('"up": 9000000') == 1
    f = tmp_path / "r.json"
    f.write_text(text)
    code, out = _cli(capsys, "receipts", "verify", str(f))
    assert code == 1 and "duplicate key 'up'" in out


def test_pruned_chains_keep_the_binding_and_the_final_mark(agent):
    buyer = Ed25519PrivateKey.generate()
    sid, rs = _session(agent, buyer, n=5)
    for keep in (2, 0):  # the checkpoint stands in for a middle receipt, or for the final one itself
        c = receipts.make_checkpoint(agent.node_key, rs[-1 - keep])
        chain = [c, *rs[len(rs) - keep:]]
        chains = {}
        assert receipts.verify(chain, buyer_key=receipts.pub_b64(buyer), closed=True, chains=chains) is None, keep
        assert chains[sid].final == "buyer" and chains[sid].checkpoint == c["seq"]
    c = receipts.make_checkpoint(agent.node_key, rs[-1])
    p = receipts.verify([c], buyer_key=receipts.pub_b64(Ed25519PrivateKey.generate()))
    assert p is not None and "buyer key given" in p.reason
    # The agent's own retention: still verifies, still closed.
    a = agent
    a.cfg = a.cfg.replace(receipts=a.cfg.receipts.replace(keep_closed=2))
    while a.prune_receipts():
        pass
    pruned = a.receipts(sid)
    assert pruned[0]["type"] == "checkpoint" and len(pruned) == 3
    assert receipts.verify(pruned, a.node_pub, receipts.pub_b64(buyer), closed=True) is None
