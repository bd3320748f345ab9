"""Read-only views of the hub's database, shared by the API listings and `idlewire hub nodes|...`."""

from __future__ import annotations

import json
import time

from sqlalchemy import func, select

from . import db
from .service import CHANNEL_LIVE, LIVE_AFTER


def nodes(engine, region: str | None = None, now: float | None = None) -> list[dict]:
    now = time.time() if now is None else now
    q = select(db.nodes).order_by(db.nodes.c.region, db.nodes.c.id)
    if region:
        q = q.where(db.nodes.c.region == region.upper())
    with db.read(engine) as conn:
        rows = conn.execute(q).mappings().all()
    return [{"id": r["id"], "node_key": r["node_key"], "region": r["region"], "location": r["location"],
             "price_per_gb": r["price_per_gb"], "caps": json.loads(r["caps"]), "endpoint": r["endpoint"],
             "reachable": r["reachable"],
             "unreachable": r["unreachable"], "version": r["version"], "payout_address": r["payout_address"],
             "unit": r["unit"], "open_sessions": r["open_sessions"], "max_sessions": r["max_sessions"],
             "uptime": r["uptime"], "last_seen": r["last_seen"], "online": now - r["last_seen"] < LIVE_AFTER,
             "channel_open": now - r["channel_seen"] < CHANNEL_LIVE,
             "heartbeats": r["heartbeats"]} for r in rows]


def _filtered(engine, cols, table, order, limit: int, **where) -> list:
    """Rows of `cols`, oldest/newest by `order`, with column == value for each value given."""
    q = select(*cols).order_by(order).limit(limit)
    for name, value in where.items():
        if value:
            q = q.where(table.c[name] == value)
    with db.read(engine) as conn:
        return list(conn.execute(q).mappings())


def sessions(engine, node: str | None = None, state: str | None = None, limit: int = 100) -> list[dict]:
    t = db.sessions
    return [dict(r) for r in _filtered(engine, [t], t, t.c.opened_at.desc(), limit, node_id=node, state=state)]


def receipts(engine, node: str | None = None, session: str | None = None, limit: int = 100) -> list[dict]:
    t = db.receipts
    return [json.loads(r["body"]) for r in _filtered(engine, [t.c.body], t, t.c.id, limit, node_id=node,
                                                     session=session)]


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
    t = db.flags
    return [{**dict(r), "evidence": json.loads(r["evidence"])}
            for r in _filtered(engine, [t], t, t.c.id, limit, node_id=node, kind=kind)]
