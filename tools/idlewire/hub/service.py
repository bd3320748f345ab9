"""What the hub does, without HTTP: registration, heartbeats, the channel to nodes, receipts.

Every method is one or a few short database transactions and keeps nothing in memory that another
hub process would need. A refusal is a HubError with an HTTP status and one line saying why.
Formats and bounds come from the agent package (receipts, config): one owner per fact.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time

from idlewire_agent import config as agent_config
from idlewire_agent import receipts as rc
from idlewire_agent import schema
from idlewire_agent.api import CLOCK_SKEW
from idlewire_agent.market import REACHABILITY_MAX
from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from .. import ed25519fast
from ..economy.proof import EQUIVOCATION, FORGED_USAGE
from . import db

ed25519fast.install()  # libsodium first, OpenSSL for what it refuses: the same signatures verify, twice as fast

HEARTBEAT_INTERVAL = 60  # seconds; the node's client (agent market.py) uses the hub's figure from /v1
LIVE_AFTER = 3 * HEARTBEAT_INTERVAL  # a node heard from within this is listed as online
CHANNEL_LIVE = 90  # a node is offered to buyers while its channel was polled within this
CONNECT_TIMEOUT = 15.0  # a buyer's connect waits this long for the node's answer
MAX_BATCH = 5000  # receipts per upload
MAX_SESSIONS = 4096  # open sessions listed in one heartbeat
NO_ENDPOINT = "not reachable from the internet: the node reported no public endpoint (and no reason)"
TOLERANCE_PERCENT = agent_config.MeteringConfig().tolerance_percent  # the agent's default

_SESSION = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY = re.compile(r"^[A-Za-z0-9+/]{43}=$")
_ENDPOINT = re.compile(r"^([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):([0-9]{1,5})$")
# The region claim and the coarse location: the node's own keys (one owner: the agent's schema).
REGION = schema.NODE["node"]["region"]
LOCATION = schema.NODE["node"]["location"]


class Signed:
    """A request whose signature holds: who signed it and its nonce, spent once in the database."""

    __slots__ = ("expires", "key", "nonce", "spent")

    def __init__(self, key: str, nonce: str, expires: int):
        self.key, self.nonce, self.expires, self.spent = key, nonce, expires, False


class HubError(Exception):
    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra  # more of the answer's JSON, for the client's program (e.g. the sessions refused)


# Hot paths execute statements built once (building one costs more than running it on SQLite).
# The nonce insert does nothing on a replay (returns no row) instead of failing: the transaction goes
# on, so a batch of heartbeats refuses the replayed one alone. (RETURNING, not rowcount: psycopg's
# rowcount through SQLAlchemy is -1 here.)
_NONCE_INSERT = {"sqlite": sqlite_dialect.insert(db.nonces).on_conflict_do_nothing().returning(db.nonces.c.nonce),
                 "postgresql": pg_dialect.insert(db.nonces).on_conflict_do_nothing().returning(db.nonces.c.nonce)}
_NONCE_INSERT_MANY = {name: stmt.returning(db.nonces.c.key, db.nonces.c.nonce) for name, stmt in (
    ("sqlite", sqlite_dialect.insert(db.nonces).on_conflict_do_nothing()),
    ("postgresql", pg_dialect.insert(db.nonces).on_conflict_do_nothing()))}
_NODES_GET = select(db.nodes.c.id, db.nodes.c.node_key, db.nodes.c.open_sessions).where(
    db.nodes.c.id.in_(bindparam("nids", expanding=True)))
_NONCE_PURGE = delete(db.nonces).where(db.nonces.c.expires < bindparam("now"))
_NODE_GET = select(db.nodes.c.node_key, db.nodes.c.heartbeats, db.nodes.c.open_sessions, db.nodes.c.region,
                   db.nodes.c.endpoint).where(db.nodes.c.id == bindparam("nid"))
_BEAT = update(db.nodes).where(db.nodes.c.id == bindparam("nid")).values(
    last_seen=bindparam("b_now"), uptime=bindparam("b_uptime"), open_sessions=bindparam("b_open"),
    heartbeats=db.nodes.c.heartbeats + 1)
_BEAT_CAPS = _BEAT.values(caps=bindparam("b_caps"), max_sessions=bindparam("b_max"))
_OPEN_SESSIONS = select(db.sessions.c.node_id, db.sessions.c.session, db.sessions.c.head).where(
    db.sessions.c.node_id.in_(bindparam("nids", expanding=True)), db.sessions.c.state == "open")
_ONE_SESSION = and_(db.sessions.c.node_id == bindparam("nid"), db.sessions.c.session == bindparam("sid"))
_SESSION_CLOSE = update(db.sessions).where(_ONE_SESSION).values(state="closed", updated_at=bindparam("b_now"))
_SESSION_HEAD = update(db.sessions).where(_ONE_SESSION).values(head=bindparam("b_head"), updated_at=bindparam("b_now"))
# The sessions the hub sold (answered open requests: request_id set), with the buyer each was sold to.
_SOLD = select(db.sessions.c.session, db.sessions.c.buyer_key).where(
    db.sessions.c.node_id == bindparam("nid"), db.sessions.c.session.in_(bindparam("sids", expanding=True)),
    db.sessions.c.request_id.is_not(None))
NOT_SOLD = ("not opened through this hub (sold by `connect --hub`): their usage is not the hub's to count; "
            "the node uploads only the sessions the hub sold")


def _session_open(dialect):
    """A session the node lists that the hub has not open: opened outside the hub (a buyer on the
    owner's LAN) or reopened; one UPSERT, for a batch of them at once."""
    stmt = dialect.insert(db.sessions)
    return stmt.on_conflict_do_update(index_elements=["node_id", "session"], set_={
        "head": stmt.excluded.head, "state": "open", "updated_at": stmt.excluded.updated_at})


_SESSION_OPEN = {"sqlite": _session_open(sqlite_dialect), "postgresql": _session_open(pg_dialect)}


def node_id(node_key: str) -> str:
    return hashlib.sha256(node_key.encode()).hexdigest()[:20]


def checked(key: schema.Key, name: str, value, required: bool = False) -> str:
    """`value` as the node's schema key applies it (a region upper-cased), or a 422 in one line."""
    try:
        out = key.check(value)
    except schema.Invalid as exc:
        raise HubError(422, f"{name}: expected {exc}, got {schema.shown(value)}") from None
    if required and not out:
        raise HubError(422, f"{name}: expected the node's country ({schema.COUNTRY_EXPECT}), got none")
    return out


def heartbeat_body(body) -> tuple[float, dict | None, dict[str, str]]:
    """A heartbeat's JSON body checked: (uptime, caps in force or None, {session: ledger head})."""
    if not isinstance(body, dict):
        raise HubError(422, "body: expected {\"uptime\": S, \"caps\": {...}, \"sessions\": [...]}")
    uptime = body.get("uptime")
    if isinstance(uptime, bool) or not isinstance(uptime, int | float) or not 0 <= uptime < 1e12:
        raise HubError(422, "uptime: expected the seconds since the agent started (a number >= 0)")
    caps = Hub._caps(body["caps"]) if body.get("caps") is not None else None
    sessions = body.get("sessions", [])
    if not isinstance(sessions, list) or len(sessions) > MAX_SESSIONS:
        raise HubError(422, f"sessions: expected a list of at most {MAX_SESSIONS} open sessions")
    listed = {}
    for i, s in enumerate(sessions):
        sid, head = (s.get("session"), s.get("head", "")) if isinstance(s, dict) else (None, None)
        if not isinstance(sid, str) or not _SESSION.match(sid) or not isinstance(head, str) \
                or not (head == "" or _HEX64.match(head)):
            raise HubError(422, f"sessions[{i}]: expected a session id and the SHA-256 hex of its newest receipt")
        listed[sid] = head
    return float(uptime), caps, listed


def reachability(endpoint: str, said) -> str:
    """What the hub stores as the node's reachability: "" (reachable at its endpoint), else why not
    and the fix, in the node's words (agent market.Seller.reachability) or, from a node that says
    nothing, that it reported no endpoint. The text is shown in listings: one printable line."""
    if said is not None and (not isinstance(said, str) or len(said) > REACHABILITY_MAX
                             or not said.isprintable()):
        raise HubError(422, f"unreachable: expected one printable line of at most {REACHABILITY_MAX} characters "
                            "(why buyers cannot reach the node, and the fix)")
    if endpoint:
        if said:
            raise HubError(422, "unreachable: expected \"\" with an endpoint (a node buyers reach at HOST:PORT is "
                                "reachable)")
        return ""
    return said or NO_ENDPOINT


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


class Hub:
    def __init__(self, engine, clock=time.time, tolerance_percent: float = TOLERANCE_PERCENT):
        self.engine = engine
        self.clock = clock
        self.tolerance = tolerance_percent

    # --- signed requests ------------------------------------------------------------------------
    def authenticate(self, headers, method: str, path: str, body: bytes) -> Signed:
        """Who signed this request (agent receipts.sign_request format); refuses a missing, forged
        or stale one. The nonce is spent (kept in the database while the time is in the window, so
        every hub process refuses a replay) in the transaction of the request's own work."""
        key = headers.get("x-idlewire-key")
        if not key:
            raise HubError(401, "unsigned request: sign it with the node's or buyer's key (X-Idlewire-* headers)")
        t, nonce = headers.get("x-idlewire-time", ""), headers.get("x-idlewire-nonce", "")
        sig = headers.get("x-idlewire-signature", "")
        now = self.clock()
        if not t.isdigit() or len(t) > 12:
            raise HubError(401, "X-Idlewire-Time: expected the current unix time in seconds")
        if abs(int(t) - now) > CLOCK_SKEW:
            raise HubError(401, f"X-Idlewire-Time: stale request ({int(t) - int(now):+d} s from the hub's "
                                f"clock; allowed ±{CLOCK_SKEW} s): check the sender's clock (NTP)")
        if not rc.NONCE.match(nonce):  # the node's own nonce rule
            raise HubError(401, "X-Idlewire-Nonce: expected 16-64 characters A-Z a-z 0-9 _ -")
        if not _KEY.match(key) or len(sig) > 200 or not rc.request_valid(key, sig, method, path, t, nonce, body):
            raise HubError(401, "X-Idlewire-Signature: not a valid signature of this request by X-Idlewire-Key "
                                "(forged or altered)")
        return Signed(key, nonce, int(t) + CLOCK_SKEW + 1)

    def _spend(self, conn, auth: Signed) -> None:
        """Record the request's nonce; a replay fails here (unique key), in whichever hub process."""
        if auth.spent:
            return
        if conn.execute(_NONCE_INSERT[conn.dialect.name],
                        {"key": auth.key, "nonce": auth.nonce, "expires": auth.expires}).first() is None:
            raise HubError(401, "X-Idlewire-Nonce: already used (replayed request)")
        auth.spent = True
        if random.random() < 0.002:  # noqa: S311 (housekeeping, not security)
            conn.execute(_NONCE_PURGE, {"now": self.clock()})

    def _spend_many(self, conn, auths: list[Signed]) -> list[bool]:
        """_spend for a batch: one INSERT of their nonces; False for each replay (a nonce stored
        before, or twice in the batch: the first one counts)."""
        rows, first, seen = [], [], set()
        for a in auths:
            new = (a.key, a.nonce) not in seen
            first.append(new)
            if new:
                seen.add((a.key, a.nonce))
                rows.append({"key": a.key, "nonce": a.nonce, "expires": a.expires})
        got = {(k, n) for k, n in conn.execute(_NONCE_INSERT_MANY[conn.dialect.name], rows)} if rows else set()
        out = []
        for a, new in zip(auths, first, strict=True):
            a.spent = new and (a.key, a.nonce) in got
            out.append(a.spent)
        if rows and random.random() < 0.002 * len(rows):  # noqa: S311 (housekeeping, not security)
            conn.execute(_NONCE_PURGE, {"now": self.clock()})
        return out

    def _node(self, conn, nid: str, auth: Signed) -> dict:
        """The node `nid` the request is about, checked to be the one that signed it; spends the nonce."""
        self._spend(conn, auth)
        row = conn.execute(_NODE_GET, {"nid": nid}).mappings().first()
        if row is None:
            raise HubError(404, f"no node {nid}: register first (POST /v1/nodes)")
        if row["node_key"] != auth.key:
            raise HubError(403, f"node {nid}: request signed by another key than the node's")
        return dict(row)

    # --- registration and heartbeats --------------------------------------------------------------
    @staticmethod
    def _caps(caps) -> dict:
        if not isinstance(caps, dict):
            raise HubError(422, "caps: expected an object with " + ", ".join(agent_config.UNIT_CAPS))
        _, problems = agent_config.parse_unit({"caps": caps}, "caps")
        if problems:
            raise HubError(422, f"caps: {problems[0]}")
        missing = [k for k in ("up_mbit", "down_mbit", "max_sessions") if k not in caps]
        if missing:
            raise HubError(422, f"caps: missing {', '.join(missing)} (the caps in force)")
        return caps

    def register(self, auth: Signed, body: dict) -> dict:
        key = auth.key
        payout = body["payout"]
        if not rc.payout_valid(payout, key):
            raise HubError(403, "payout: not a payout statement signed by the key that signed this request "
                                "(forged, or another node's)")
        region = checked(REGION, "region", body["region"], required=True)
        location = checked(LOCATION, "location", body.get("location") or "")
        caps = self._caps(body["caps"])
        endpoint = body.get("endpoint") or ""
        m = _ENDPOINT.match(endpoint)
        if endpoint and not (m and 0 < int(m.group(2)) < 65536):
            raise HubError(422, f"endpoint: expected HOST:PORT buyers reach the node's WireGuard at, got {endpoint!r}")
        unreachable = reachability(endpoint, body.get("unreachable"))
        if not _KEY.match(body["wg_public_key"]):
            raise HubError(422, "wg_public_key: expected a WireGuard public key (base64 of 32 bytes)")
        nid, now = node_id(key), self.clock()
        values = {"wg_key": body["wg_public_key"], "payout": _dumps(payout), "payout_address": payout["address"],
                  "unit": payout["unit"], "region": region, "location": location,
                  "caps": _dumps(caps), "max_sessions": int(caps["max_sessions"]),
                  "price_per_gb": float(body["price_per_gb"]), "endpoint": endpoint,
                  "reachable": not unreachable, "unreachable": unreachable,
                  "version": body["version"], "last_seen": now}
        with db.write(self.engine) as conn:
            self._spend(conn, auth)
            done = conn.execute(update(db.nodes).where(db.nodes.c.id == nid).values(**values)).rowcount
            if not done:
                conn.execute(insert(db.nodes).values(id=nid, node_key=key, registered_at=now, uptime=0,
                                                     channel_seen=0, open_sessions=0, heartbeats=0, **values))
        return {"node": nid, "registered": not done, "heartbeat_interval": HEARTBEAT_INTERVAL,
                "channel": f"/v1/nodes/{nid}/channel"}

    def heartbeat(self, nid: str, auth: Signed, body: dict) -> dict:
        out = self.heartbeats([(nid, auth, body)])[0]
        if isinstance(out, HubError):
            raise out
        return out

    def heartbeats(self, beats: list[tuple[str, Signed, dict]]) -> list[dict | HubError]:
        """Heartbeats, many in one write transaction (the app batches those that arrive together):
        one SELECT of their nodes, one nonce insert each (the replay guard), one executemany UPDATE.
        Each gets its own answer: a refused one (bad body, replay, unknown node, another key) does
        not hold back the others."""
        now = self.clock()
        out: list = [None] * len(beats)
        parsed: list = [None] * len(beats)
        for i, (_nid, _auth, body) in enumerate(beats):
            try:
                parsed[i] = heartbeat_body(body)
            except HubError as exc:
                out[i] = exc
        todo = [i for i in range(len(beats)) if out[i] is None]
        if not todo:
            return out
        with db.write(self.engine) as conn:
            known = {r.id: r for r in conn.execute(_NODES_GET, {"nids": sorted({beats[i][0] for i in todo})})}
            plain, capped, syncing, theirs = [], [], [], []
            for i in sorted(todo, key=lambda i: beats[i][0]):  # one row order in every process: no deadlock
                nid, auth, _ = beats[i]
                node = known.get(nid)
                if node is None:
                    out[i] = HubError(404, f"no node {nid}: register first (POST /v1/nodes)")
                elif node.node_key != auth.key:
                    out[i] = HubError(403, f"node {nid}: request signed by another key than the node's")
                else:
                    theirs.append(i)
            spent = self._spend_many(conn, [beats[i][1] for i in theirs])
            for i, fresh in zip(theirs, spent, strict=True):
                nid, auth, _ = beats[i]
                uptime, caps, listed = parsed[i]
                node = known[nid]
                if not fresh:
                    out[i] = HubError(401, "X-Idlewire-Nonce: already used (replayed request)")
                    continue
                args = {"nid": nid, "b_now": now, "b_uptime": uptime, "b_open": len(listed)}
                if caps is None:
                    plain.append(args)
                else:
                    capped.append({**args, "b_caps": _dumps(caps), "b_max": int(caps["max_sessions"])})
                if node.open_sessions or listed:
                    syncing.append((nid, listed))
                out[i] = {"ok": True, "heartbeat_interval": HEARTBEAT_INTERVAL}
            if syncing:
                self._sync_sessions(conn, syncing, now)
            if plain:
                conn.execute(_BEAT, plain)
            if capped:
                conn.execute(_BEAT_CAPS, capped)
        return out

    @staticmethod
    def _sync_sessions(conn, syncing: list[tuple[str, dict[str, str]]], now: float) -> None:
        """The nodes' open sessions and their ledger heads as they report them: one SELECT of what
        the hub has open, then one executemany per kind of change (close, new head, open). A node
        heartbeating twice in one batch is applied in turn (its first report is written first)."""
        while syncing:
            once: dict[str, dict[str, str]] = {}
            rest = []
            for nid, listed in syncing:
                if nid in once:
                    rest.append((nid, listed))
                else:
                    once[nid] = listed
            syncing = rest
            known: dict[str, dict[str, str]] = {}
            for nid, sid, head in conn.execute(_OPEN_SESSIONS, {"nids": list(once)}):
                known.setdefault(nid, {})[sid] = head
            close, heads, opened = [], [], []
            for nid, listed in once.items():
                mine = known.get(nid, {})
                close += [{"nid": nid, "sid": sid, "b_now": now} for sid in mine if sid not in listed]
                for sid, head in listed.items():
                    if sid not in mine:
                        opened.append({"node_id": nid, "session": sid, "buyer_key": "", "state": "open",
                                       "opened_at": now, "updated_at": now, "head": head})
                    elif mine[sid] != head:
                        heads.append({"nid": nid, "sid": sid, "b_head": head, "b_now": now})
            if close:
                conn.execute(_SESSION_CLOSE, close)
            if heads:
                conn.execute(_SESSION_HEAD, heads)
            if opened:
                conn.execute(_SESSION_OPEN[conn.dialect.name], opened)

    # --- the channel the node opened ----------------------------------------------------------------
    def claim(self, nid: str, auth: Signed) -> list[dict]:
        """Requests queued for the node, marked delivered (each to one poller only)."""
        now = self.clock()
        out = []
        with db.write(self.engine) as conn:
            self._node(conn, nid, auth)
            conn.execute(update(db.nodes).where(db.nodes.c.id == nid).values(last_seen=now, channel_seen=now))
            q = db.requests.c
            rows = conn.execute(select(q.id, q.kind, q.body, q.created).where(
                q.node_id == nid, q.state == "queued")).all()
            for rid, kind, body, created in rows:
                if created < now - CONNECT_TIMEOUT:  # its buyer gave up (or its hub process died)
                    conn.execute(update(db.requests).where(q.id == rid, q.state == "queued")
                                 .values(state="expired", answered_at=now))
                    continue
                if conn.execute(update(db.requests).where(db.requests.c.id == rid, db.requests.c.state == "queued")
                                .values(state="delivered", delivered_at=now)).rowcount:
                    out.append({"id": rid, "kind": kind, "body": json.loads(body)})
        return out

    def ready(self, nodes: set[str], request_ids: list[str]) -> tuple[set[str], set[str]]:
        """Of these, the nodes with a request queued and the requests answered (or given up)."""
        q = db.requests.c
        with db.read(self.engine) as conn:
            queued = {n for (n,) in conn.execute(select(q.node_id).where(q.state == "queued").distinct())} & nodes
            done = set()
            for i in range(0, len(request_ids), 500):
                done |= {r for (r,) in conn.execute(select(q.id).where(
                    q.id.in_(request_ids[i:i + 500]), q.state.not_in(("queued", "delivered"))))}
        return queued, done

    def answer(self, nid: str, auth: Signed, rid: str, body: dict) -> dict:
        ok = bool(body.get("ok"))
        result = body.get("result") if ok else {"error": str(body.get("error") or "refused")[:300]}
        now = self.clock()
        with db.write(self.engine) as conn:
            self._node(conn, nid, auth)
            req = conn.execute(select(db.requests).where(db.requests.c.id == rid,
                                                         db.requests.c.node_id == nid)).mappings().first()
            if req is None:
                raise HubError(404, f"request {rid}: not sent to node {nid}")
            if ok and req["kind"] == "open" and (not isinstance(result, dict) or not isinstance(
                    result.get("session"), str) or not _SESSION.match(result["session"])):
                raise HubError(422, "result: expected the opened session ({\"session\": ID, ...} as the node's "
                                    "POST /sessions answers)")
            if ok and req["kind"] == "relay" and (not isinstance(result, dict) or not isinstance(
                    result.get("status"), int) or "body" not in result):
                raise HubError(422, "result: expected the node API's answer ({\"status\": N, \"body\": ...})")
            s = db.sessions.c
            resold = None
            if ok and req["kind"] == "open" and conn.execute(select(s.request_id).where(
                    s.node_id == nid, s.session == result["session"], s.request_id.is_not(None))).first():
                # The session's buyer is the one it was first sold to: answering another buyer's request
                # with it would move its usage (and the tokens it burns) to that buyer.
                resold = HubError(409, f"result: session {result['session']} was sold before, to another buyer; "
                                       "answer each open request with a new session")
                ok, result = False, {"error": "the node answered with a session sold before to another buyer"}
            if not conn.execute(update(db.requests).where(db.requests.c.id == rid, db.requests.c.state == "delivered")
                                .values(state="answered" if ok else "failed", answered_at=now,
                                        result=_dumps(result))).rowcount:
                raise HubError(409, f"request {rid}: already answered or expired (state {req['state']})")
            if ok and req["kind"] == "open":
                sid = result["session"]
                done = conn.execute(update(db.sessions).where(s.node_id == nid, s.session == sid)
                                    .values(buyer_key=req["buyer_key"], request_id=rid, state="open",
                                            updated_at=now)).rowcount
                if not done:
                    conn.execute(insert(db.sessions).values(node_id=nid, session=sid, buyer_key=req["buyer_key"],
                                                            request_id=rid, state="open", opened_at=now,
                                                            updated_at=now, head=""))
                conn.execute(update(db.nodes).where(db.nodes.c.id == nid)
                             .values(open_sessions=db.nodes.c.open_sessions + 1))
        if resold is not None:  # after the commit: the buyer hears the request failed
            raise resold
        return {"ok": True}

    # --- buyers ---------------------------------------------------------------------------------
    def pick(self, region: str | None, max_price: float | None, exclude: tuple = (),
             only: str | None = None) -> dict | None:
        now = self.clock()
        n = db.nodes.c
        # a node buyers cannot reach (no UPnP on its router, nothing forwarded) is not offered
        q = select(db.nodes).where(n.channel_seen > now - CHANNEL_LIVE, n.open_sessions < n.max_sessions,
                                   n.reachable.is_(True))
        if only:
            q = q.where(n.id == only)
        if region:
            q = q.where(n.region == region)
        if max_price is not None:
            q = q.where(n.price_per_gb <= max_price)
        if exclude:
            q = q.where(n.id.not_in(exclude))
        q = q.order_by(n.price_per_gb, n.open_sessions, func.random()).limit(1)
        with db.read(self.engine) as conn:
            row = conn.execute(q).mappings().first()
        return dict(row) if row else None

    def queue_open(self, auth: Signed, body: dict) -> tuple[str, dict]:
        buyer_key = auth.key
        region = checked(REGION, "region", body.get("region") or "") or None
        if not _KEY.match(body["wg_public_key"]):
            raise HubError(422, "wg_public_key: expected a WireGuard public key (base64 of 32 bytes)")
        node = self.pick(region, body.get("max_price"), only=body.get("node"))
        if node is None and body.get("node"):
            raise HubError(503, f"node {body['node']}: not online with a free place (or not registered)")
        if node is None:
            if region:  # demand the region could not serve: settlement counts it for the multiplier
                self._unserved(region, buyer_key)
            with db.read(self.engine) as conn:
                q = select(func.count()).select_from(db.nodes)
                total = conn.execute(q.where(db.nodes.c.region == region) if region else q).scalar()
            where = f" in region {region}" if region else ""
            raise HubError(503, f"no node with free capacity{where} is online ({total} registered{where}); "
                                "try again later" + (" or another --region" if region else ""))
        rid = os.urandom(12).hex()
        msg = {"buyer_key": buyer_key, "wg_public_key": body["wg_public_key"]}
        with db.write(self.engine) as conn:
            self._spend(conn, auth)
            conn.execute(insert(db.requests).values(id=rid, node_id=node["id"], kind="open", buyer_key=buyer_key,
                                                    body=_dumps(msg), state="queued", created=self.clock()))
        return rid, node

    def _unserved(self, region: str, buyer_key: str) -> None:
        """One row per buyer, region and minute (a retrying client adds no more)."""
        now = self.clock()
        with db.write(self.engine) as conn:
            conn.execute(db.insert_ignore(conn, db.unserved).values(region=region, buyer_key=buyer_key,
                                                                    minute=int(now // 60), at=now))

    def queue_relay(self, auth: Signed, nid: str, request: dict) -> tuple[str, dict]:
        """A buyer's own signed call to the node's session API (co-signed usage, receipts, close),
        carried to the node over its channel: the node checks the buyer's signature and nonce
        itself, so the hub can neither forge nor replay one; the node's admin API stays off the WAN."""
        h = request.get("headers")
        if not isinstance(h, dict) or h.get("X-Idlewire-Key") != auth.key:
            raise HubError(422, "request.headers: expected the node request signed with the same buyer key "
                                "(X-Idlewire-Key) as this one")
        with db.write(self.engine) as conn:
            self._spend(conn, auth)
            node = conn.execute(select(db.nodes).where(db.nodes.c.id == nid)).mappings().first()
            if node is None:
                raise HubError(404, f"no node {nid}")
            rid = os.urandom(12).hex()
            conn.execute(insert(db.requests).values(id=rid, node_id=nid, kind="relay", buyer_key=auth.key,
                                                    body=_dumps({"buyer_key": auth.key, "request": request}),
                                                    state="queued", created=self.clock()))
        return rid, dict(node)

    def outcome(self, rid: str) -> dict | None:
        with db.read(self.engine) as conn:
            row = conn.execute(select(db.requests.c.state, db.requests.c.result).where(
                db.requests.c.id == rid)).first()
        if row is None or row[0] in ("queued", "delivered"):
            return None
        return {"state": row[0], "result": json.loads(row[1]) if row[1] else None}

    def expire(self, rid: str) -> bool:
        """Give up on a request the node did not answer; False if the answer came meanwhile."""
        with db.write(self.engine) as conn:
            return bool(conn.execute(update(db.requests).where(
                db.requests.c.id == rid, db.requests.c.state.in_(("queued", "delivered")))
                .values(state="expired", answered_at=self.clock())).rowcount)

    # --- receipts -------------------------------------------------------------------------------
    def store_receipts(self, nid: str, auth: Signed, entries: list) -> dict:
        """Verify a batch with the agent's receipts.verify (the code `idlewire receipts verify` runs)
        and store it once. A session continued from an earlier batch starts with the node's signed
        checkpoint of the last receipt sent before (receipts.make_checkpoint), which must match
        what the hub has. Resent receipts are skipped; a different node-signed receipt for a
        stored (session, seq) is flagged as equivocation with both as evidence; a co-signed one
        whose buyer statement falls short of what the node had counted in the entry before it
        (receipts.acknowledged: a statement lagging its own receipt's count is not a disagreement)
        is flagged with both entries as evidence; one without a buyer co-signature is stored (the
        chain goes on through it) but counts nothing, and flagged.

        Usage counts only in sessions the hub sold (an answered open request), co-signed by the
        buyer it sold each to (the session's buyer_key, never the receipts' word). A batch naming a
        session the hub never opened is refused (409, the sessions listed) and nothing is flagged:
        a buyer on the owner's LAN is no offence, and the hub has no buyer to hold it to. A
        node-signed receipt of a sold session carrying a buyer statement that is not a valid
        signature by that session's buyer is forged usage: the batch is refused (422) and the
        receipts are kept as a forged_usage flag, which settlement slashes with them as evidence."""
        if not isinstance(entries, list) or not entries:
            raise HubError(422, "receipts: expected a non-empty JSON array")
        if len(entries) > MAX_BATCH:
            raise HubError(413, f"receipts: {len(entries)} in one batch; send at most {MAX_BATCH}")
        encoded: list = []  # each receipt's canonical text, as verify hashed it: stored as it is
        problem = rc.verify(entries, auth.key, encoded=encoded)
        suspect = None  # a node-signed receipt whose buyer statement verify refused: forged if the hub sold it
        if problem is not None:
            if problem.reason not in (rc.BAD_COSIGNATURE, rc.SWITCHED_BUYER) \
                    or not _SESSION.match(problem.session):
                raise HubError(422, f"receipts rejected: {problem}")
            suspect = entries[problem.index]  # (verify checked its node signature, by this node, first)
        else:
            for e in entries:
                if not _SESSION.match(e["session"]):
                    raise HubError(422, f"receipts: session id {e['session'][:80]!r}: expected 1-64 of A-Z a-z 0-9 _ -")
        by_session: dict[str, list[tuple[dict, bytes | None]]] = {}
        for e, enc in zip(entries, encoded, strict=True) if suspect is None else ():
            by_session.setdefault(e["session"], []).append((e, enc))
        now = self.clock()
        stored = duplicates = 0
        new_flags: list[dict] = []
        refusal: HubError | None = None
        with db.write(self.engine) as conn:
            self._node(conn, nid, auth)
            names = [suspect["session"]] if suspect is not None else list(by_session)
            sold: dict[str, str] = {}
            for i in range(0, len(names), 500):
                sold.update(conn.execute(_SOLD, {"nid": nid, "sids": names[i:i + 500]}).all())
            if suspect is not None:
                refusal = HubError(422, f"receipts rejected: {problem}")
                sid = suspect["session"]
                # the session's receipts verify got through (node-signed, by this node), up to the suspect
                bad = [e for e in entries[:problem.index + 1] if e.get("session") == sid and "buyer" in e
                       and sid in sold and not rc.usage_valid(e["buyer"], sid, sold[sid])]
                if bad:
                    refusal, flag = self._forged(nid, sid, bad, sold, now, problem.reason)
                    new_flags.append(flag)
            else:
                refusal, new_flags = self._judge_sold(nid, by_session, sold, now)
            if refusal is None:
                stored, duplicates = self._store(conn, nid, by_session, now, new_flags)
            for f in new_flags:
                self._insert_flag(conn, f)
        if refusal is not None:  # after the commit: the evidence of forged usage stays
            raise refusal
        return {"stored": stored, "duplicates": duplicates, "flags": [
            {k: f[k] for k in ("session", "seq", "kind", "detail")} for f in new_flags]}

    def _judge_sold(self, nid: str, by_session: dict, sold: dict[str, str],
                    now: float) -> tuple[HubError | None, list[dict]]:
        """Refusal (or None) and forged-usage flags for a batch whose signatures all hold: every
        session must be one the hub sold, every co-signature by the buyer it was sold to."""
        flags, first = [], None
        for sid, es in by_session.items():
            buyer = sold.get(sid)
            if buyer is None:
                continue
            bad = [e for e, _ in es if "buyer" in e and e["buyer"]["key"] != buyer]
            if bad:
                refusal, flag = self._forged(nid, sid, bad, sold, now, "co-signed by another key than the buyer's")
                first = first or refusal
                flags.append(flag)
        if first is not None:
            return first, flags
        foreign = sorted(sid for sid in by_session if sid not in sold)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            return HubError(409, f"receipts refused: session(s) {shown} {NOT_SOLD}", sessions=foreign), []
        for sid, es in by_session.items():
            for e, _ in es:
                if e.get("buyer_key", sold[sid]) != sold[sid]:
                    return HubError(422, f"receipts rejected: session {sid} seq {e['seq']}: buyer_key {e['buyer_key']} "
                                         f"is not the buyer this hub sold the session to ({sold[sid]})"), []
        return None, []

    def _forged(self, nid: str, sid: str, bad: list[dict], sold: dict[str, str], now: float,
                why: str) -> tuple[HubError, dict]:
        detail = (f"buyer statement not signed by the buyer this hub sold the session to ({sold[sid]}): {why}; "
                  f"forged usage")
        flag = self._flag(nid, sid, bad[0]["seq"], FORGED_USAGE, detail, bad, now)
        return HubError(422, f"receipts rejected: session {sid} seq {bad[0]['seq']}: {detail}, recorded as evidence "
                             f"for a slash"), flag

    def _store(self, conn, nid: str, by_session: dict, now: float, new_flags: list[dict]) -> tuple[int, int]:
        """Store a batch judged sound (the sessions the hub sold, their buyers' co-signatures):
        (stored, duplicates); equivocation, disagreement and missing co-signatures into NEW_FLAGS."""
        stored = duplicates = 0
        r = db.receipts.c
        ranges = [and_(r.session == s, r.seq.between(es[0][0]["seq"], es[-1][0]["seq"]))
                  for s, es in by_session.items()]
        have = {}
        for i in range(0, len(ranges), 200):  # (SQLite parses a long OR into a tree 1000 deep at most)
            have.update({(row.session, row.seq): row.hash for row in conn.execute(
                select(r.session, r.seq, r.hash).where(r.node_id == nid, or_(*ranges[i:i + 200])))})
        rows, touched = [], {}
        for sid, es in by_session.items():
            before = None  # the entry before e in the chain: a batch starts each session at seq 1
            for e, enc in es:  # or at the checkpoint of the last receipt sent before (rc.verify holds it)
                e_before, before = before, e
                if enc is None:  # a checkpoint: stored as the node signed it, under the hash it stands for
                    enc = rc.canonical(e)
                    h = e["hash"]
                else:
                    h = rc.sha256_hex(enc)
                old = have.get((sid, e["seq"]))
                if old is not None:
                    if old == h:  # resent; or the checkpoint linking a continuation to what is stored
                        duplicates += not rc.is_checkpoint(e)
                        continue
                    stored_body = conn.execute(select(r.body).where(r.node_id == nid, r.session == sid,
                                                                    r.seq == e["seq"])).scalar()
                    new_flags.append(self._flag(nid, sid, e["seq"], EQUIVOCATION,
                                                "two different node-signed receipts for one session and seq",
                                                [json.loads(stored_body), e], now))
                    break  # the rest of this session's batch chains off the conflicting one
                if rc.is_checkpoint(e):
                    # stands for a receipt the hub never got (pruned on the node before upload)
                    rows.append(self._row(nid, e, h, "checkpoint", now, enc))
                    continue
                buyer = e.get("buyer")
                if buyer is None:
                    new_flags.append(self._flag(nid, sid, e["seq"], "uncosigned",
                                                "no buyer co-signature: stored for the chain, counts nothing",
                                                [e], now))
                elif not rc.acknowledged(e_before, buyer, self.tolerance / 100):
                    new_flags.append(self._flag(
                        nid, sid, e["seq"], "disagreement",
                        f"node had counted {e_before['up'] + e_before['down']} bytes at seq {e_before['seq']}, "
                        f"buyer then signed {buyer['up'] + buyer['down']} (beyond {self.tolerance:g}%)",
                        [e_before, e], now))
                rows.append(self._row(nid, e, h, "receipt", now, enc))
                touched[sid] = e
        if rows:
            # skips what another hub process stored meanwhile; a different receipt it stored is a fork
            stored, forked = db.insert_receipts(conn, rows)
            for sid, seq, stored_body in forked:  # (flags of what is not stored are not raised either)
                es = [e for e, _ in by_session[sid]]
                new_flags[:] = [f for f in new_flags if f["session"] != sid or f["seq"] < seq]
                new_flags.append(self._flag(nid, sid, seq, EQUIVOCATION,
                                            "two different node-signed receipts for one session and seq",
                                            [json.loads(stored_body), next(e for e in es if e["seq"] == seq)], now))
                kept = [e for e in es if e["seq"] < seq and not rc.is_checkpoint(e)]
                touched.pop(sid, None)
                if kept:
                    touched[sid] = kept[-1]
        for sid, e in touched.items():
            self._advance_session(conn, nid, sid, e, now)
        return stored, duplicates

    @staticmethod
    def _row(nid: str, e: dict, h: str, kind: str, now: float, enc: bytes) -> dict:
        b = e.get("buyer") or {}
        return {"node_id": nid, "session": e["session"], "seq": e["seq"], "hash": h, "kind": kind, "up": e["up"],
                "down": e["down"], "time": e["time"], "cosigned": bool(b), "buyer_up": b.get("up"),
                "buyer_down": b.get("down"), "body": enc.decode(), "stored_at": now}

    @staticmethod
    def _advance_session(conn, nid: str, sid: str, e: dict, now: float) -> None:
        """The session's newest figures (a session the hub sold: its row exists, its buyer_key is the
        buyer it was sold to, and stays so: settlement burns that buyer's tokens for the usage)."""
        s = db.sessions.c
        values = {"stored_seq": e["seq"], "up": e["up"], "down": e["down"], "updated_at": now}
        if e.get("buyer"):
            values.update(paid_up=e["buyer"]["up"], paid_down=e["buyer"]["down"])
        conn.execute(update(db.sessions).where(s.node_id == nid, s.session == sid, s.stored_seq < e["seq"])
                     .values(**values))

    @staticmethod
    def _flag(nid, sid, seq, kind, detail, evidence, now) -> dict:
        return {"node_id": nid, "session": sid, "seq": seq, "kind": kind, "detail": detail,
                "evidence": _dumps(evidence), "created": now}

    @staticmethod
    def _insert_flag(conn, f: dict) -> None:
        dialect = conn.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dinsert
        else:
            from sqlalchemy.dialects.sqlite import insert as dinsert
        conn.execute(dinsert(db.flags).on_conflict_do_nothing(index_elements=["node_id", "session", "seq", "kind"]),
                     [f])
