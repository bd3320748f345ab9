"""The hub's database: tables (SQLAlchemy Core), engine set-up and Alembic migrations at start.

One schema for SQLite (the default, a file) and PostgreSQL. The tables are the hub's whole state:
nonces of signed requests (replay protection shared by every hub process), nodes, channel requests
(buyer → node, over the channel the node keeps open), sessions, receipts and flags.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path

from idlewire_agent import schema
from idlewire_agent.market import REACHABILITY_MAX
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.schema import CreateTable

metadata = MetaData()
ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite numbers rows only for INTEGER PRIMARY KEY

nonces = Table(
    "nonces", metadata,
    Column("key", String(64), nullable=False),
    Column("nonce", String(64), nullable=False),
    Column("expires", Float, nullable=False),
    PrimaryKeyConstraint("key", "nonce", name="nonces_pk"),
    Index("nonces_expires", "expires"),
)

nodes = Table(
    "nodes", metadata,
    Column("id", String(20), primary_key=True),  # hub's short id: sha256(node key) hex, first 20
    Column("node_key", String(64), nullable=False, unique=True),
    Column("wg_key", String(64), nullable=False),
    Column("payout", Text, nullable=False),  # the node-signed payout statement, JSON
    Column("payout_address", String(128), nullable=False),
    Column("unit", String(64), nullable=False, default=""),
    Column("region", String(2), nullable=False),
    Column("location", String(64), nullable=False, default=""),
    Column("caps", Text, nullable=False),  # JSON: the caps in force (agent config.UNIT_CAPS)
    Column("max_sessions", Integer, nullable=False),
    Column("price_per_gb", Float, nullable=False),
    Column("endpoint", String(300), nullable=False),  # host:port buyers reach WireGuard at, "" = none
    # reachable from the internet: the node reported an endpoint; else why not and the fix, as the node
    # said it (revision 0003). pick() offers only reachable nodes.
    Column("reachable", Boolean, nullable=False),
    Column("unreachable", String(REACHABILITY_MAX), nullable=False),
    Column("version", String(64), nullable=False),
    Column("registered_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("channel_seen", Float, nullable=False, default=0),  # the node last polled its channel
    Column("uptime", Float, nullable=False, default=0),
    Column("open_sessions", Integer, nullable=False, default=0),
    Column("heartbeats", Integer, nullable=False, default=0),
    Index("nodes_region", "region", "last_seen"),
)

requests = Table(
    "requests", metadata,
    Column("id", String(32), primary_key=True),
    Column("node_id", String(20), nullable=False),
    Column("kind", String(16), nullable=False),  # "open"
    Column("buyer_key", String(64), nullable=False),
    Column("body", Text, nullable=False),  # JSON sent to the node
    Column("state", String(12), nullable=False),  # queued, delivered, answered, failed, expired
    Column("created", Float, nullable=False),
    Column("delivered_at", Float),
    Column("answered_at", Float),
    Column("result", Text),  # JSON from the node
    Index("requests_node_state", "node_id", "state"),
    Index("requests_state", "state"),
)

sessions = Table(
    "sessions", metadata,
    Column("node_id", String(20), nullable=False),
    Column("session", String(64), nullable=False),
    Column("buyer_key", String(64), nullable=False, default=""),
    Column("request_id", String(32)),
    Column("state", String(12), nullable=False),  # open, closed
    Column("opened_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("head", String(64), nullable=False, default=""),  # newest receipt hash the node reported
    Column("stored_seq", Integer, nullable=False, default=0),  # newest receipt seq stored here
    Column("up", BigInteger, nullable=False, default=0),  # node's count in the newest receipt
    Column("down", BigInteger, nullable=False, default=0),
    Column("paid_up", BigInteger, nullable=False, default=0),  # buyer-co-signed figures
    Column("paid_down", BigInteger, nullable=False, default=0),
    PrimaryKeyConstraint("node_id", "session", name="sessions_pk"),
)

receipts = Table(
    "receipts", metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("node_id", String(20), nullable=False),
    Column("session", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("kind", String(12), nullable=False),  # receipt, checkpoint
    Column("up", BigInteger, nullable=False),
    Column("down", BigInteger, nullable=False),
    Column("time", BigInteger, nullable=False),
    Column("cosigned", Boolean, nullable=False),
    Column("buyer_up", BigInteger),
    Column("buyer_down", BigInteger),
    Column("body", Text, nullable=False),
    Column("stored_at", Float, nullable=False),
    UniqueConstraint("node_id", "session", "seq", name="receipts_session_seq"),
    Index("receipts_stored_at", "stored_at"),  # settlement reads an epoch's receipts by the hub's clock
)

flags = Table(
    "flags", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node_id", String(20), nullable=False),
    Column("session", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("kind", String(24), nullable=False),  # equivocation, forged_usage, disagreement, uncosigned
    Column("detail", Text, nullable=False),
    Column("evidence", Text, nullable=False),  # JSON: the receipts that show it
    Column("created", Float, nullable=False),
    UniqueConstraint("node_id", "session", "seq", "kind", name="flags_once"),
)

# --- the economy (revision 0002) ------------------------------------------------------------------
AMOUNT = BigInteger  # token base units; the issuer account `mint` holds minus the supply

econ_meta = Table(  # one row: what the economy was started with; its row lock serialises ledger writers
    "econ_meta", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("network", String(128), nullable=False),
    Column("rules_digest", String(64), nullable=False),
    Column("hub_key", String(64), nullable=False),  # base64 ed25519 public key that signs the statements
    Column("genesis_at", Float, nullable=False),  # epoch 0 starts here (unix time)
    Column("epoch_seconds", Integer, nullable=False),
)

econ_accounts = Table(
    "econ_accounts", metadata,
    Column("account", String(200), primary_key=True),
    Column("balance", AMOUNT, nullable=False),
)

econ_entries = Table(  # the journal: every movement once, from one account to another
    "econ_entries", metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("epoch", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # genesis, mint, burn, bond, unbond, release, slash, transfer
    Column("src", String(200), nullable=False),
    Column("dst", String(200), nullable=False),
    Column("amount", AMOUNT, nullable=False),
    Column("ref", Text, nullable=False),
    Column("at", Float, nullable=False),
    Index("econ_entries_epoch", "epoch"),
)

econ_epochs = Table(
    "econ_epochs", metadata,
    Column("epoch", Integer, primary_key=True, autoincrement=False),  # settled once: the key says so
    Column("hash", String(64), nullable=False, unique=True),
    Column("prev", String(64), nullable=False),
    Column("statement", Text, nullable=False),  # the signed statement, JSON
    Column("start", Float, nullable=False),
    Column("end", Float, nullable=False),
    Column("settled_at", Float, nullable=False),
)

econ_rewards = Table(  # every node the epoch saw: its reward (0 with why_not) and the figures behind it
    "econ_rewards", metadata,
    Column("epoch", Integer, nullable=False),
    Column("node_id", String(20), nullable=False),
    Column("region", String(2), nullable=False),
    Column("payout", String(128), nullable=False),
    Column("reward", AMOUNT, nullable=False),
    Column("verified_bytes", AMOUNT, nullable=False),
    Column("uptime_ppm", Integer, nullable=False),
    Column("reputation_ppm", Integer, nullable=False),
    Column("multiplier_ppm", Integer, nullable=False),
    Column("stake", AMOUNT, nullable=False),
    Column("why_not", String(200), nullable=False),
    PrimaryKeyConstraint("epoch", "node_id", name="econ_rewards_pk"),
    Index("econ_rewards_node", "node_id", "epoch"),
)

econ_multipliers = Table(
    "econ_multipliers", metadata,
    Column("epoch", Integer, nullable=False),
    Column("region", String(2), nullable=False),
    Column("multiplier_ppm", Integer, nullable=False),
    PrimaryKeyConstraint("epoch", "region", name="econ_multipliers_pk"),
)

econ_slashes = Table(
    "econ_slashes", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("epoch", Integer, nullable=False),
    Column("node_id", String(20), nullable=False),
    Column("kind", String(24), nullable=False),  # equivocation, forged_usage, inflated_usage, failed_probes
    Column("amount", AMOUNT, nullable=False),
    Column("evidence", Text, nullable=False),  # JSON: {"ids": [...], "records": [the receipts / probes]}
    Index("econ_slashes_node", "node_id"),
)

econ_reputation = Table(
    "econ_reputation", metadata,
    Column("node_id", String(20), primary_key=True),
    Column("reputation_ppm", Integer, nullable=False),
)

econ_unbonding = Table(
    "econ_unbonding", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node_id", String(20), nullable=False),
    Column("amount", AMOUNT, nullable=False),
    Column("release_epoch", Integer, nullable=False),
    Column("to_account", String(200), nullable=False),
)

econ_heartbeats = Table(  # nodes.heartbeats as the last settlement counted it
    "econ_heartbeats", metadata,
    Column("node_id", String(20), primary_key=True),
    Column("counted", BigInteger, nullable=False),
)

probes = Table(
    "probes", metadata,
    Column("id", String(32), primary_key=True),
    Column("node_id", String(20), nullable=False),
    Column("at", Float, nullable=False),
    Column("reached", Boolean, nullable=False),
    Column("mbit", Integer, nullable=False),
    Column("advertised_mbit", Integer, nullable=False),
    Column("latency_ms", Integer, nullable=False),
    Column("detail", Text, nullable=False),
    Index("probes_at", "at"),
)

unserved = Table(  # buyer requests for a region the hub could place with no node: demand for the multiplier
    "unserved", metadata,
    Column("region", String(2), primary_key=True),
    Column("buyer_key", String(64), primary_key=True),
    Column("minute", BigInteger, primary_key=True, autoincrement=False),  # one row a minute per buyer and region
    Column("at", Float, nullable=False),
    Index("unserved_at", "at"),
)

MIGRATIONS = Path(__file__).parent / "migrations"


def default_url() -> str:
    """$IDLEWIRE_HUB_DB, else a SQLite file under $XDG_DATA_HOME/idlewire (~/.local/share)."""
    if env := os.environ.get("IDLEWIRE_HUB_DB"):
        return env
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{base / 'idlewire' / 'hub.sqlite'}"


def normalize_url(url: str) -> str:
    """postgresql:// and postgres:// use psycopg (3); a bare path is a SQLite file."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    if "://" not in url:
        return f"sqlite:///{Path(url).resolve()}"
    return url


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


