"""Read-only views of the hub's database, shared by the API listings and `idlewire hub nodes|...`."""

from __future__ import annotations

import json
import time

from sqlalchemy import func, select

from . import db
from .service import LIVE_AFTER


def nodes(engine, region: str | None = None, now: float | None = None) -> list[dict]:
    now = time.time() if now is None else now
    q = select(db.nodes).order_by(db.nodes.c.region, db.nodes.c.id)
    if region:
        q = q.where(db.nodes.c.region == region.upper())
    with db.read(engine) as conn:
        rows = conn.execute(q).mappings().all()
    return [{"id": r["id"], "node_key": r["node_key"], "region": r["region"], "location": r["location"],
             "price_per_gb": r["price_per_gb"], "caps": json.loads(r["caps"]), "endpoint": r["endpoint"],
             "reachable": bool(r["endpoint"]), "version": r["version"], "payout_address": r["payout_address"],
             "unit": r["unit"], "open_sessions": r["open_sessions"], "max_sessions": r["max_sessions"],
             "uptime": r["uptime"], "last_seen": r["last_seen"], "online": now - r["last_seen"] < LIVE_AFTER,
             "heartbeats": r["heartbeats"]} for r in rows]


def sessions(engine, node: str | None = None, state: str | None = None, limit: int = 100) -> list[dict]:
    s = db.sessions.c
    q = select(db.sessions).order_by(s.opened_at.desc()).limit(limit)
    if node:
        q = q.where(s.node_id == node)
    if state:
        q = q.where(s.state == state)
    with db.read(engine) as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def receipts(engine, node: str | None = None, session: str | None = None, limit: int = 100) -> list[dict]:
    r = db.receipts.c
    q = select(r.body).order_by(r.id).limit(limit)
    if node:
        q = q.where(r.node_id == node)
    if session:
        q = q.where(r.session == session)
    with db.read(engine) as conn:
        return [json.loads(b) for (b,) in conn.execute(q)]


def usage(engine) -> list[dict]:
    """Per node: sessions, node-counted bytes and the buyer-co-signed (verified) bytes, flags."""
    s, f = db.sessions.c, db.flags.c
    with db.read(engine) as conn:
        rows = conn.execute(select(s.node_id, func.count(), func.sum(s.up + s.down), func.sum(s.paid_up + s.paid_down))
                            .group_by(s.node_id).order_by(s.node_id)).all()
        nflags = dict(conn.execute(select(f.node_id, func.count()).where(f.kind != "uncosigned")
                                   .group_by(f.node_id)).all())
    return [{"node": n, "sessions": c, "node_bytes": int(nb or 0), "verified_bytes": int(vb or 0),
             "flags": nflags.get(n, 0)} for n, c, nb, vb in rows]


def flags(engine, node: str | None = None, kind: str | None = None, limit: int = 100) -> list[dict]:
    f = db.flags.c
    q = select(db.flags).order_by(f.id).limit(limit)
    if node:
        q = q.where(f.node_id == node)
    if kind:
        q = q.where(f.kind == kind)
    with db.read(engine) as conn:
        return [{**dict(r), "evidence": json.loads(r["evidence"])} for r in conn.execute(q).mappings()]
