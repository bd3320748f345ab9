"""`idlewire hub serve|nodes|sessions|receipts|usage|flags`, and the economy: `settle|stake|unbond|fund|
earnings|epochs|statement|simulate`.

Imports of the web stack and SQLAlchemy happen inside the commands: `idlewire` starts without them.
"""

from __future__ import annotations

import json
import re
from typing import Annotated

from ..clikit import App, Arg, Opt
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


def _economy(rules, key, prices):
    """The hub's economy config; each option falls back to $IDLEWIRE_HUB_RULES/_KEY/_PRICES."""
    import os

    from .economy import EconomyError, load

    try:
        return load(rules or os.environ.get("IDLEWIRE_HUB_RULES") or None,
                    key or os.environ.get("IDLEWIRE_HUB_KEY") or None,
                    prices or os.environ.get("IDLEWIRE_HUB_PRICES") or None)
    except EconomyError as exc:
        raise UserError(str(exc)) from None


def _refused(fn, *args, **kw):
    from .economy import EconomyError

    try:
        return fn(*args, **kw)
    except EconomyError as exc:
        raise UserError(str(exc)) from None


RulesOpt = Annotated[str | None, Opt("--rules", help="The network's rules file (.toml/.yml/.json; default "
                                     "$IDLEWIRE_HUB_RULES, else the reference rules: `idlewire economy rules`). "
                                     "Genesis allocation and epoch length come from it; every hub process of "
                                     "one economy must use the same.")]
KeyOpt = Annotated[str | None, Opt("--key", help="The hub's statement signing key file (default $IDLEWIRE_HUB_KEY, "
                                   "else ~/.local/share/idlewire/hub-statement.key; made 0600 on first use).")]
PricesOpt = Annotated[str | None, Opt("--prices", help="Oracle price file, lines 'EPOCH,PRICE_USD' (default "
                                      "$IDLEWIRE_HUB_PRICES, else ~/.local/share/idlewire/prices.csv).")]