class WriterLock:
    """One SQLite writer at a time, queued on a lock that wakes the next one the moment it is free:
    a thread lock within the process, flock(2) on "DB-writer.lock" between hub processes. (SQLite's
    own busy handler makes a blocked writer sleep, up to 100 ms a try, while the database is free
    again long before: that, not the work, made heartbeats wait seconds under load.)"""

    def __init__(self, db_path: str | None):
        self.thread = threading.Lock()
        self.path = f"{db_path}-writer.lock" if db_path else None
        self.fd: int | None = None

    def __enter__(self):
        self.thread.acquire()
        try:
            if self.path:
                if self.fd is None:
                    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self.thread.release()
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self.fd is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.thread.release()


def make_engine(url: str) -> Engine:
    try:  # a control or invisible character would end up in a file's name or a server's log
        schema.text(url)
    except schema.Invalid as e:
        raise ArgumentError(f"the database URL may hold {e}") from None
    url = normalize_url(url)
    parsed = make_url(url)  # (ArgumentError, one line, for what is no URL)
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ArgumentError(f"{parsed.get_backend_name()}: the hub keeps its state in SQLite (a file) or PostgreSQL")
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() != "psycopg":
        # (insert_receipts speaks psycopg's COPY)
        raise ArgumentError(f"postgresql+{parsed.get_driver_name()}: the hub speaks to PostgreSQL through psycopg (3): "
                            "postgresql://USER@HOST/DB")
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False,
                                                  "isolation_level": None}, pool_size=20, max_overflow=20)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            if getattr(engine, "checkpointer", None):
                cur.execute("PRAGMA wal_autocheckpoint=0")  # checkpoint_in_background() does it
            cur.close()

        # pysqlite's own BEGIN is deferred: a reader that later writes fails at once with "database
        # is locked" instead of waiting. Writers say so and take the write lock up front.
        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")

        engine.write_lock = WriterLock(path if path and path != ":memory:" else None)
        return engine
    # Per hub process; the heartbeats of a process share one transaction at a time (app.Batcher),
    # so a few connections serve it, and 8 processes stay within PostgreSQL's default 100.
    engine = create_engine(url, pool_size=6, max_overflow=6, pool_pre_ping=True)
    engine.write_lock = contextlib.nullcontext()
    return engine


