"""The metering ledger: SQLite in WAL mode, one transaction per poll cycle.

Crash safety rests on one rule: the last raw WireGuard counter seen for a peer (`peers.rx_raw`,
`peers.tx_raw`) is written in the SAME transaction as the totals it was added to. After a kill -9
the agent resumes from the last committed pair (raw, totals), so a byte is either in both or in
neither: nothing is counted twice, and what is lost is at most the uncommitted poll cycle (and
even that is picked up at the next poll, as long as the interface's counters survived).

Tables: sessions (one row per buyer session, with its totals), peers (raw counter baselines),
daily (totals per UTC day), meta (lifetime totals, interface index, schema), receipts, nonces
(of signed API requests, so that a replay is refused across restarts too), uploads (receipts not
yet acknowledged by the marketplace hub: see "Receipts for the hub" below).

State checks (at every start, before anything is written): the file is a SQLite database that
passes `PRAGMA quick_check`, of a schema this agent knows, and it is THE ledger this node kept: a
marker next to it (`ledger.id`, written when the ledger is created) holds the id stored in its meta
table, so a ledger deleted, truncated to zero bytes or swapped for another one is refused instead
of silently replaced by an empty one. Every failure is a LedgerError: one line naming the file and
the way out (restore from a backup, or `idlewire-agent ledger reset`, which moves the damaged files
aside and never deletes them).

A full disk mid-run: the poll's transaction rolls back as a whole, so the raw baselines stay where
the totals are; the bytes wait in the WireGuard counters and the next poll that can commit counts
them (the agent retries every poll and logs one line when it starts and one when it ends).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple

SCHEMA = 2  # 2: sessions.retention, nonces

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    buyer_key TEXT NOT NULL,          -- ed25519 public key (base64) that signs the buyer's calls
    wg_key TEXT NOT NULL,             -- the buyer's WireGuard public key (the peer)
    address TEXT NOT NULL,            -- tunnel address assigned from the pool
    state TEXT NOT NULL,              -- open | closed
    reason TEXT NOT NULL DEFAULT '',  -- why it closed: buyer, admin, expired, idle, unpaid
    created REAL NOT NULL,
    expires REAL NOT NULL,
    last_active REAL NOT NULL,
    closed_at REAL,
    rx INTEGER NOT NULL DEFAULT 0,    -- bytes from the buyer (buyer's upload)
    tx INTEGER NOT NULL DEFAULT 0,    -- bytes to the buyer (buyer's download)
    paid_up INTEGER NOT NULL DEFAULT 0,    -- buyer-signed cumulative figures
    paid_down INTEGER NOT NULL DEFAULT 0,
    paid_time REAL NOT NULL DEFAULT 0,
    retention INTEGER NOT NULL DEFAULT 0,  -- receipts of a closed session: 0 all, 1 trimmed, 2 deleted
    sold INTEGER NOT NULL DEFAULT 0        -- 1: sold by the marketplace hub (opened over its channel)
);
CREATE UNIQUE INDEX IF NOT EXISTS sessions_open_addr ON sessions(address) WHERE state = 'open';
CREATE UNIQUE INDEX IF NOT EXISTS sessions_open_wg ON sessions(wg_key) WHERE state = 'open';
CREATE TABLE IF NOT EXISTS peers (
    wg_key TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    rx_raw INTEGER NOT NULL DEFAULT 0,
    tx_raw INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS daily (
    day TEXT PRIMARY KEY, rx INTEGER NOT NULL DEFAULT 0, tx INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipts (
    session TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (session, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nonces (   -- signed API requests seen, until their time is out of the window
    nonce TEXT PRIMARY KEY, expires INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nonces_expires ON nonces(expires);
CREATE TABLE IF NOT EXISTS uploads (  -- receipts the marketplace hub has not acknowledged yet
    session TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (session, seq)
) WITHOUT ROWID;
"""


class LedgerError(Exception):
    """The ledger cannot be used or written; str() is one line naming the file and the way out.
    `status` is what the API answers with while it lasts (503: try again later)."""

    status = 503

    def __init__(self, message: str, full: bool = False):
        super().__init__(message)
        self.full = full  # the disk is full: transient, retried


