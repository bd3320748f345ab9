"""`idlewire hub` as a real process on loopback, on SQLite and on a real PostgreSQL: registration,
heartbeats, the node's channel, buyers, receipts — and what an attacker or a crash does to them."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hublab import ROOT, HubProc
from idlewire_agent import receipts as rc
from idlewire_agent.keys import wg_keypair
from idlewire_agent.market import Market, MarketError

CAPS = {"up_mbit": 10, "down_mbit": 50, "max_sessions": 4, "monthly_gb": 500}


@pytest.fixture
def hub(db_url, tmp_path):
    with HubProc(db_url, log=tmp_path / "hub.log") as h:
        yield h


def node_market(url: str, key=None, region: str = "DE", price: float = 0.5) -> Market:
    key = key or Ed25519PrivateKey.generate()
    m = Market(url, key)
    m.register(wg_public_key=wg_keypair()[1], payout=rc.payout_statement(key, "bc1qowner0001", "unit-1"),
               region=region, caps=CAPS, price_per_gb=price, endpoint="203.0.113.7:51820", version="0.1.0")
    return m


BUYER = Ed25519PrivateKey.generate()


def sold(hub, node_id: str, *sessions: str, buyer=BUYER) -> None:
    """Sessions the hub sold to BUYER on M's node, stored as Hub.answer stores a node's answer to an
    open request (test_buyer_is_sent_to_a_node_over_the_channel_it_opened drives that path itself):
    the hub counts usage only in sessions it sold, and this sells 1,500 in a second."""
    from idlewire.hub import db

    engine = db.make_engine(hub.db_url)
    now = time.time()
    with db.write(engine) as conn:
        conn.execute(db.sessions.insert(), [
            {"node_id": node_id, "session": sid, "buyer_key": rc.pub_b64(buyer), "request_id": os.urandom(12).hex(),
             "state": "open", "opened_at": now, "updated_at": now, "head": ""} for sid in sessions])
    engine.dispose()


def chain(key, session: str, n: int, start: int = 1, prev: str = rc.GENESIS, buyer_key=None, step: int = 1000,
          cosign: bool = True, buyer_factor: float = 1.0) -> list[dict]:
    buyer_key = buyer_key or BUYER
    out = []
    for seq in range(start, start + n):
        up, down, t = seq * step, seq * step * 3, 1_700_000_000 + seq
        stmt = rc.sign_usage(buyer_key, session, int(up * buyer_factor), int(down * buyer_factor), t) if cosign \
            else None
        r = rc.make_receipt(key, session, seq, up, down, t, prev, stmt)
        prev = rc.receipt_hash(r)
        out.append(r)
    return out


def one_line(exc: MarketError) -> str:
    assert "\n" not in exc.reason and exc.reason, exc.reason
    return exc.reason


def raw(url: str, method: str, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=10)
    conn.request(method, path, body=body, headers={**headers, "Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, data


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tools'}:{ROOT / 'agent'}"}
    return subprocess.run([sys.executable, "-m", "idlewire", "hub", *args], capture_output=True, text=True,
                          env=env, timeout=60)


# --- registration and heartbeats -----------------------------------------------------------------
def test_node_registers_heartbeats_and_is_listed(hub):
    m = node_market(hub.url)
    out = m.heartbeat(uptime=12.5, caps=CAPS, sessions=[{"session": "a" * 16, "head": "b" * 64}])
    assert out["ok"]
    listed = cli("nodes", "--db", hub.db_url, "--json")
    assert listed.returncode == 0, listed.stderr
    (node,) = json.loads(listed.stdout)
    assert node["id"] == m.node_id and node["region"] == "DE" and node["online"]
    assert node["open_sessions"] == 1 and node["uptime"] == 12.5 and node["payout_address"] == "bc1qowner0001"
    sessions = json.loads(cli("sessions", "--hub", hub.url, "--json").stdout)
    assert [(s["session"], s["head"]) for s in sessions] == [("a" * 16, "b" * 64)]
    # The schema is published.
    c = http.client.HTTPConnection(f"127.0.0.1:{hub.port}", timeout=10)
    c.request("GET", "/openapi.json")
    paths = json.loads(c.getresponse().read())["paths"]
    c.close()
    assert {"/v1/nodes", "/v1/nodes/{nid}/heartbeat", "/v1/nodes/{nid}/channel", "/v1/connect"} <= set(paths)
    status, ans = raw(hub.url, "GET", "/v1/nothing", b"", {})
    assert status == 404 and ans == {"error": "Not Found (the API: /docs, /openapi.json)"}
    # A body too large for any request is refused before it is read whole, declared or streamed.
    huge = b'{"receipts": [' + b'{"v": 1},' * 600_000 + b'{}]}'
    status, ans = raw(hub.url, "POST", f"/v1/nodes/{m.node_id}/receipts", huge, {})
    assert status == 413 and "request body over" in ans["error"]
    c = http.client.HTTPConnection(f"127.0.0.1:{hub.port}", timeout=10)
    c.putrequest("POST", f"/v1/nodes/{m.node_id}/receipts")
    c.putheader("Transfer-Encoding", "chunked")
    c.endheaders()
    try:
        for _ in range(100):
            c.send(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        c.send(b"0\r\n\r\n")
    except OSError:
        pass  # the hub may close the connection once it has refused
    assert c.getresponse().status == 413
    c.close()


def test_forged_registrations_are_refused(hub):
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    body = {"wg_public_key": wg_keypair()[1], "payout": rc.payout_statement(key, "bc1qowner0001"), "region": "DE",
            "caps": CAPS, "price_per_gb": 0.5, "endpoint": "", "version": "0.1.0"}
    data = json.dumps(body).encode()
    # Signed by one key, claiming to be another.
    h = rc.sign_request(other, "POST", "/v1/nodes", data, int(time.time()), os.urandom(16).hex())
    h["X-Idlewire-Key"] = rc.pub_b64(key)
    status, ans = raw(hub.url, "POST", "/v1/nodes", data, h)
    assert status == 401 and "not a valid signature" in ans["error"]
    # Signed correctly, then the body altered (another payout address).
    h = rc.sign_request(key, "POST", "/v1/nodes", data, int(time.time()), os.urandom(16).hex())
    status, ans = raw(hub.url, "POST", "/v1/nodes", data.replace(b'"DE"', b'"FR"'), h)
    assert status == 401
    # Someone else's payout statement, own signature on the request.
    m = Market(hub.url, other)
    with pytest.raises(MarketError) as exc:
        m.register(wg_public_key=body["wg_public_key"], payout=body["payout"], region="DE", caps=CAPS,
                   price_per_gb=0.5, endpoint="", version="0.1.0")
    assert exc.value.status == 403 and "payout" in one_line(exc.value)
    # Not signed at all; a region that is no country; caps the node could not have.
    status, ans = raw(hub.url, "POST", "/v1/nodes", data, {})
    assert status == 401 and "unsigned" in ans["error"]
    m = Market(hub.url, key)
    for bad, word in (({"region": "XX"}, "region"), ({"caps": {**CAPS, "up_mbit": -1}}, "caps.up_mbit"),
                      ({"endpoint": "host:99999"}, "endpoint"), ({"wg_public_key": "x"}, "wg_public_key")):
        with pytest.raises(MarketError) as exc:
            m.register(**{**{k: body[k] for k in body}, **bad})
        assert exc.value.status == 422 and word in one_line(exc.value)
    assert json.loads(cli("nodes", "--db", hub.db_url, "--json").stdout) == []


def test_replayed_and_stale_heartbeats_are_refused(hub):
    m = node_market(hub.url)
    path = f"/v1/nodes/{m.node_id}/heartbeat"
    data = json.dumps({"uptime": 1, "sessions": []}).encode()
    h = rc.sign_request(m.key, "POST", path, data, int(time.time()), os.urandom(16).hex())
    assert raw(hub.url, "POST", path, data, h)[0] == 200
    status, ans = raw(hub.url, "POST", path, data, h)
    assert status == 401 and ans["error"] == "X-Idlewire-Nonce: already used (replayed request)"
    # A replay to a second hub process on the same database is refused too (nonces live in the DB).
    with HubProc(hub.db_url) as second:
        status, ans = raw(second.url, "POST", path, data, h)
    assert status == 401 and "replayed" in ans["error"]
    h = rc.sign_request(m.key, "POST", path, data, int(time.time()) - 1000, os.urandom(16).hex())
    status, ans = raw(hub.url, "POST", path, data, h)
    assert status == 401 and "stale request (-1000 s" in ans["error"]
    # Another node's key cannot heartbeat for this node.
    intruder = node_market(hub.url)
    intruder.node_id = m.node_id
    with pytest.raises(MarketError) as exc:
        intruder.heartbeat(uptime=1, sessions=[])
    assert exc.value.status == 403 and "another key" in one_line(exc.value)


def test_heartbeats_arriving_together_are_answered_each_on_its_own(hub):
    """Heartbeats that arrive at once share a write batch; each still gets its own answer: a replay
    sent alongside its original, another node's key, an unknown node and a bad body are refused
    and the good ones stored, whatever else is in their batch."""
    nodes = [node_market(hub.url) for _ in range(6)]
    jobs = []  # (expected status, path, body, headers)
    for i, m in enumerate(nodes):
        path = f"/v1/nodes/{m.node_id}/heartbeat"
        data = json.dumps({"uptime": 100 + i, "sessions": [{"session": f"s{i}x" * 4, "head": "c" * 64}]}).encode()
        h = rc.sign_request(m.key, "POST", path, data, int(time.time()), os.urandom(16).hex())
        jobs += [(200, path, data, h)] * (2 if i == 0 else 1)  # node 0's twice at once: one is a replay
    other = Ed25519PrivateKey.generate()
    path = f"/v1/nodes/{nodes[1].node_id}/heartbeat"
    data = json.dumps({"uptime": 1, "sessions": []}).encode()
    jobs.append((403, path, data, rc.sign_request(other, "POST", path, data, int(time.time()), os.urandom(16).hex())))
    path = "/v1/nodes/0123456789abcdef0123/heartbeat"
    jobs.append((404, path, data, rc.sign_request(other, "POST", path, data, int(time.time()), os.urandom(16).hex())))
    path = f"/v1/nodes/{nodes[2].node_id}/heartbeat"
    bad = json.dumps({"uptime": -5, "sessions": []}).encode()
    jobs.append((422, path, bad, rc.sign_request(nodes[2].key, "POST", path, bad, int(time.time()),
                                                 os.urandom(16).hex())))
    got: list = [None] * len(jobs)
    go = threading.Barrier(len(jobs))

    def send(i):
        go.wait()
        got[i] = raw(hub.url, "POST", jobs[i][1], jobs[i][2], jobs[i][3])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    statuses = [g[0] for g in got]
    assert sorted(statuses[:2]) == [200, 401], got[:2]  # the original and its replay, in either order
    assert "replayed" in next(g[1]["error"] for g in got[:2] if g[0] == 401)
    assert statuses[2:] == [j[0] for j in jobs[2:]], got
    assert "another key" in got[-3][1]["error"] and "register first" in got[-2][1]["error"]
    assert "uptime" in got[-1][1]["error"]
    listed = {n["id"]: n for n in json.loads(cli("nodes", "--db", hub.db_url, "--json").stdout)}
    for i, m in enumerate(nodes):
        assert listed[m.node_id]["uptime"] == 100 + i and listed[m.node_id]["open_sessions"] == 1


def test_one_batch_spends_each_nonce_once_and_applies_a_nodes_two_heartbeats_in_turn(db_url):
    """The batched write (one nonce INSERT, one SELECT and one executemany per kind of session
    change for the whole batch) answers as one heartbeat at a time would: a nonce twice in a batch
    is one replay, and a node heard twice has its sessions as its later heartbeat lists them."""
    from idlewire.hub import db, service
    from sqlalchemy import select

    engine = db.make_engine(db_url)
    db.migrate(engine)
    hub = service.Hub(engine)
    key = Ed25519PrivateKey.generate()
    pub = rc.pub_b64(key)

    def signed(nonce=None):
        return service.Signed(pub, nonce or os.urandom(16).hex(), int(time.time()) + 100)

    hub.register(signed(), {"wg_public_key": wg_keypair()[1], "payout": rc.payout_statement(key, "x"),
                            "region": "DE", "caps": CAPS, "price_per_gb": 0.1, "endpoint": "", "version": "1"})
    nid = service.node_id(pub)
    twice = signed()
    out = hub.heartbeats([(nid, twice, {"uptime": 1}), (nid, signed(twice.nonce), {"uptime": 1})])
    assert out[0]["ok"] and isinstance(out[1], service.HubError) and "replayed" in out[1].message
    assert "replayed" in hub.heartbeats([(nid, signed(twice.nonce), {"uptime": 1})])[0].message

    def sessions():
        with db.read(engine) as conn:
            return sorted((r.session, r.state, r.head) for r in conn.execute(select(db.sessions)))

    a, b = "a" * 16, "b" * 16
    hub.heartbeats([(nid, signed(), {"uptime": 2, "sessions": [{"session": a}]}),
                    (nid, signed(), {"uptime": 3, "sessions": [{"session": b}]})])
    assert sessions() == [(a, "closed", ""), (b, "open", "")]
    hub.heartbeats([(nid, signed(), {"uptime": 4, "sessions": [{"session": a, "head": "c" * 64}]})])
    assert sessions() == [(a, "open", "c" * 64), (b, "closed", "")]  # reopened, with its head
    engine.dispose()


# --- buyers through the node's channel -------------------------------------------------------------
def _serve(m: Market, opened: list, refuse: threading.Event | None = None):
    def open_session(buyer_key, wg_key):
        if refuse is not None and refuse.is_set():
            raise RuntimeError("the node has its maximum of 4 sessions open")
        sid = os.urandom(8).hex()
        opened.append((buyer_key, wg_key, sid))
        return {"session": sid, "address": "10.99.0.2/32", "node_key": rc.pub_b64(m.key)}

    stop = threading.Event()
    t = threading.Thread(target=m.serve, args=(open_session, stop), kwargs={"wait": 2, "retry": 0.2}, daemon=True)
    t.start()
    return stop, t


def test_buyer_is_sent_to_a_node_over_the_channel_it_opened(hub):
    fr = node_market(hub.url, region="FR", price=0.2)
    de = node_market(hub.url, region="DE", price=0.9)
    deaf = node_market(hub.url, region="DE", price=0.01)  # cheapest, heartbeats, never opens its channel
    deaf.heartbeat(uptime=5, sessions=[])
    opened: list = []
    refuse = threading.Event()
    stops = [_serve(fr, opened, refuse), _serve(de, opened)]
    buyer = Market(hub.url, Ed25519PrivateKey.generate())
    wg = wg_keypair()[1]
    try:
        # Requests may come through another hub process than the one the node polls.
        with HubProc(hub.db_url) as second:
            got = Market(second.url, buyer.key).request("POST", "/v1/connect", {"wg_public_key": wg, "region": "DE"})
        assert got["node"] == de.node_id and got["endpoint"] == "203.0.113.7:51820"
        assert opened[-1] == (rc.pub_b64(buyer.key), wg, got["session"]["session"])
        cheapest = buyer.request("POST", "/v1/connect", {"wg_public_key": wg_keypair()[1]})
        assert cheapest["node"] == fr.node_id
        with pytest.raises(MarketError) as exc:
            buyer.request("POST", "/v1/connect", {"wg_public_key": wg, "region": "JP"})
        assert exc.value.status == 503 and "region JP" in one_line(exc.value)
        refuse.set()  # the node's own refusal reaches the buyer as one line
        with pytest.raises(MarketError) as exc:
            buyer.request("POST", "/v1/connect", {"wg_public_key": wg_keypair()[1], "region": "FR"})
        assert exc.value.status == 502 and one_line(exc.value) == (
            f"node {fr.node_id} refused the session: the node has its maximum of 4 sessions open")
    finally:
        for stop, t in stops:
            stop.set()
            t.join(10)
    sessions = json.loads(cli("sessions", "--db", hub.db_url, "--json").stdout)
    assert {s["buyer_key"] for s in sessions} == {rc.pub_b64(buyer.key)}
    assert len(sessions) == 2


DEAD_POLL = """
import sys
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from idlewire_agent.market import Market
m = Market(sys.argv[1], load_pem_private_key(sys.argv[2].encode(), None))
m.node_id = sys.argv[3]
print("polling", flush=True)
m.poll(wait=30)
"""


@pytest.mark.parametrize("gone", ["killed", "silent", "silent-later"])
def test_a_poll_left_by_a_restarted_agent_does_not_swallow_the_next_buyer(hub, gone):
    """The agent restarts while its long poll waits at the hub (an upgrade, a crash): the hub's side
    of that poll lives on until its wait ends. A buyer who came then was claimed by the dead poll,
    answered into a closed socket and got 504 after 15 s (the e2e walk met it). "killed": the old
    socket is closed, and the new agent polls only after the buyer asked. "silent": the old
    connection stays open and unread (a NAT that dropped it, a frozen process); the node's newer
    poll is the one that gets the request. "silent-later": the same, with buyers who come after the
    new agent's polls have ended and begun again (every 2 s here): a poll numbered afresh once the
    node's newest one had ended took the number of the old one, and both could claim."""
    from cryptography.hazmat.primitives import serialization

    m = node_market(hub.url)
    pem = m.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()
    old = subprocess.Popen([sys.executable, "-c", DEAD_POLL, hub.url, pem, m.node_id], stdout=subprocess.PIPE,
                           text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert old.stdout.readline().strip() == "polling"
    time.sleep(0.5)  # its poll is waiting at the hub
    buyer = Market(hub.url, Ed25519PrivateKey.generate())
    out: dict = {}
    asked = threading.Thread(target=lambda: out.update(
        got=_try(lambda: buyer.request("POST", "/v1/connect", {"wg_public_key": wg_keypair()[1]}))))
    opened: list = []
    try:
        if gone == "killed":
            old.kill()  # the agent is gone; the hub has not answered that poll
            asked.start()
            time.sleep(1.0)  # the request is queued (and the dead poll woken) before the new agent polls
            stop, t = _serve(m, opened)
        else:
            old.send_signal(signal.SIGSTOP)
            stop, t = _serve(m, opened)
            time.sleep(1.0 if gone == "silent" else 2.5)  # the new poll waits beside the old one
            asked.start()
        later = []
        try:
            asked.join(20)
            for _ in range(3 if gone == "silent-later" else 0):
                time.sleep(1.0)
                later.append(_try(lambda: buyer.request("POST", "/v1/connect", {"wg_public_key": wg_keypair()[1]})))
        finally:
            stop.set()
            t.join(10)
    finally:
        old.kill()
        old.wait()
    got = [out.get("got"), *later]
    assert all(isinstance(g, dict) and g["node"] == m.node_id for g in got), got
    assert [o[2] for o in opened] == [g["session"]["session"] for g in got]


def _try(call):
    try:
        return call()
    except MarketError as exc:
        return exc


def test_an_unreachable_node_is_stored_as_such_listed_with_its_fix_and_offered_to_no_buyer(hub):
    """The node's reachability is a fact of its own: `hub nodes` (and --json) shows why a node is not
    reachable and the fix, in the node's words; no buyer is sent to it; it is again once it is."""
    why = "not reachable from the internet: forward UDP 51820 on your router to 192.168.1.23"
    key = Ed25519PrivateKey.generate()
    home = Market(hub.url, key)
    reg = {"wg_public_key": wg_keypair()[1], "payout": rc.payout_statement(key, "bc1qowner0001"), "region": "DE",
           "caps": CAPS, "price_per_gb": 0.01, "version": "0.1.0"}
    home.register(**reg, endpoint="", unreachable=why)  # the cheapest node, its channel open
    reachable = node_market(hub.url, region="DE", price=0.9)
    mute = node_market(hub.url, region="FR")
    mute.register(**{**reg, "wg_public_key": wg_keypair()[1], "payout": rc.payout_statement(mute.key, "bc1q")},
                  endpoint="")  # a node that gives no reason
    opened: list = []
    stops = [_serve(home, opened), _serve(reachable, opened)]
    buyer = Market(hub.url, Ed25519PrivateKey.generate())

    def listed() -> dict:
        return {n["id"]: n for n in json.loads(cli("nodes", "--db", hub.db_url, "--json").stdout)}

    try:
        deadline = time.monotonic() + 20
        while not all(listed()[m.node_id]["channel_open"] for m in (home, reachable)):
            assert time.monotonic() < deadline, "the nodes did not poll their channels"
            time.sleep(0.2)
        for _ in range(3):
            got = buyer.request("POST", "/v1/connect", {"wg_public_key": wg_keypair()[1], "region": "DE"})
            assert got["node"] == reachable.node_id
        nodes = listed()
        assert (nodes[home.node_id]["reachable"], nodes[home.node_id]["unreachable"]) == (False, why)
        assert (nodes[reachable.node_id]["reachable"], nodes[reachable.node_id]["unreachable"]) == (True, "")
        assert nodes[mute.node_id]["reachable"] is False
        assert nodes[mute.node_id]["unreachable"].startswith("not reachable from the internet: the node reported")
        table = cli("nodes", "--db", hub.db_url).stdout
        assert f"{home.node_id}: {why}\n" in table and "unreachable (below)" in table
        assert f"{reachable.node_id}: " not in table
        # The UPnP mapping came: the node registers again with its endpoint and is offered.
        home.register(**reg, endpoint="203.0.113.9:51820")
        got = buyer.request("POST", "/v1/connect", {"wg_public_key": wg_keypair()[1], "region": "DE"})
        assert got["node"] == home.node_id and got["endpoint"] == "203.0.113.9:51820"
        assert (listed()[home.node_id]["reachable"], listed()[home.node_id]["unreachable"]) == (True, "")
    finally:
        for stop, t in stops:
            stop.set()
            t.join(10)
    # A reason is one printable line (it is shown in listings), and none goes with an endpoint.
    for endpoint, said in (("", "not reachable\x1b[2J\x1b[31m forged"), ("", "two\nlines"), ("", "x" * 301),
                           ("203.0.113.9:51820", why)):
        with pytest.raises(MarketError) as exc:
            home.register(**reg, endpoint=endpoint, unreachable=said)
        assert exc.value.status == 422 and "unreachable" in one_line(exc.value), exc.value.reason
    assert listed()[home.node_id]["reachable"] is True  # refused registrations changed nothing


# --- receipts ---------------------------------------------------------------------------------
def test_receipts_are_verified_and_stored_once(hub):
    m = node_market(hub.url)
    sold(hub, m.node_id, "s1")
    full = chain(m.key, "s1", 10)
    first = m.upload(m.batch_for(full[:5], 0))
    assert first == {"stored": 5, "duplicates": 0, "flags": []}
    second = m.upload(m.batch_for(full, 5))  # checkpoint of #5, then 6..10
    assert second["stored"] == 5 and second["flags"] == []
    again = m.upload(full)
    assert again == {"stored": 0, "duplicates": 10, "flags": []}
    stored = cli("receipts", "--db", hub.db_url, "--session", "s1", "--limit", "1000")
    assert [json.loads(line) for line in stored.stdout.splitlines()] == full
    usage = json.loads(cli("usage", "--db", hub.db_url, "--json").stdout)
    assert usage == [{"node": m.node_id, "sessions": 1, "node_bytes": 40000, "verified_bytes": 40000, "flags": 0}]
    assert subprocess.run([sys.executable, "-m", "idlewire", "receipts", "verify", "/dev/stdin"], input=stored.stdout,
                          text=True, capture_output=True, env={**os.environ, "PYTHONPATH": f"{ROOT / 'tools'}"
                                                               f":{ROOT / 'agent'}"}).returncode == 0
    # Byte counts past 32 bits (a long session moves terabytes) are stored exactly.
    sold(hub, m.node_id, "big", "s2", "s3", *(f"m{i}" for i in range(1500)))
    big = chain(m.key, "big", 2, step=3_000_000_000_000)
    assert m.upload(big)["stored"] == 2
    (s,) = json.loads(cli("sessions", "--hub", hub.url, "--node", m.node_id, "--json").stdout)[:1]
    assert (s["session"], s["up"], s["paid_down"]) == ("big", 6_000_000_000_000, 18_000_000_000_000)
    # A batch of many short sessions (one receipt each) is one batch like any other.
    many = [r for i in range(1500) for r in chain(m.key, f"m{i}", 1)]
    assert m.upload(many)["stored"] == 1500 and m.upload(many)["duplicates"] == 1500
    # A continuation that does not start from what the hub has (no checkpoint) is refused.
    with pytest.raises(MarketError) as exc:
        m.upload(full[5:])
    assert exc.value.status == 422 and "receipt #1 (session s1, seq 6)" in one_line(exc.value)
    # Tampered: bytes raised after signing.
    bad = chain(m.key, "s2", 3)
    bad[1]["down"] += 1
    with pytest.raises(MarketError) as exc:
        m.upload(bad)
    assert exc.value.status == 422 and "bad node signature" in one_line(exc.value)
    # Someone else's receipts uploaded under this node.
    with pytest.raises(MarketError) as exc:
        m.upload(chain(Ed25519PrivateKey.generate(), "s3", 2))
    assert exc.value.status == 422 and "another node key" in one_line(exc.value)
    # A session the hub never sold (a buyer on the owner's LAN): refused in one line and listed, so the
    # node drops it from its queue (Seller.upload_once); nothing stored, nothing flagged.
    with pytest.raises(MarketError) as exc:
        m.upload([*chain(m.key, "lan1", 2), *chain(m.key, "s1", 1)])
    assert exc.value.status == 409 and "session(s) lan1 not opened through this hub" in one_line(exc.value)
    assert exc.value.answer["sessions"] == ["lan1"]
    assert json.loads(cli("flags", "--db", hub.db_url, "--json").stdout) == []


def test_equivocation_disagreement_and_missing_cosignature_are_flagged(hub):
    m = node_market(hub.url)
    sold(hub, m.node_id, "s1", "s2", "s3")
    honest = chain(m.key, "s1", 4)
    m.upload(honest)
    forked = chain(m.key, "s1", 4, step=5000)  # the same session and seqs, other bytes, node-signed
    out = m.upload(forked)
    assert out["stored"] == 0
    assert [(f["seq"], f["kind"]) for f in out["flags"]] == [(1, "equivocation")]
    flags = json.loads(cli("flags", "--db", hub.db_url, "--kind", "equivocation", "--json").stdout)
    assert [e["up"] for e in flags[0]["evidence"]] == [1000, 5000]  # both receipts kept as evidence
    assert rc.verify([flags[0]["evidence"][1]], rc.pub_b64(m.key)) is None
    # the buyer signs half of what the node counts: from seq 3 on below what the node had counted before
    out = m.upload(chain(m.key, "s2", 4, buyer_factor=0.5, step=1_000_000))
    assert out["stored"] == 4 and [(f["seq"], f["kind"]) for f in out["flags"]] == [(3, "disagreement"),
                                                                                   (4, "disagreement")]
    out = m.upload(chain(m.key, "s3", 2, cosign=False))
    assert out["stored"] == 2 and [f["kind"] for f in out["flags"]] == ["uncosigned", "uncosigned"]
    usage = {u["node"]: u for u in json.loads(cli("usage", "--hub", hub.url, "--json").stdout)}
    # s1 (honest, 16 kB), s2 (the buyer signed half of 16 MB), s3: nothing co-signed
    assert usage[m.node_id]["verified_bytes"] == 16_000 + 8_000_000
    assert usage[m.node_id]["flags"] == 1 + 2


def test_two_hub_processes_storing_one_session_at_once_store_it_once_and_flag_a_fork(db_url, monkeypatch):
    """Two hubs behind one database (separate engines, as two processes) take a node's batch for one
    session at the same moment, each past its look-up of what is stored before either inserts (on
    PostgreSQL; SQLite's writers take turns): the receipts are stored once and counted once; a
    different node-signed chain for the same session racing the first is flagged as equivocation,
    with the stored receipt and the other as evidence, as it would be arriving later."""
    from idlewire.hub import db, service

    engines = [db.make_engine(db_url) for _ in range(2)]
    db.migrate(engines[0])
    hubs = [service.Hub(e) for e in engines]
    key = Ed25519PrivateKey.generate()
    pub = rc.pub_b64(key)

    def signed():
        return service.Signed(pub, os.urandom(16).hex(), int(time.time()) + 100)

    hubs[0].register(signed(), {"wg_public_key": wg_keypair()[1], "payout": rc.payout_statement(key, "x"),
                                "region": "DE", "caps": CAPS, "price_per_gb": 0.1, "endpoint": "", "version": "1"})
    nid = service.node_id(pub)
    with db.write(engines[0]) as conn:
        conn.execute(db.sessions.insert(), [
            {"node_id": nid, "session": sid, "buyer_key": rc.pub_b64(BUYER), "request_id": os.urandom(12).hex(),
             "state": "open", "opened_at": time.time(), "updated_at": time.time(), "head": ""} for sid in "abc"])
    racing = engines[0].dialect.name == "postgresql"  # (SQLite: BEGIN IMMEDIATE, one writer at a time)
    insert = db.insert_receipts

    def at_once(batches):
        gate = threading.Barrier(2, timeout=30)

        def insert_together(conn, rows):
            gate.wait()  # both have looked up what is stored; neither has inserted
            return insert(conn, rows)

        monkeypatch.setattr(db, "insert_receipts", insert_together if racing else insert)
        out: list = [None, None]

        def run(i):
            try:
                out[i] = hubs[i].store_receipts(nid, signed(), batches[i])
            except Exception as exc:  # shown by the assert below
                out[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert all(isinstance(o, dict) for o in out), out
        return out

    def stored(sid):
        with db.read(engines[0]) as conn:
            return [(r.seq, r.hash) for r in conn.execute(
                select(db.receipts.c.seq, db.receipts.c.hash).where(db.receipts.c.session == sid)
                .order_by(db.receipts.c.seq))]

    from sqlalchemy import select

    same = chain(key, "a", 50)
    out = at_once([same, same])
    assert sorted(o["stored"] for o in out) == [0, 50] and not out[0]["flags"] and not out[1]["flags"]
    assert stored("a") == [(r["seq"], rc.receipt_hash(r)) for r in same]
    honest, fork = chain(key, "b", 50), chain(key, "b", 50, step=5000)
    out = at_once([honest, fork])
    first, second = (honest, fork) if out[0]["stored"] else (fork, honest)
    assert sorted(o["stored"] for o in out) == [0, 50]
    assert stored("b") == [(r["seq"], rc.receipt_hash(r)) for r in first]
    loser = out[1] if out[0]["stored"] else out[0]
    assert [(f["seq"], f["kind"]) for f in loser["flags"]][:1] == [(1, "equivocation")]
    with db.read(engines[0]) as conn:
        (evidence,) = conn.execute(select(db.flags.c.evidence).where(db.flags.c.kind == "equivocation")).scalars()
    assert json.loads(evidence) == [first[0], second[0]]
    # a fork longer than what the other hub stored: none of it is stored, past the other's end either
    # (it chains off the receipt it contradicts), and the session's figures are the stored chain's
    honest, fork = chain(key, "c", 30), chain(key, "c", 50, step=5000, cosign=False)
    out = at_once([honest, fork])
    first = honest if out[0]["stored"] else fork
    assert sorted(o["stored"] for o in out) == [0, len(first)]
    assert stored("c") == [(r["seq"], rc.receipt_hash(r)) for r in first]
    loser = out[1] if out[0]["stored"] else out[0]
    assert [(f["seq"], f["kind"]) for f in loser["flags"]] == [(1, "equivocation")]
    with db.read(engines[0]) as conn:
        s = conn.execute(select(db.sessions).where(db.sessions.c.session == "c")).mappings().one()
    assert (s["stored_seq"], s["up"]) == (first[-1]["seq"], first[-1]["up"])
    for e in engines:
        e.dispose()


def lagging(key, session: str, totals: list[int], signed: list[int], start: int = 1,
            prev: str = rc.GENESIS, buyer=None) -> list[dict]:
    """Receipts whose node counts are `totals` (bytes, up + down) and whose buyer statements are `signed`."""
    buyer, out = buyer or BUYER, []
    for seq, (n, b) in enumerate(zip(totals, signed, strict=True), start=start):
        stmt = rc.sign_usage(buyer, session, b // 2, b - b // 2, 1_700_000_000 + seq)
        out.append(rc.make_receipt(key, session, seq, n // 2, n - n // 2, 1_700_000_000 + seq, prev, stmt,
                                   buyer_key=rc.pub_b64(buyer)))
        prev = rc.receipt_hash(out[-1])
    return out


def test_lag_is_not_disagreement_a_statement_short_of_the_count_before_it_is(hub):
    """Each statement reaches the node after the buyer signed it, and the node counts on meanwhile: its
    own receipt may count far more (lag). What the node had counted in the receipt before, the buyer
    had been answered with before it signed: falling short of that, beyond the tolerance, is a real
    disagreement, flagged at that seq with both receipts as evidence."""
    m = node_market(hub.url)
    sold(hub, m.node_id, "lag", "short")
    mb = 1_000_000
    # 20 Mbit/s through a relay: every receipt counts ~2.5 MB more than the statement it carries
    totals = [k * 5 * mb for k in range(1, 9)]
    signed = [0] + [t + mb // 2 for t in totals[:-1]]  # each: what the receipt before counted, and a bit
    lag = lagging(m.key, "lag", totals, signed)
    assert not rc.agreed(lag[3]["up"] + lag[3]["down"], signed[3], 0.02)  # the old rule: disagreement
    out = m.upload(lag)
    assert out["stored"] == 8 and out["flags"] == [], out["flags"]
    # and a continuation (led by the checkpoint of seq 8) is judged against the checkpoint's count
    more = lagging(m.key, "lag", [45 * mb, 50 * mb], [40 * mb + 1, 45 * mb], start=9, prev=rc.receipt_hash(lag[-1]))
    out = m.upload(m.batch_for(lag + more, 8))
    assert out["stored"] == 2 and out["flags"] == [], out["flags"]
    # within the tolerance (2 % + 64 KiB) below the count before: agreed; beyond it: flagged, at that seq only
    def least(n: int) -> int:  # the least an honest buyer signs after a count of n
        return int(n * 0.98) - rc.SLACK_BYTES

    short = lagging(m.key, "short", [10 * mb, 20 * mb, 30 * mb, 40 * mb],
                    [9 * mb, least(10 * mb) + 1000, least(20 * mb) - 1000, 30 * mb])
    out = m.upload(short)
    assert [(f["seq"], f["kind"]) for f in out["flags"]] == [(3, "disagreement")], out["flags"]
    assert out["flags"][0]["detail"] == (f"node had counted {20 * mb} bytes at seq 2, buyer then signed "
                                         f"{least(20 * mb) - 1000} (beyond 2%)")
    (flag,) = json.loads(cli("flags", "--db", hub.db_url, "--kind", "disagreement", "--json").stdout)
    assert [e["seq"] for e in flag["evidence"]] == [2, 3]  # the count the buyer had seen, and its statement
    # after a checkpoint too
    cont = lagging(m.key, "short", [50 * mb], [30 * mb], start=5, prev=rc.receipt_hash(short[-1]))
    out = m.upload(m.batch_for(short + cont, 4))
    assert [(f["seq"], f["kind"]) for f in out["flags"]] == [(5, "disagreement")], out["flags"]


def test_hub_killed_mid_upload_stores_every_receipt_once(hub):
    m = node_market(hub.url)
    sold(hub, m.node_id, "s1")
    full = chain(m.key, "s1", 300)
    m.upload(m.batch_for(full[:100], 0))
    # The next batch is in flight when the hub dies: the node does not know whether it was stored.
    body = json.dumps({"receipts": m.batch_for(full[:200], 100)}).encode()
    path = f"/v1/nodes/{m.node_id}/receipts"
    h = rc.sign_request(m.key, "POST", path, body, int(time.time()), os.urandom(16).hex())
    conn = http.client.HTTPConnection(f"127.0.0.1:{hub.port}", timeout=10)
    conn.request("POST", path, body=body, headers=h)
    hub.kill()
    conn.close()
    with pytest.raises(MarketError):
        m.upload(m.batch_for(full[:200], 100))
    hub.start()
    m.close()
    m.netloc = hub.url.split("//")[1]  # (the same port, unless another test took it meanwhile)
    # It resends from what it last knew to be stored, then goes on.
    out = m.upload(m.batch_for(full[:200], 100))
    assert out["stored"] + out["duplicates"] == 100
    assert m.upload(m.batch_for(full, 200))["stored"] == 100
    assert m.upload(full)["duplicates"] == 300
    stored = cli("receipts", "--db", hub.db_url, "--session", "s1", "--limit", "1000", "--json")
    assert json.loads(stored.stdout) == full


def test_serve_refuses_a_postgresql_role_that_may_not_stage_receipts(postgres):
    """PostgreSQL stages each receipt batch in a temporary table: a database that revoked TEMPORARY
    from PUBLIC would refuse every upload, so `serve` refuses to start, in one line with the GRANT."""
    import psycopg
    from idlewire.hub import db

    url = postgres.new_database("hubnotemp")
    db.migrate(db.make_engine(url))
    role = f"limited{os.getpid()}"
    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=hub dbname=hubnotemp", autocommit=True) as c:
        c.execute(f'CREATE ROLE "{role}" LOGIN')
        c.execute('REVOKE TEMPORARY ON DATABASE "hubnotemp" FROM PUBLIC')
        c.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"')
    limited = f"postgresql://{role}@127.0.0.1:{postgres.port}/hubnotemp"
    out = cli("serve", "--db", limited, "--listen", "127.0.0.1:1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f'GRANT TEMPORARY ON DATABASE "hubnotemp" TO "{role}"' in out.stderr
    assert cli("flags", "--db", limited).returncode == 0  # reading needs no temporary table


def test_bad_db_and_listen_are_one_line_errors(tmp_path):
    out = cli("serve", "--db", "postgresql://nobody:s3cret@127.0.0.1:1/none", "--listen", "127.0.0.1:1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "cannot open the hub database" in out.stderr
    assert "s3cret" not in out.stderr and "nobody:***@" in out.stderr
    out = cli("flags", "--db", "postgresql+psycopg2://hub@127.0.0.1:1/none")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "through psycopg (3)" in out.stderr
    out = cli("serve", "--db", f"sqlite:///{tmp_path}/h\x01.sqlite", "--listen", "127.0.0.1:1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no control characters" in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is created for a refused database URL"
    out = cli("serve", "--db", str(tmp_path / "h.sqlite"), "--listen", "nowhere")
    assert out.returncode == 2 and "--listen 'nowhere': expected ADDRESS:PORT" in out.stderr
    out = cli("nodes", "--hub", "http://127.0.0.1:1")
    assert out.returncode == 2 and "cannot reach the hub" in out.stderr