def checkpoint_in_background(engine: Engine, every: float = 1.0) -> None:
    """SQLite: copy the WAL into the database from a thread of its own (PRAGMA wal_checkpoint
    (PASSIVE): it waits for no one and no writer waits for it) instead of in the commit that
    crosses 1000 pages, which holds the write lock through the checkpoint's fsync and stalled
    every heartbeat behind it."""
    if not is_sqlite(engine) or getattr(engine, "checkpointer", None):
        return

    def run():
        while True:
            time.sleep(every)
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            except Exception:  # noqa: S110 (busy or away for a moment: the next tick tries again)
                pass

    engine.checkpointer = threading.Thread(target=run, name="hub-wal-checkpoint", daemon=True)
    engine.pool.dispose()  # connections opened from now on leave checkpoints to the thread
    engine.checkpointer.start()


@contextlib.contextmanager
def write(engine: Engine):
    """A write transaction (SQLite: BEGIN IMMEDIATE, so concurrent writers queue instead of failing)."""
    with engine.write_lock, engine.connect().execution_options(write=True) as conn, conn.begin():
        yield conn


@contextlib.contextmanager
def read(engine: Engine):
    with engine.connect() as conn, conn.begin():
        yield conn


def insert_ignore(conn, table):
    """INSERT … ON CONFLICT DO NOTHING in the connection's dialect (PostgreSQL or SQLite)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dinsert
    else:
        from sqlalchemy.dialects.sqlite import insert as dinsert
    return dinsert(table).on_conflict_do_nothing()


# PostgreSQL: a batch of receipts goes in with COPY into a staging table of the session's own (emptied
# at each commit), then one INSERT … SELECT … ON CONFLICT DO NOTHING into receipts. A batch of 1000 cost
# 1000 INSERTs through psycopg's pipelined executemany plus a SELECT count(*) … hash IN (1000 literals)
# to learn how many were new; COPY and one INSERT take a fifth of the hub's CPU and less of the
# server's, and the INSERT's row count is the number stored (a row another hub process stored
# meanwhile is skipped, as before). The staging table has receipts' columns (not its id, nor its
# constraints: the INSERT into receipts checks them), built from the table above: one owner.
_RECEIPT_COLUMNS = [c.name for c in receipts.columns if c.name != "id"]
receipts_in = Table("receipts_in", MetaData(), *(Column(c, receipts.c[c].type) for c in _RECEIPT_COLUMNS),
                    prefixes=["TEMPORARY"], postgresql_on_commit="DELETE ROWS")
_PG = postgresql.dialect()
_PG_STAGE = str(CreateTable(receipts_in, if_not_exists=True).compile(dialect=_PG)).strip()
_PG_COPY = "COPY receipts_in ({}) FROM STDIN".format(", ".join(map(_PG.identifier_preparer.quote, _RECEIPT_COLUMNS)))
_PG_MOVE = str(postgresql.insert(receipts).from_select(  # ids in chain order, as one INSERT a row gave them
    _RECEIPT_COLUMNS, select(*receipts_in.c).order_by(receipts_in.c.session, receipts_in.c.seq))
               .on_conflict_do_nothing(index_elements=["node_id", "session", "seq"]).compile(dialect=_PG))
# Rows of the batch that another hub process stored meanwhile with another hash (a node sending two
# chains for one session to two hub processes at once): asked only when the INSERT skipped rows.
_r, _i = receipts.alias("r"), receipts_in
_PG_FORKED = str(select(_i.c.session, _i.c.seq, _r.c.body).join_from(_i, _r, and_(
    _r.c.node_id == _i.c.node_id, _r.c.session == _i.c.session, _r.c.seq == _i.c.seq))
    .where(_r.c.hash != _i.c.hash).order_by(_i.c.session, _i.c.seq).compile(dialect=_PG))
# …and this batch's rows of such a session after the fork, which chain off the other receipt: not stored
# (as Hub._store stores none after a fork it sees before inserting)
_PG_UNSTORE = str(delete(receipts).where(
    receipts.c.node_id == bindparam("nid"), receipts.c.session == bindparam("sid"), receipts.c.seq > bindparam("seq"),
    receipts.c.hash.in_(select(_i.c.hash).where(_i.c.session == bindparam("sid"), _i.c.seq > bindparam("seq"))))
    .compile(dialect=_PG))


def insert_receipts(conn, rows: list[dict]) -> tuple[int, list[tuple[str, int, str]]]:
    """Insert receipt rows (dicts of receipts' columns but id), skipping a (node, session, seq) stored
    before or by another hub process meanwhile, in the connection's transaction. Returns how many
    were new, and (session, seq, stored body) of the first row of a session skipped because another
    hub process had just stored a different receipt there: a fork, after which this batch's rows of
    that session are not stored. (The caller read what was stored before, in this transaction; on
    PostgreSQL, under READ COMMITTED, a concurrent transaction's rows are not in that read; SQLite's
    writers take turns (BEGIN IMMEDIATE), so there is no such row.)"""
    if not rows:
        return 0, []
    if conn.dialect.name != "postgresql":
        conn.execute(insert_ignore(conn, receipts), rows)  # (node_id, session, seq) is its one unique key
        r = receipts.c
        return int(conn.execute(select(func.count()).where(
            r.node_id == rows[0]["node_id"], r.stored_at == rows[0]["stored_at"],
            r.hash.in_([x["hash"] for x in rows]))).scalar()), []
    # the driver's own cursor, in the transaction SQLAlchemy began on this connection
    with conn.connection.driver_connection.cursor() as cur:
        # every time (a catalog look-up when it exists): a connection handed out by a transaction-
        # pooling proxy, or one whose creating transaction rolled back, may not have it yet
        cur.execute(_PG_STAGE)
        with cur.copy(_PG_COPY) as cp:
            for row in rows:
                cp.write_row([row[c] for c in _RECEIPT_COLUMNS])
        cur.execute(_PG_MOVE)
        new = cur.rowcount
        if new == len(rows):
            return new, []
        # the INSERT waited for the other transaction's commit before skipping its rows: they are in
        # this statement's snapshot
        cur.execute(_PG_FORKED)
        forks = {}
        for sid, seq, body in cur.fetchall():
            forks.setdefault(sid, (sid, seq, body))
        for sid, seq, _ in forks.values():
            cur.execute(_PG_UNSTORE, {"nid": rows[0]["node_id"], "sid": sid, "seq": seq})
            new -= cur.rowcount
        return new, list(forks.values())


def cannot_store(engine: Engine) -> str | None:
    """Why this database role could not store receipt batches, or None: on PostgreSQL they are staged
    in a temporary table (insert_receipts), which a database that revoked TEMPORARY from PUBLIC (some
    hardening guides do) refuses at every upload."""
    if is_sqlite(engine):
        return None
    with engine.connect() as conn:
        db_name, role, ok = conn.execute(text(
            "SELECT current_database(), current_user, has_database_privilege(current_database(), 'TEMPORARY')")).one()
    if ok:
        return None
    return (f"role {role} may not create temporary tables in database {db_name} (the hub stages each receipt batch "
            f"in one): GRANT TEMPORARY ON DATABASE \"{db_name}\" TO \"{role}\"")


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (several hub processes may start at once:
    on PostgreSQL an advisory lock makes them take turns)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.connect() as conn:
        if not is_sqlite(engine):
            conn.execute(text("SELECT pg_advisory_lock(7815001)"))
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
        finally:
            if not is_sqlite(engine):
                conn.execute(text("SELECT pg_advisory_unlock(7815001)"))
                conn.commit()