RESET_HINT = "restore it from a backup, or run `idlewire-agent ledger reset` to move it aside and start an empty one"


def marker_path(path: str) -> str:
    """The ledger's marker (`ledger.id` next to `ledger.sqlite`): the id of the ledger this node keeps."""
    return os.path.join(os.path.dirname(path) or ".", os.path.splitext(os.path.basename(path))[0] + ".id")


def explain(exc: BaseException, path: str) -> LedgerError:
    """One line for an SQLite/OS error on the ledger: what it is and what to do."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    text = str(exc)
    if code == 10 or "disk I/O error" in text:  # creating the -shm/-wal file on a full disk says only that
        with contextlib.suppress(OSError):
            st = os.statvfs(os.path.dirname(path) or ".")
            if st.f_bavail * st.f_frsize < 1 << 20:
                code = 13
    if code == 13 or "disk is full" in text or getattr(exc, "errno", None) == 28:
        return LedgerError(f"{path}: the disk is full: free space on {os.path.dirname(path) or '.'}; nothing "
                           "metered is lost (the counters are committed once it can write again)", full=True)
    if code in (11, 26) or "malformed" in text or "not a database" in text:
        return LedgerError(f"{path}: damaged ({text}); {RESET_HINT}")
    if code in (3, 8, 14, 23) or isinstance(exc, PermissionError) or "readonly" in text or "unable to open" in text:
        return LedgerError(f"{path}: cannot open it for writing ({text}): check that it and its directory are "
                           "writable by the agent (owner, mode, read-only mount), or " + RESET_HINT)
    if code in (5, 6):
        return LedgerError(f"{path}: locked by another process ({text}): is another agent running on this state "
                           "directory?")
    return LedgerError(f"{path}: {text}; if this lasts, {RESET_HINT}")


def read_marker(path: str) -> str:
    """The ledger id the marker holds ("" when there is none: a new node, or a ledger from before it)."""
    marker = marker_path(path)
    try:
        with open(marker) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{marker}: cannot read the ledger marker ({getattr(exc, 'strerror', exc)}); "
                          "fix it or remove it") from None


def _check_file(path: str) -> bool:
    """Refuse what is certainly not a usable ledger before SQLite sees it; True when it holds data."""
    marker, known = marker_path(path), read_marker(path)
    for p in (path, path + "-wal", path + "-shm"):
        if os.path.isdir(p):
            raise LedgerError(f"{p}: is a directory, expected the ledger's SQLite file: move it aside")
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        size = -1
    if known and size <= 0:
        what = "missing" if size < 0 else "empty (0 bytes)"
        raise LedgerError(f"{path}: {what}, but {marker} says this node kept a ledger there (id {known[:16]}): "
                          + RESET_HINT)
    return size > 0


class Delta(NamedTuple):  # a tuple: a poll with 1,000 changing peers makes 1,000 of them
    wg_key: str
    session: str
    rx_raw: int
    tx_raw: int
    rx: int  # bytes to add (already reset-handled and clamped)
    tx: int


class Ledger:
    """One SQLite connection shared by the agent's threads behind a lock."""

    def __init__(self, path: str, synchronous: str = "FULL"):
        self.path = path
        self.synchronous = synchronous
        self.lock = threading.RLock()
        self.full = False  # the last commit failed for a full disk (cleared by the next good one)
        had_data = _check_file(path)
        try:
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        except sqlite3.Error as exc:
            raise explain(exc, path) from None
        try:
            self._open(had_data)
        except sqlite3.Error as exc:
            self.db.close()
            raise explain(exc, path) from None
        except LedgerError:
            self.db.close()
            raise

    def _open(self, had_data: bool) -> None:
        path, db = self.path, self.db
        db.row_factory = sqlite3.Row
        if had_data:  # before anything is written: is it whole, ours and of a schema we know?
            check = db.execute("PRAGMA quick_check").fetchall()
            if [r[0] for r in check] != ["ok"]:
                why = " ".join(str(check[0][0]).replace("*** in database main ***", "").split())
                raise LedgerError(f"{path}: damaged (quick_check: {why[:120]}); {RESET_HINT}")
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "sessions" not in tables:
                raise LedgerError(f"{path}: not an idlewire ledger (tables {', '.join(sorted(tables)) or 'none'}); "
                                  + RESET_HINT)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() if "meta" in tables else None
            if row is not None and not isinstance(row[0], int):
                raise LedgerError(f"{path}: damaged (schema version {str(row[0])[:20]!r}); {RESET_HINT}")
            if row is not None and row[0] > SCHEMA:
                raise LedgerError(f"{path}: written by a newer agent (ledger schema {row[0]}, this agent knows "
                                  f"{SCHEMA}): upgrade idlewire-agent again, or restore a backup of the older ledger")
        marker, known = marker_path(path), read_marker(path)
        if known and had_data:
            row = db.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()
            if row is not None and row[0] != known:
                raise LedgerError(f"{path}: is another ledger (id {str(row[0])[:16]}) than the one this node kept "
                                  f"(id {known[:16]}, {marker}): put the right file back, or " + RESET_HINT)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit (one per poll cycle, so one fsync per cycle) survives a power cut too,
        # so a crash of any kind loses at most the cycle in progress.
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA cache_size=-256")  # 256 KB page cache: the ledger is small
        db.executescript(_DDL)  # idempotent (IF NOT EXISTS)
        cols = {r[1] for r in db.execute("PRAGMA table_info(sessions)")}
        if "retention" not in cols:  # schema 1
            db.execute("ALTER TABLE sessions ADD COLUMN retention INTEGER NOT NULL DEFAULT 0")
        if "sold" not in cols:  # (a column an older agent ignores: no new schema number)
            db.execute("ALTER TABLE sessions ADD COLUMN sold INTEGER NOT NULL DEFAULT 0")
        # Closed sessions whose receipts retention has not finished with: what prune looks for.
        db.execute("CREATE INDEX IF NOT EXISTS sessions_retention ON sessions(retention, closed_at) "
                   "WHERE state = 'closed' AND retention < 2")
        have = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('schema', 'ledger_id')").fetchall())
        if have.get("schema") != SCHEMA or "ledger_id" not in have:  # else nothing to write: a full disk
            with self.tx():                                          # does not stop an existing ledger
                self.set_meta(db, "schema", SCHEMA)
                for k in ("lifetime_rx", "lifetime_tx", "clamped_bytes", "resets"):
                    db.execute("INSERT OR IGNORE INTO meta VALUES (?, 0)", (k,))
                db.execute("INSERT OR IGNORE INTO meta VALUES ('ledger_id', ?)", (known or os.urandom(16).hex(),))
        if not known:  # a new ledger, or one from before the marker: from now on it must be there
            from .keys import write_atomic

            try:
                write_atomic(marker, self.meta("ledger_id") + "\n", 0o600)
            except OSError as exc:
                raise explain(exc, marker) from None

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction, all or nothing. An SQLite error (a full disk, damage) rolls it back and
        becomes a LedgerError; the in-memory state of the callers is theirs to keep consistent."""
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                    self.db.execute("COMMIT")
                except BaseException:
                    if self.db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self.db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                err = explain(exc, self.path)
                self.full = err.full
                raise err from None
            self.full = False

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # --- meta -----------------------------------------------------------------------------
    def meta(self, key: str, default=None):
        with self.lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, db: sqlite3.Connection, key: str, value) -> None:
        db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                   (key, value))

    # --- metering -------------------------------------------------------------------------
    def baselines(self) -> dict[str, tuple[str, int, int]]:
        """wg_key -> (session, rx_raw, tx_raw) for every peer being metered."""
        with self.lock:
            rows = self.db.execute("SELECT wg_key, session, rx_raw, tx_raw FROM peers").fetchall()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def record(self, deltas: list[Delta], now: float, extra_meta: dict | None = None) -> None:
        """Add one poll cycle's deltas and the raw counters they came from, atomically."""
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        rx = sum(d.rx for d in deltas)
        tx = sum(d.tx for d in deltas)
        with self.tx() as db:
            db.executemany("UPDATE peers SET rx_raw = ?, tx_raw = ? WHERE wg_key = ?",
                           [(d.rx_raw, d.tx_raw, d.wg_key) for d in deltas])
            # Traffic from the buyer (rx) is what keeps a session from going idle.
            db.executemany("UPDATE sessions SET rx = rx + ?, tx = tx + ?, last_active = "
                           "CASE WHEN ? > 0 THEN ? ELSE last_active END WHERE id = ?",
                           [(d.rx, d.tx, d.rx, now, d.session) for d in deltas if d.rx or d.tx])
            if rx or tx:
                db.execute("INSERT INTO daily VALUES (?, ?, ?) ON CONFLICT(day) DO UPDATE SET "
                           "rx = rx + excluded.rx, tx = tx + excluded.tx", (day, rx, tx))
                db.execute("UPDATE meta SET value = value + ? WHERE key = 'lifetime_rx'", (rx,))
                db.execute("UPDATE meta SET value = value + ? WHERE key = 'lifetime_tx'", (tx,))
            for k, v in (extra_meta or {}).items():
                if k in ("clamped_bytes", "resets"):
                    db.execute("UPDATE meta SET value = value + ? WHERE key = ?", (v, k))
                else:
                    self.set_meta(db, k, v)
            db.execute("INSERT INTO meta VALUES ('last_poll', ?) ON CONFLICT(key) DO UPDATE "
                       "SET value = excluded.value", (now,))
            db.execute("DELETE FROM nonces WHERE expires < ?", (now,))

    # --- replay protection ----------------------------------------------------------------
    def use_nonce(self, nonce: str, expires: float, now: float) -> bool:
        """Record a signed request's nonce until `expires`; False if it is already there (a replay).

        Committed before the request is served, so a restart does not forget it. This commit does
        not wait for an fsync (one per API call would be a lot on an SD card): in WAL mode it is
        safe from a crash of the agent at once, and from a power cut with the next poll's commit.
        """
        with self.lock:
            self.db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self.tx() as db:
                    cur = db.execute("INSERT INTO nonces VALUES (?, ?) ON CONFLICT(nonce) DO UPDATE SET "
                                     "expires = excluded.expires WHERE nonces.expires < ?", (nonce, expires, now))
                    return cur.rowcount == 1
            finally:
                self.db.execute(f"PRAGMA synchronous={self.synchronous}")

    def reset_baselines(self, keys: list[str] | None = None) -> None:
        """The counters of these peers (all when None) restart from zero (peer re-added, new interface)."""
        with self.tx() as db:
            if keys is None:
                db.execute("UPDATE peers SET rx_raw = 0, tx_raw = 0")
            else:
                db.executemany("UPDATE peers SET rx_raw = 0, tx_raw = 0 WHERE wg_key = ?", [(k,) for k in keys])

    # --- receipts for the hub ([node] marketplace) ---------------------------------------
    # The upload queue is a table, `uploads` (session, seq): a trigger adds every receipt of a
    # session the hub sold (sessions.sold) as it is inserted, in the transaction that inserts it (so
    # such a receipt exists <=> it is queued, whatever crashes when); a batch the hub acknowledged
    # leaves the queue in one transaction. A crash or power cut between the hub's commit and ours
    # resends that batch, which the hub skips as duplicates (it stores once per node, session and
    # seq); nothing is skipped, since a row leaves the queue only after the hub said it has it.
    # Retention (agent.prune_receipts) leaves queued sessions alone. A session a buyer opened on the
    # owner's LAN is not the hub's to count (it refuses such receipts): its receipts are not queued.
    def enable_uploads(self) -> int:
        """Queue every receipt of a sold session from now on (and the ones already here, the first
        time); the count queued."""
        with self.tx() as db:
            # (before: every session's receipts, LAN ones too; those already queued the hub refuses,
            # and Seller.upload_once takes them out of the queue)
            db.execute("DROP TRIGGER IF EXISTS receipts_upload")
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = 'receipts_upload_sold'"
                          ).fetchone() is None:
                db.execute("CREATE TRIGGER receipts_upload_sold AFTER INSERT ON receipts "
                           "WHEN (SELECT sold FROM sessions WHERE id = new.session) = 1 BEGIN "
                           "INSERT OR IGNORE INTO uploads VALUES (new.session, new.seq); END")
                if self.meta("uploads_since") is None:  # first time: what is here goes too
                    db.execute("INSERT OR IGNORE INTO uploads SELECT r.session, r.seq FROM receipts r "
                               "JOIN sessions s ON s.id = r.session WHERE s.sold = 1")
                    self.set_meta(db, "uploads_since", time.time())
            return db.execute("SELECT count(*) FROM uploads").fetchone()[0]

    def disable_uploads(self) -> None:
        """No marketplace: stop queueing (what is queued stays, for when one is set again)."""
        with self.lock:
            if self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name IN "
                               "('receipts_upload', 'receipts_upload_sold')").fetchone() is None:
                return
        with self.tx() as db:
            db.execute("DROP TRIGGER IF EXISTS receipts_upload")
            db.execute("DROP TRIGGER IF EXISTS receipts_upload_sold")

    def pending_uploads(self, limit: int = 500) -> list[tuple[str, int, str]]:
        """(session, seq, body) of up to `limit` queued receipts, whole sessions' runs in seq order;
        a queued receipt whose row is gone (deleted while no marketplace was set) is dropped from
        the queue here with a count in meta."""
        with self.lock:
            rows = self.db.execute("SELECT u.session, u.seq, r.body FROM uploads u LEFT JOIN receipts r "
                                   "ON r.session = u.session AND r.seq = u.seq ORDER BY u.session, u.seq LIMIT ?",
                                   (limit,)).fetchall()
        gone = [(r[0], r[1]) for r in rows if r[2] is None]
        if gone:
            with self.tx() as db:
                db.executemany("DELETE FROM uploads WHERE session = ? AND seq = ?", gone)
                db.execute("INSERT INTO meta VALUES ('uploads_gone', ?) ON CONFLICT(key) DO UPDATE "
                           "SET value = value + excluded.value", (len(gone),))
        return [(r[0], r[1], r[2]) for r in rows if r[2] is not None]

    def receipt_body(self, session: str, seq: int) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT body FROM receipts WHERE session = ? AND seq = ?", (session, seq)).fetchone()
        return row[0] if row else None

    def uploaded(self, sent: list[tuple[str, int]]) -> None:
        """The hub acknowledged these (session, seq): they leave the queue, in one transaction."""
        with self.tx() as db:
            db.executemany("DELETE FROM uploads WHERE session = ? AND seq = ?", sent)

    def upload_backlog(self) -> int:
        with self.lock:
            return self.db.execute("SELECT count(*) FROM uploads").fetchone()[0]

    def heads(self) -> list[tuple[str, str]]:
        """(session, body of its newest receipt or "") for every open session."""
        with self.lock:
            return [(r[0], r[1] or "") for r in self.db.execute(
                "SELECT s.id, (SELECT body FROM receipts WHERE session = s.id ORDER BY seq DESC LIMIT 1) "
                "FROM sessions s WHERE s.state = 'open'")]

    # --- totals ---------------------------------------------------------------------------
    def lifetime(self) -> tuple[int, int]:
        return int(self.meta("lifetime_rx", 0)), int(self.meta("lifetime_tx", 0))

    def days(self, limit: int = 31) -> list[dict]:
        with self.lock:
            rows = self.db.execute("SELECT day, rx, tx FROM daily ORDER BY day DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]

    def session(self, sid: str) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM sessions WHERE id = ?", (sid,)).fetchone()
        return dict(row) if row else None

    def sessions(self, state: str | None = None, buyer_key: str | None = None, limit: int = 1000,
                 offset: int = 0) -> list[dict]:
        q, args = "SELECT * FROM sessions WHERE 1=1", []
        if state:
            q += " AND state = ?"
            args.append(state)
        if buyer_key:
            q += " AND buyer_key = ?"
            args.append(buyer_key)
        q += " ORDER BY created DESC, id LIMIT ? OFFSET ?"
        args += [limit, offset]
        with self.lock:
            return [dict(r) for r in self.db.execute(q, args).fetchall()]

    def integrity(self) -> str:
        with self.lock:
            return self.db.execute("PRAGMA integrity_check").fetchone()[0]
