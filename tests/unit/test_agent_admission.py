"""Fair admission and address reuse without namespaces (synthetic counters): per-buyer limits,
the handshake deadline, the back-off after unpaid closes, bounded buyer statements, resting
addresses. tests/net/test_agent_attack.py runs the same rules with real packets."""

import ipaddress

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from idlewire_agent import receipts
from idlewire_agent.agent import Agent, SessionError
from idlewire_agent.config import ConfigError, parse
from synthetic import SyntheticTunnel
from test_agent_core import Clock, wgkey


@pytest.fixture
def make(tmp_path):
    def make(**sessions):
        data = {"node": {"state_dir": str(tmp_path / "state"), "key_file": str(tmp_path / "node.key")},
                "tunnel": {"pool": "10.99.0.0/28", "private_key_file": str(tmp_path / "wg.key")},
                "metering": {"poll_interval": 5, "line_rate_mbit": 8, "unpaid_cap_mb": 1},
                "sessions": {"max": 10, "max_per_buyer": 2, **sessions},
                "api": {"admin_token_file": str(tmp_path / "admin.token")}}
        t, clock = SyntheticTunnel(), Clock()
        return Agent(parse(data), t, clock), t, clock
    return make


def buyer():
    k = Ed25519PrivateKey.generate()
    return k, receipts.pub_b64(k)


def refused(fn, *args) -> SessionError:
    with pytest.raises(SessionError) as e:
        fn(*args)
    return e.value


def test_one_buyer_key_cannot_take_every_slot(make):
    a, _, _ = make()
    _, bk = buyer()
    a.open_session(bk, wgkey())
    a.open_session(bk, wgkey())
    e = refused(a.open_session, bk, wgkey())
    assert e.status == 429 and "maximum of 2 sessions" in str(e)
    _, other = buyer()
    a.open_session(other, wgkey())  # the node still has room for others


def test_a_session_that_never_connects_is_closed_and_frees_its_slot(make):
    a, t, clock = make(handshake_timeout=20, max_per_buyer=1)
    _, bk = buyer()
    idle = a.open_session(bk, wgkey())["session"]
    _, bk2 = buyer()
    live = a.open_session(bk2, k := wgkey())["session"]
    t.traffic(k, 148, 92)  # the handshake: initiation in, response out
    clock.t += 19
    a.poll()
    assert a.describe(idle)["state"] == "open"
    clock.t += 2
    a.poll()
    assert (a.describe(idle)["state"], a.describe(idle)["reason"]) == ("closed", "no_handshake")
    assert a.describe(live)["state"] == "open"
    a.open_session(bk, wgkey())  # the slot is free again


def test_unpaid_closes_back_off_doubling(make):
    a, t, clock = make(unpaid_backoff=60, unpaid_backoff_max=1000)
    _, bk = buyer()
    waits = []
    for _ in range(6):
        s = a.open_session(bk, k := wgkey())["session"]
        t.traffic(k, 2_000_000, 0)  # beyond the 1 MB unpaid cap, never co-signed
        clock.t += 5
        a.poll()
        assert a.describe(s)["reason"] == "unpaid"
        e = refused(a.open_session, bk, wgkey())
        assert e.status == 429
        wait = int(str(e).rsplit("in ", 1)[1].split()[0])
        waits.append(wait)
        clock.t += wait - 1
        assert refused(a.open_session, bk, wgkey()).status == 429
        clock.t += 1
    assert waits == [60, 120, 240, 480, 960, 1000]
    clock.t += 1000 + 1000  # paid (or away) long enough: it starts over
    s = a.open_session(bk, k := wgkey())["session"]
    t.traffic(k, 2_000_000, 0)
    a.poll()
    assert str(refused(a.open_session, bk, wgkey())).endswith("in 60 s")
    _, other = buyer()
    a.open_session(other, wgkey())  # another key is not held back


def test_a_buyer_statement_cannot_claim_more_than_was_carried(make):
    a, t, clock = make()
    key, bk = buyer()
    s = a.open_session(bk, k := wgkey())["session"]
    t.traffic(k, 600_000, 300_000)
    a.poll()
    e = refused(a.cosign, s, bk, receipts.sign_usage(key, s, 10**12, 300_000, int(clock.t)))
    assert e.status == 409 and "claims more than the node measured" in str(e)
    assert a.describe(s)["paid_up"] == 0
    # Traffic since the last poll is read afresh: an honest statement ahead of the poll is fine.
    t.traffic(k, 100_000, 0)
    r = a.cosign(s, bk, receipts.sign_usage(key, s, 700_000, 300_000, int(clock.t)))
    assert r["agreed"] and a.describe(s)["paid_up"] == 700_000
    # Within the tolerance (2 %) of what was measured: accepted.
    r = a.cosign(s, bk, receipts.sign_usage(key, s, 714_000, 306_000, int(clock.t)))
    assert a.describe(s)["paid_up"] == 714_000


def test_a_closed_address_rests_before_the_next_buyer(make):
    a, _, clock = make(address_rest=600, max_per_buyer=20, max=20)
    _, bk = buyer()
    first = a.open_session(bk, wgkey())
    a.close_session(first["session"], "buyer")
    second = a.open_session(bk, wgkey())
    assert second["address"] != first["address"]
    hosts = 14 - 1  # a /28 without the node's address
    for _ in range(hosts - 2):
        a.open_session(bk, wgkey())
    opened = a.ledger.db.execute("SELECT id FROM sessions WHERE state = 'open'").fetchall()
    for (sid,) in opened:
        clock.t += 1
        a.close_session(sid, "buyer")
    # Every address rests: the one closed longest ago comes back first.
    again = a.open_session(bk, wgkey())
    assert again["address"] == first["address"]
    clock.t += 601
    later = a.open_session(bk, wgkey())
    assert ipaddress.ip_interface(later["address"]).ip != ipaddress.ip_interface(again["address"]).ip


def test_new_keys_are_checked(tmp_path):
    for key, value in (("max_per_buyer", 0), ("handshake_timeout", 1), ("unpaid_backoff", -1),
                       ("address_rest", 10**6), ("unpaid_backoff_max", True)):
        with pytest.raises(ConfigError, match=f"sessions.{key}: expected"):
            parse({"sessions": {key: value}})
    with pytest.raises(ConfigError, match=r"firewall\.public_addresses: expected a list of IP addresses"):
        parse({"firewall": {"public_addresses": ["router"]}})
    assert parse({"firewall": {"public_addresses": ["203.0.113.7"]}}).policy.firewall.public_addresses == \
        ["203.0.113.7"]
