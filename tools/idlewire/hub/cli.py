"""`idlewire hub serve|nodes|sessions|receipts|usage|flags`.

Imports of the web stack and SQLAlchemy happen inside the commands: `idlewire` starts without them.
"""

from __future__ import annotations

import json
import re
from typing import Annotated

from ..clikit import App, Opt
from ..errors import UserError

DEFAULT_LISTEN = "127.0.0.1:8750"
_DB_HELP = ("Database URL: sqlite:///PATH (default: $IDLEWIRE_HUB_DB or ~/.local/share/idlewire/hub.sqlite) "
            "or postgresql://USER@HOST/DB.")


def _listen(text: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([0-9A-Za-z.:-]+?)\]?:(\d{1,5})", text)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise UserError(f"--listen {text!r}: expected ADDRESS:PORT, e.g. {DEFAULT_LISTEN} or 0.0.0.0:8750")
    return m.group(1), int(m.group(2))


def _shown(url: str) -> str:
    """The database URL without its password, for messages."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_db(url: str | None, migrate: bool = True):
    from sqlalchemy.exc import SQLAlchemyError

    from . import db

    url = url or db.default_url()
    try:
        engine = db.make_engine(url)
        if migrate:
            db.migrate(engine)
    except (SQLAlchemyError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise UserError(f"--db {_shown(url)}: cannot open the hub database: {reason}") from None
    except ModuleNotFoundError as exc:
        raise UserError(f"--db {_shown(url)}: the driver {exc.name} is missing "
                        "(pip install 'psycopg[binary]')") from None
    return engine


def _fetch(hub: str, path: str):
    import urllib.error
    import urllib.request

    url = hub.rstrip("/") + path
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 (an http(s) URL the user gave)
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        raise UserError(f"{url}: HTTP {exc.code}: {exc.read()[:200].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UserError(f"--hub {hub}: cannot reach the hub: {getattr(exc, 'reason', exc)}") from None


def _rows(db_url, hub, path, query, **kw):
    if hub:
        from urllib.parse import urlencode

        args = {k: v for k, v in kw.items() if v is not None}
        return _fetch(hub, path + ("?" + urlencode(args) if args else ""))
    from . import queries

    return getattr(queries, query)(open_db(db_url), **kw)


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> None:
    if not rows:
        print("(none)")
        return
    text = [[str(r.get(k, "")) for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in text)) for i, (_, h) in enumerate(cols)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(cols, widths, strict=True)))
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)))


DbOpt = Annotated[str | None, Opt("--db", help=_DB_HELP)]
HubOpt = Annotated[str | None, Opt("--hub", help="Read from a running hub's API at this URL instead of --db.")]
JsonOpt = Annotated[bool, Opt("--json", help="Print JSON for scripts.")]


def register(app: App) -> None:
    group = App(help="The reference marketplace: nodes register, buyers are sent to them, receipts are verified.")
    app.add_group(group, "hub")

    @group.command()
    def serve(
        db: DbOpt = None,
        listen: Annotated[str, Opt("--listen", help=f"ADDRESS:PORT to serve HTTP on (default {DEFAULT_LISTEN}; "
                                   "put TLS in front for the internet).")] = DEFAULT_LISTEN,
        log_level: Annotated[str, Opt("--log-level", help="debug, info, warning or error.")] = "info",
        workers: Annotated[int, Opt("--workers", min=1, max=64, help="Processes serving the API (default 1). "
                                    "They share nothing but the database: one per core verifies receipts on "
                                    "every core.")] = 1,
        as_json: Annotated[bool, Opt("--json", help="Print one JSON line when serving starts (URL, schema, "
                                     "database without password), for scripts.")] = False,
    ):
        """Run the hub: migrate the database, then serve the API (schema at /openapi.json, docs at /docs).

        Several hub processes may serve one database (--workers here, or hubs on several machines
        behind a load balancer with PostgreSQL): they share nothing but the database.

        Example:  idlewire hub serve --db postgresql://hub@db.example/hub --listen 0.0.0.0:8750
        """
        import os

        if log_level not in ("debug", "info", "warning", "error"):
            raise UserError(f"--log-level {log_level!r}: expected debug, info, warning or error")
        host, port = _listen(listen)
        from . import db as hubdb

        url = db or hubdb.default_url()
        engine = open_db(url)
        import uvicorn

        from .app import create_app

        if as_json:
            base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
            print(json.dumps({"url": base, "openapi": base + "/openapi.json", "db": _shown(url),
                              "workers": workers}), flush=True)
        opts = {"host": host, "port": port, "log_level": log_level, "access_log": False, "timeout_keep_alive": 75}
        try:
            if workers == 1:
                uvicorn.run(create_app(engine), **opts)
            else:
                engine.dispose()
                os.environ["IDLEWIRE_HUB_DB"] = url
                uvicorn.run("idlewire.hub.app:from_env", factory=True, workers=workers, **opts)
        except OSError as exc:
            raise UserError(f"--listen {listen}: {exc.strerror}") from None

    @group.command()
    def nodes(db: DbOpt = None, hub: HubOpt = None, region: Annotated[str | None, Opt(
            "--region", help="Only this ISO country code.")] = None, as_json: JsonOpt = False):
        """List registered nodes: region, price, caps, sessions, whether they are online."""
        rows = _rows(db, hub, "/v1/nodes", "nodes", region=region)
        if as_json:
            print(json.dumps(rows, indent=1))
            return
        for r in rows:
            r["caps"] = "{}/{} Mbit/s".format(r["caps"].get("down_mbit"), r["caps"].get("up_mbit"))
            r["sessions"] = f"{r['open_sessions']}/{r['max_sessions']}"
            r["state"] = "online" if r["online"] else "offline"
        _table(rows, [("id", "NODE"), ("region", "CC"), ("price_per_gb", "PRICE/GB"), ("caps", "DOWN/UP"),
                      ("sessions", "SESSIONS"), ("state", "STATE"), ("endpoint", "ENDPOINT"), ("version", "VERSION")])

    @group.command()
    def sessions(db: DbOpt = None, hub: HubOpt = None, node: Annotated[str | None, Opt(
            "--node", help="Only this node id.")] = None, as_json: JsonOpt = False):
        """List sessions the hub knows: node, buyer, state, stored receipts, node and buyer-signed bytes."""
        rows = _rows(db, hub, "/v1/sessions", "sessions", node=node)
        if as_json:
            print(json.dumps(rows, indent=1))
            return
        for r in rows:
            r["bytes"] = r["up"] + r["down"]
            r["paid"] = r["paid_up"] + r["paid_down"]
        _table(rows, [("node_id", "NODE"), ("session", "SESSION"), ("state", "STATE"), ("stored_seq", "RECEIPTS"),
                      ("bytes", "NODE BYTES"), ("paid", "BUYER-SIGNED BYTES")])

    @group.command()
    def receipts(db: DbOpt = None, hub: HubOpt = None, session: Annotated[str | None, Opt(
            "--session", help="Only this session.")] = None, limit: Annotated[int, Opt(
            "--limit", min=1, max=10000, help="At most this many (oldest first).")] = 100, as_json: JsonOpt = False):
        """Print stored receipts (JSON lines, or a JSON array with --json: `idlewire receipts verify` reads both)."""
        rows = _rows(db, hub, "/v1/receipts", "receipts", session=session, limit=limit)
        if as_json:
            print(json.dumps(rows, indent=1))
        else:
            for r in rows:
                print(json.dumps(r, separators=(",", ":"), sort_keys=True))

    @group.command()
    def usage(db: DbOpt = None, hub: HubOpt = None, as_json: JsonOpt = False):
        """Usage per node: sessions, bytes the node counted, bytes buyers co-signed (verified), flags."""
        rows = _rows(db, hub, "/v1/usage", "usage")
        if as_json:
            print(json.dumps(rows, indent=1))
            return
        _table(rows, [("node", "NODE"), ("sessions", "SESSIONS"), ("node_bytes", "NODE BYTES"),
                      ("verified_bytes", "VERIFIED BYTES"), ("flags", "FLAGS")])

    @group.command()
    def flags(db: DbOpt = None, hub: HubOpt = None, kind: Annotated[str | None, Opt(
            "--kind", help="equivocation, disagreement or uncosigned.")] = None, as_json: JsonOpt = False):
        """Flags with their evidence: equivocation, node/buyer disagreement, receipts without a buyer co-signature."""
        rows = _rows(db, hub, "/v1/flags", "flags", kind=kind)
        if as_json:
            print(json.dumps(rows, indent=1))
            return
        _table(rows, [("node_id", "NODE"), ("session", "SESSION"), ("seq", "SEQ"), ("kind", "KIND"),
                      ("detail", "DETAIL")])
