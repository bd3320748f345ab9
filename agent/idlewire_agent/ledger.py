"""The metering ledger: SQLite in WAL mode, one transaction per poll cycle.

Crash safety rests on one rule: the last raw WireGuard counter seen for a peer (`peers.rx_raw`,
`peers.tx_raw`) is written in the SAME transaction as the totals it was added to. After a kill -9
the agent resumes from the last committed pair (raw, totals), so a byte is either in both or in
neither: nothing is counted twice, and what is lost is at most the uncommitted poll cycle (and
even that is picked up at the next poll, as long as the interface's counters survived).

Tables: sessions (one row per buyer session, with its totals), peers (raw counter baselines),
daily (totals per UTC day), meta (lifetime totals, interface index, schema), receipts, nonces
(of signed API requests, so that a replay is refused across restarts too).
"""

from __future__ import annotations

import contextlib
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
    retention INTEGER NOT NULL DEFAULT 0   -- receipts of a closed session: 0 all, 1 trimmed, 2 deleted
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
"""


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
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit (one per poll cycle, so one fsync per cycle) survives a power cut too,
        # so a crash of any kind loses at most the cycle in progress.
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("PRAGMA cache_size=-256")  # 256 KB page cache: the ledger is small
        self.db.executescript(_DDL)  # idempotent (IF NOT EXISTS)
        if "retention" not in {r[1] for r in self.db.execute("PRAGMA table_info(sessions)")}:  # schema 1
            self.db.execute("ALTER TABLE sessions ADD COLUMN retention INTEGER NOT NULL DEFAULT 0")
        # Closed sessions whose receipts retention has not finished with: what prune looks for.
        self.db.execute("CREATE INDEX IF NOT EXISTS sessions_retention ON sessions(retention, closed_at) "
                        "WHERE state = 'closed' AND retention < 2")
        with self.tx():
            self.set_meta(self.db, "schema", SCHEMA)
            for k in ("lifetime_rx", "lifetime_tx", "clamped_bytes", "resets"):
                self.db.execute("INSERT OR IGNORE INTO meta VALUES (?, 0)", (k,))

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

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