NodeArg = Annotated[str, Arg(help="The node: its hub id (idlewire hub nodes) or node key.")]
AmountArg = Annotated[str, Arg(help="Tokens, e.g. 1000 or 0.5.")]
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
        settle_every: Annotated[float, Opt("--settle-every", min=0, max=86400, help="Settle every ended epoch "
                                           "this often, in seconds (0: never; settle with `idlewire hub "
                                           "settle`). Any number of hub processes may: each epoch is "
                                           "settled once.")] = 300,
        rules: RulesOpt = None, key: KeyOpt = None, prices: PricesOpt = None,
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
        if why := hubdb.cannot_store(engine):
            raise UserError(f"--db {_shown(url)}: {why}")
        if settle_every:
            try:
                _economy(rules, key, prices)  # refuse a bad config now, not in the schedule's log
            except UserError as exc:
                if rules or prices or any(os.environ.get(f"IDLEWIRE_HUB_{n}") for n in ("RULES", "PRICES")):
                    raise
                import sys

                print(f"warning: settlement schedule off: {exc}", file=sys.stderr)
                settle_every = 0
        if settle_every:
            for name, value in (("RULES", rules), ("KEY", key), ("PRICES", prices)):
                if value:
                    os.environ[f"IDLEWIRE_HUB_{name}"] = str(value)
            os.environ["IDLEWIRE_HUB_SETTLE_EVERY"] = str(settle_every)
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
        """List registered nodes: region, price, caps, sessions, whether they are online and reachable
        from the internet (a node that is not says why and the fix; the hub offers it to no buyer)."""
        rows = _rows(db, hub, "/v1/nodes", "nodes", region=region)
        if as_json:
            print(json.dumps(rows, indent=1))
            return
        for r in rows:
            r["caps"] = "{}/{} Mbit/s".format(r["caps"].get("down_mbit"), r["caps"].get("up_mbit"))
            r["sessions"] = f"{r['open_sessions']}/{r['max_sessions']}"
            r["state"] = "online" if r["online"] else "offline"
            r["endpoint"] = r["endpoint"] if r["reachable"] else "unreachable (below)"
        _table(rows, [("id", "NODE"), ("region", "CC"), ("price_per_gb", "PRICE/GB"), ("caps", "DOWN/UP"),
                      ("sessions", "SESSIONS"), ("state", "STATE"), ("endpoint", "ENDPOINT"), ("version", "VERSION")])
        for r in rows:
            if not r["reachable"]:
                print(f"{r['id']}: {r.get('unreachable') or 'not reachable from the internet'}")

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
            "--kind", help="equivocation, forged_usage, disagreement or uncosigned.")] = None,
              as_json: JsonOpt = False):
        """Flags with their evidence: equivocation, forged usage, node/buyer disagreement, receipts without a buyer
        co-signature."""
        rows = _rows(db, hub, "/v1/flags", "flags", kind=kind)
        if as_json:
            print(json.dumps(rows, indent=1))
            return
        _table(rows, [("node_id", "NODE"), ("session", "SESSION"), ("seq", "SEQ"), ("kind", "KIND"),
                      ("detail", "DETAIL")])

    # --- the economy -------------------------------------------------------------------------------
    @group.command()
    def settle(db: DbOpt = None, epoch: Annotated[int | None, Opt("--epoch", min=0, help="The epoch to settle "
               "(default: the next unsettled one). One settled already is shown, not settled again.")] = None,
               rules: RulesOpt = None, key: KeyOpt = None, prices: PricesOpt = None, as_json: JsonOpt = False):
        """Settle an ended epoch from the receipts, heartbeats, probes and flags stored here.

        Burn-and-mint through the same code as `idlewire economy simulate`: verified bytes per node,
        slashes with evidence (equivocation the hub flagged), burns from buyers' balances at the
        oracle price, regional multipliers, reputation, the mint split by verified GB x multiplier x
        reputation x uptime among staked nodes, a signed statement with a Merkle root over the
        rewards. The first economy command on a database makes the genesis allocation of the rules.

        Example:  idlewire hub settle --db postgresql://hub@db/hub --rules network.toml
        """
        from . import economy

        eco = _economy(rules, key, prices)
        s = _refused(economy.settle_epoch, open_db(db), eco, epoch)
        st = s.statement
        if as_json:
            print(json.dumps({"epoch": s.epoch, "hash": s.hash, "already": s.already, "statement": st}))
            return
        d = eco.rules.market.decimals
        word = "was settled already" if s.already else "settled"
        print(f"epoch {s.epoch} {word}: statement {s.hash}")
        print(f"  minted {economy.tokens(st['minted'], d)} of {economy.tokens(st['emission'] + st['carried_in'], d)}"
              f" to {st['rewarded']} nodes, burned {economy.tokens(st['burned'], d)}, slashed "
              f"{economy.tokens(st['slashed'], d)} ({len(st['slashes'])} slashes), supply "
              f"{economy.tokens(st['supply'], d)}; merkle root {st['merkle_root'][:16]}…")

    def _amount_cmd(fn, node, amount, db, rules, key, prices, as_json, **kw):
        from . import economy

        eco = _economy(rules, key, prices)
        units = _refused(economy.parse_amount, amount, eco.rules.market.decimals)
        out = _refused(fn, open_db(db), eco, node, units, **kw)
        if as_json:
            print(json.dumps(out))
        else:
            d = eco.rules.market.decimals
            print(", ".join(f"{k} {economy.tokens(v, d) if isinstance(v, int) and k != 'release_epoch' else v}"
                            for k, v in out.items()))

    @group.command()
    def stake(node: NodeArg, amount: AmountArg, db: DbOpt = None, src: Annotated[str | None, Opt(
              "--from", help="Account the stake comes from (default payout:ADDRESS of the node's payout "
              "statement).")] = None, rules: RulesOpt = None, key: KeyOpt = None, prices: PricesOpt = None,
              as_json: JsonOpt = False):
        """Bond stake for a node: it earns only with at least the rules' min_stake bonded.

        Example:  idlewire hub stake 3f2a9c0d1e2b3c4d5e6f 1000 --from treasury
        """
        from . import economy

        _amount_cmd(economy.stake, node, amount, db, rules, key, prices, as_json, src=src)

    @group.command()
    def unbond(node: NodeArg, amount: AmountArg, db: DbOpt = None, rules: RulesOpt = None, key: KeyOpt = None,
               prices: PricesOpt = None, as_json: JsonOpt = False):
        """Start unbonding stake: it returns to the node's payout account after the rules' unbonding_epochs,
        and can be slashed until then.

        Example:  idlewire hub unbond 3f2a9c0d1e2b3c4d5e6f 500
        """
        from . import economy

        _amount_cmd(economy.unbond, node, amount, db, rules, key, prices, as_json)

    @group.command()
    def fund(account: Annotated[str, Arg(help="Account to credit, e.g. buyer:BUYER_KEY or payout:ADDRESS.")],
             amount: AmountArg, src: Annotated[str, Opt("--from", help="Account to debit (a genesis account "
             "such as market or treasury).")] = "market", db: DbOpt = None, rules: RulesOpt = None,
             key: KeyOpt = None, prices: PricesOpt = None, as_json: JsonOpt = False):
        """Move tokens between plain accounts, e.g. a buyer's balance that its usage burns.

        Example:  idlewire hub fund buyer:q1Wc…= 500 --from market
        """
        from . import economy

        _amount_cmd(economy.fund, account, amount, db, rules, key, prices, as_json, src=src)

    @group.command()
    def earnings(node: Annotated[str | None, Arg(help="A node (id or key): its every epoch; without it every "
                                 "node's last epoch.")] = None, db: DbOpt = None,
                 epoch: Annotated[int | None, Opt("--epoch", min=0, help="Only this epoch.")] = None,
                 as_json: JsonOpt = False):
        """What nodes earned: reward, verified bytes, uptime, reputation, regional multiplier, stake, and
        why a node earned nothing (fractions as percent; ppm and base units in --json)."""
        from . import economy

        rows = _refused(economy.earnings, open_db(db), node, epoch)
        if as_json:
            print(json.dumps(rows, indent=1))
            return
        for r in rows:
            r["reward_t"] = economy.tokens(r["reward"], 6)
            r["gb"] = f"{r['verified_bytes'] / 1e9:.3f}"
            for k in ("uptime_ppm", "reputation_ppm"):
                r[k[:-4]] = f"{r[k] / 1e4:.1f}%"
            r["mult"] = f"{r['multiplier_ppm'] / 1e6:.2f}x"
            r["stake_t"] = economy.tokens(r["stake"], 6)
        _table(rows, [("epoch", "EPOCH"), ("node_id", "NODE"), ("region", "CC"), ("reward_t", "REWARD"),
                      ("gb", "VERIFIED GB"), ("uptime", "UPTIME"), ("reputation", "REPUTATION"), ("mult", "MULT"),
                      ("stake_t", "STAKE"), ("why_not", "WHY NOTHING")])

    @group.command()
    def epochs(db: DbOpt = None, as_json: JsonOpt = False):
        """Settled epochs, newest first: minted, burned, slashed, supply, statement hash."""
        from . import economy

        rows = economy.epochs(open_db(db))
        if as_json:
            print(json.dumps(rows, indent=1))
            return
        for r in rows:
            for k in ("minted", "burned", "slashed", "supply"):
                r[k] = economy.tokens(r[k], 6)
        _table(rows, [("epoch", "EPOCH"), ("minted", "MINTED"), ("burned", "BURNED"), ("slashed", "SLASHED"),
                      ("supply", "SUPPLY"), ("rewarded", "NODES PAID"), ("hash", "STATEMENT")])

    @group.command()
    def statement(epoch: Annotated[int | None, Arg(help="Epoch (default: the last settled).")] = None,
                  db: DbOpt = None, as_json: JsonOpt = False):
        """Print an epoch's signed statement (indented JSON; --json: one line, for scripts): what a node
        checks its reward's Merkle proof against."""
        from . import economy

        st = economy.statement(open_db(db), epoch)
        if st is None:
            raise UserError(f"epoch {epoch}: not settled (idlewire hub epochs)" if epoch is not None
                            else "no epoch settled yet (idlewire hub settle)")
        print(json.dumps(st, sort_keys=True) if as_json else json.dumps(st, indent=1, sort_keys=True))

    @group.command()
    def probe(nodes: Annotated[list[str] | None, Opt("--node", help="A node id to probe (repeatable; default: "
                                                     "every node online).")] = None,
              hub: Annotated[str, Opt("--hub", help="The hub's URL the prober buys through, e.g. "
                                      "http://127.0.0.1:8750.")] = "http://127.0.0.1:8750",
              target: Annotated[str, Opt("--target", help="An http:// URL, reached through the node's tunnel, "
                                         "that serves more than the node can send in --seconds (its host is "
                                         "routed into the tunnel).")] = "",
              seconds: Annotated[float, Opt("--seconds", min=1, max=300, help="Seconds of throughput per "
                                            "probe.")] = 5.0,
              interface: Annotated[str, Opt("--interface", help="WireGuard interface to create.")] = "iwprobe0",
              db: DbOpt = None, rules: RulesOpt = None, key: KeyOpt = None, prices: PricesOpt = None,
              as_json: JsonOpt = False):
        """Probe nodes as a buyer: a short session each, throughput and latency against the advertised cap.

        Results are stored for settlement: a failed probe (below probes.pass_throughput_ppm of the cap,
        over probes.max_latency_ms, or not reached) lowers the node's uptime and reputation; at
        probes.slash_after_failures failures in an epoch the node is slashed with the probe ids and
        measurements as evidence. Run it on a schedule (cron, a systemd timer). Needs root.

        Example:  sudo idlewire hub probe --hub http://127.0.0.1:8750 --target http://198.51.100.5/100M
        """
        from urllib.parse import urlsplit

        from . import prober, queries

        if urlsplit(target).scheme not in ("http", "https") or not urlsplit(target).hostname:
            raise UserError(f"--target: expected an http(s):// URL to read through the tunnel, got {target!r}")
        eco = _economy(rules, key, prices)
        engine = open_db(db)
        listed = [n for n in queries.nodes(engine) if (n["id"] in nodes if nodes else n["online"])]
        if nodes and len(listed) != len(set(nodes)):
            missing = sorted(set(nodes) - {n["id"] for n in listed})
            raise UserError(f"node {missing[0]}: not registered here (see `idlewire hub nodes`)")
        out = []
        for n in listed:
            row = _refused(prober.probe, engine, eco, hub, n, target, seconds, interface)
            out.append(row)
            if not as_json:
                print(f"{n['id']}: {'reached' if row['reached'] else 'NOT reached'}, {row['mbit']} of "
                      f"{row['advertised_mbit']} Mbit/s, {row['latency_ms']} ms — {row['detail']}", flush=True)
        if as_json:
            print(json.dumps(out, indent=1))

    from ..cmd_economy import simulate_command

    group.command("simulate")(simulate_command)
