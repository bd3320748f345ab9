"""The agent's core: tunnel sessions, the metering poll, receipts and the cut-off rules.

Everything that changes state holds the ledger's lock, so the poll, API calls and the session
rules never interleave half-way.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time

from . import keys, receipts
from .config import NodeConfig
from .ledger import Delta, Ledger
from .record import Record, field
from .wg import Peer, Tunnel, WgError

log = logging.getLogger("idlewire.agent")


class SessionError(Exception):
    """A refused session operation; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Stats(Record):
    polls: int = 0
    poll_cpu: float = 0.0  # seconds of CPU (this thread + `wg` children) spent polling
    last_poll_cpu: float = 0.0
    poll_errors: int = 0
    clamps: int = 0
    resets: int = 0
    started: float = field(default_factory=time.time)


def counter_delta(raw: int, last: int, limit: float) -> tuple[int, bool, int]:
    """(bytes to count, was it a reset, bytes clamped off) for one counter.

    A counter that went down was reset (interface recreated, reboot): its whole new value is new
    traffic. A delta larger than what the line can carry in the elapsed time is clamped.
    """
    reset = raw < last
    d = raw if reset else raw - last
    clamped = 0
    if d > limit:
        clamped = d - int(limit)
        d = int(limit)
    return d, reset, clamped


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class Agent:
    def __init__(self, cfg: NodeConfig, tunnel: Tunnel | None = None, clock=time.time):
        self.cfg = cfg
        self.clock = clock
        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        self.ledger = Ledger(os.path.join(cfg.state_dir, "ledger.sqlite"))
        self.lock = self.ledger.lock
        self.node_key = keys.ed25519_private(cfg.key_file)
        self.node_pub = keys.ed25519_public_b64(self.node_key)
        self.admin_token = keys.admin_token(cfg.api.admin_token_file)
        net = cfg.tunnel.network
        self.network = net
        self.node_addr = next(net.hosts())
        if tunnel is None:
            wg_priv, self.wg_pub = keys.wg_private(cfg.tunnel.private_key_file)
            tunnel = Tunnel(cfg.tunnel.interface, cfg.tunnel.port, wg_priv, f"{self.node_addr}/{net.prefixlen}")
        else:
            self.wg_pub = getattr(tunnel, "public_key", "")
        self.tunnel = tunnel
        self.stats = Stats()
        u = cfg.unit
        self.payout = (receipts.payout_statement(self.node_key, u.payout_address, u.unit)
                       if u.payout_address else None)
        if u.present:
            log.info("unit %s (%s), payout address %s; %s", u.unit or "?", u.path, u.payout_address or "none",
                     "; ".join(u.notes) or "no caps")
            if u.node_public_key and u.node_public_key != self.node_pub:
                log.warning("%s: node_public_key %s is not the key in %s (%s): the stamp and the key differ",
                            u.path, u.node_public_key, cfg.key_file, self.node_pub)
        self._last_poll_mono: float | None = None
        # What the owner sells (policy.py): set up by start_policy(), absent in plain metering tests.
        self.shaper = None
        self.quota = None
        self.home = None  # idle.Home: UPnP port mapping and node-mode measurement ([home])

    # --- policy: shaping, schedule, quota, isolation ------------------------------------------
    def start_policy(self, stop: threading.Event) -> None:
        """Quota always; shaping trees and the schedule when [shaping] is enabled.

        The interfaces and tunnel port come from [interfaces]/[tunnel] (one source of truth); the
        shaping trees are brought in line with the sessions that survived a restart.
        """
        from . import quota
        from .policy import SHAPING_STATE_PATH

        pol = self.cfg.policy
        from . import idle

        self.home = idle.Home(self.cfg, stop)
        self.quota = quota.QuotaKeeper(pol.quota, os.path.join(self.cfg.state_dir, "quota.json"),
                                       on_exhausted=self.close_all)
        sh = pol.shaping.replace(wan_interface=self.cfg.interfaces.wan,
                                 tunnel_interface=self.cfg.tunnel.interface, tunnel_port=self.cfg.tunnel.port)
        if not sh.enabled and not os.path.exists(SHAPING_STATE_PATH):
            return  # shaping off: its code (~1 MB of RSS) is not even imported
        from . import schedule, shaping

        if not sh.enabled:  # shaping was on before: take the trees down
            shaping.Shaper(sh, pol.firewall, pol.quota.max_sessions).teardown()
            return
        self.shaper = shaping.Shaper(sh, pol.firewall, pol.quota.max_sessions)
        self.shaper.setup()
        with self.lock:
            rows = self.ledger.db.execute("SELECT id, address FROM sessions WHERE state = 'open'").fetchall()
        self.shaper.sync_sessions({sid: [addr.split("/")[0]] for sid, addr in rows})
        # node mode: the idle measurement sits between the schedule and the shaper (minimum of both)
        sched = schedule.Scheduler(pol.schedule, (sh.cap_up, sh.cap_down),
                                   self.home.start_meter(sh, self.shaper.set_caps))
        threading.Thread(target=sched.run, args=(stop,), daemon=True, name="schedule").start()

    def close_all(self, reason: str) -> None:
        """Close every open session gracefully (final receipts), e.g. when the quota is reached."""
        with self.lock:
            sids = [r[0] for r in self.ledger.db.execute("SELECT id FROM sessions WHERE state = 'open'")]
        for sid in sids:
            self.close_session(sid, "quota")
        log.warning("%s: closed %d session(s)", reason, len(sids))

    def _admit(self, open_count: int) -> None:
        pol = self.cfg.policy
        if self.quota is not None:
            ok, why = self.quota.admit(open_count)
            if not ok:
                raise SessionError(503, why)
        if self.quota is not None and pol.firewall.required:
            from . import isolation

            if not isolation.table_loaded(pol.firewall.table):
                raise SessionError(503, f"buyer isolation (nftables table inet {pol.firewall.table}) is not "
                                        "loaded; the node refuses sessions until it is")

    # --- interface ------------------------------------------------------------------------
    def sync_interface(self) -> None:
        """Make sure the interface exists and carries every open session's peer.

        A new interface (ifindex changed, or a reboot) starts every counter from zero: the
        baselines are reset so that what the new counters show is counted once, from zero.
        """
        idx = self.tunnel.ifindex()
        created = False
        if idx is None:
            created = self.tunnel.ensure()
            idx = self.tunnel.ifindex()
        boot = _boot_id()
        if created or str(idx) != str(self.ledger.meta("ifindex")) or boot != self.ledger.meta("boot_id", ""):
            if not created:
                self.tunnel.ensure()
            log.info("interface %s is new (index %s): counters start from zero", self.tunnel.ifname, idx)
            with self.ledger.tx() as db:
                db.execute("UPDATE peers SET rx_raw = 0, tx_raw = 0")
                self.ledger.set_meta(db, "ifindex", idx)
                self.ledger.set_meta(db, "boot_id", boot)
            self.stats.resets += 1

    def _open_peers(self, only: str | None = None):
        """Rows (wg_key, session, rx_raw, tx_raw) of every open session's peer (or of `only`), as a
        cursor: with 1,000 sessions a poll never holds them all at once. Call with the lock held."""
        q = ("SELECT p.wg_key, p.session, p.rx_raw, p.tx_raw FROM peers p JOIN sessions s ON s.id = p.session "
             "WHERE s.state = 'open'")
        cur = self.ledger.db.execute(q + " AND p.wg_key = ?", (only,)) if only else self.ledger.db.execute(q)
        cur.row_factory = None
        return cur

    # --- metering -------------------------------------------------------------------------
    def poll(self) -> list[Delta]:
        """One metering cycle: read counters, add deltas, commit once. Then apply session rules."""
        cpu0, ch0 = time.thread_time(), os.times()
        with self.lock:
            try:
                self.sync_interface()
                dump = self.tunnel.dump()
            except WgError as exc:
                self.stats.poll_errors += 1
                log.warning("poll: %s", exc)
                return []
            deltas = self._record(dump, self._open_peers())
            if self.quota is not None and deltas:
                self.quota.add_usage(sum(d.rx for d in deltas), sum(d.tx for d in deltas))
            self.enforce()
        ch1 = os.times()
        cpu = time.thread_time() - cpu0 + (ch1.children_user - ch0.children_user) + \
            (ch1.children_system - ch0.children_system)
        self.stats.polls += 1
        self.stats.poll_cpu += cpu
        self.stats.last_poll_cpu = cpu
        return deltas

    def _record(self, dump: dict[str, Peer], rows, only: str | None = None) -> list[Delta]:
        now = self.clock()
        mono = time.monotonic()
        if self._last_poll_mono is None:
            last = self.ledger.meta("last_poll")
            elapsed = max(now - float(last), 0.0) if last is not None else self.cfg.metering.poll_interval
        else:
            elapsed = mono - self._last_poll_mono
        # Never clamp below one poll interval's worth (scheduling jitter is not traffic).
        limit = self.cfg.metering.line_rate_bytes * max(elapsed, self.cfg.metering.poll_interval)
        if only is None:
            self._last_poll_mono = mono
        deltas: list[Delta] = []
        missing: list[tuple[str, str]] = []
        seen: set[str] = set()
        resets = clamped_total = 0
        for key, session, rx_raw, tx_raw in rows:
            if only is not None and key != only:
                continue
            seen.add(key)
            peer = dump.get(key)
            if peer is None:
                missing.append((key, session))
                continue
            if peer.rx == rx_raw and peer.tx == tx_raw:
                continue
            rx, r1, c1 = counter_delta(peer.rx, rx_raw, limit)
            tx, r2, c2 = counter_delta(peer.tx, tx_raw, limit)
            if c1 or c2:
                log.warning("session %s: delta above line rate x %.1fs, clamped %d bytes", session, elapsed, c1 + c2)
                self.stats.clamps += 1
            resets += r1 or r2
            clamped_total += c1 + c2
            deltas.append(Delta(key, session, peer.rx, peer.tx, rx, tx))
        if only is None:
            for key, session in missing:
                self._readd(key, session)
            for key in dump.keys() - seen:
                log.info("removing stale peer %s (no open session)", key)
                self._try(self.tunnel.remove_peer, key)
        if deltas or only is None:
            self.ledger.record(deltas, now, {"resets": resets, "clamped_bytes": clamped_total})
        self.stats.resets += resets
        return deltas

    def _readd(self, key: str, session: str) -> None:
        """An open session's peer is missing from the interface: add it back, counting from zero."""
        log.info("session %s: peer missing from %s, adding it back", session, self.tunnel.ifname)
        row = self.ledger.db.execute("SELECT address FROM sessions WHERE id = ?", (session,)).fetchone()
        if row and self._try(self.tunnel.add_peer, key, row[0]):
            self.ledger.reset_baselines([key])

    @staticmethod
    def _try(fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except WgError as exc:
            log.warning("%s: %s", fn.__name__, exc)
            return False

    # --- sessions -------------------------------------------------------------------------
    def open_session(self, buyer_key: str, wg_key: str) -> dict:
        if not keys.is_wg_key(wg_key):
            raise SessionError(400, "wg_public_key: expected a WireGuard public key (base64 of 32 bytes)")
        with self.lock:
            open_ = self.ledger.db.execute("SELECT wg_key, address FROM sessions WHERE state = 'open'").fetchall()
            if any(row[0] == wg_key for row in open_):
                raise SessionError(409, "wg_public_key: a session with this key is already open")
            if len(open_) >= self.cfg.sessions.max:
                raise SessionError(503, f"the node has its maximum of {self.cfg.sessions.max} sessions open")
            self._admit(len(open_))
            used = {ipaddress.ip_interface(row[1]).ip for row in open_} | {self.node_addr}
            del open_
            addr = next((h for h in self.network.hosts() if h not in used), None)
            if addr is None:
                raise SessionError(503, "the address pool is exhausted")
            sid = os.urandom(8).hex()
            now = self.clock()
            address = f"{addr}/{addr.max_prefixlen}"
            # A fresh peer has zero counters: remove any stale one first, then add.
            self._try(self.tunnel.remove_peer, wg_key)
            try:
                self.tunnel.add_peer(wg_key, address)
            except WgError as exc:
                raise SessionError(503, f"cannot add the WireGuard peer: {exc}") from None
            with self.ledger.tx() as db:
                db.execute("INSERT INTO sessions (id, buyer_key, wg_key, address, state, created, expires, "
                           "last_active) VALUES (?, ?, ?, ?, 'open', ?, ?, ?)",
                           (sid, buyer_key, wg_key, address, now, now + self.cfg.sessions.expiry, now))
                db.execute("INSERT OR REPLACE INTO peers VALUES (?, ?, 0, 0)", (wg_key, sid))
            if self.shaper is not None:
                self.shaper.add_session(sid, [str(addr)])
            log.info("session %s opened: %s for %s", sid, address, wg_key)
        return self.describe(sid)

    def describe(self, sid: str) -> dict:
        s = self.ledger.session(sid)
        if s is None:
            raise SessionError(404, f"no session {sid}")
        price = self.cfg.price_per_gb
        return {
            "session": s["id"], "state": s["state"], "reason": s["reason"],
            "address": s["address"], "node_address": str(self.node_addr),
            "allowed_ips": str(self.network), "wg_public_key": self.wg_pub,
            "endpoint_host": self.cfg.tunnel.endpoint, "endpoint_port": self.cfg.tunnel.port,
            "node_key": self.node_pub, "buyer_key": s["buyer_key"], "buyer_wg_key": s["wg_key"],
            "created": s["created"], "expires": s["expires"], "last_active": s["last_active"],
            "up": s["rx"], "down": s["tx"], "paid_up": s["paid_up"], "paid_down": s["paid_down"],
            "unpaid": max(0, s["rx"] + s["tx"] - s["paid_up"] - s["paid_down"]),
            "unpaid_cap": self.cfg.metering.unpaid_cap_bytes,
            "tolerance_percent": self.cfg.metering.tolerance_percent,
            "price_per_gb": price, "cost": round((s["rx"] + s["tx"]) / 1e9 * price, 9),
        }

    def close_session(self, sid: str, reason: str) -> dict:
        with self.lock:
            s = self.ledger.session(sid)
            if s is None:
                raise SessionError(404, f"no session {sid}")
            if s["state"] != "open":
                return self.describe(sid)
            # Count what the peer carried since the last poll before it disappears.
            try:
                self._record(self.tunnel.dump(), self._open_peers(s["wg_key"]), only=s["wg_key"])
            except WgError as exc:
                log.warning("close %s: final read failed: %s", sid, exc)
            self._try(self.tunnel.remove_peer, s["wg_key"])
            if self.shaper is not None:
                self.shaper.remove_session(sid)
            s = self.ledger.session(sid)
            with self.ledger.tx() as db:
                db.execute("UPDATE sessions SET state = 'closed', reason = ?, closed_at = ? WHERE id = ?",
                           (reason, self.clock(), sid))
                db.execute("DELETE FROM peers WHERE wg_key = ?", (s["wg_key"],))
                self._issue(db, s, None)
            log.info("session %s closed (%s): up %d, down %d bytes", sid, reason, s["rx"], s["tx"])
        return self.describe(sid)

    def enforce(self) -> None:
        """Close sessions past expiry, idle too long, or with too much unpaid usage."""
        now = self.clock()
        cap = self.cfg.metering.unpaid_cap_bytes
        idle = self.cfg.sessions.idle_timeout
        with self.lock:
            due = self.ledger.db.execute(
                "SELECT id, CASE WHEN expires <= ?1 THEN 'expired' WHEN ?1 - last_active > ?2 THEN 'idle' "
                "ELSE 'unpaid' END FROM sessions WHERE state = 'open' AND (expires <= ?1 OR ?1 - last_active > ?2 "
                "OR rx + tx - paid_up - paid_down > ?3)", (now, idle, cap)).fetchall()
        for sid, reason in due:
            self.close_session(sid, reason)

    # --- receipts -------------------------------------------------------------------------
    def _issue(self, db, s: dict, buyer: dict | None) -> dict:
        row = db.execute("SELECT seq, body FROM receipts WHERE session = ? ORDER BY seq DESC LIMIT 1",
                         (s["id"],)).fetchone()
        seq, prev = 1, receipts.GENESIS
        if row:
            last = json.loads(row[1])
            seq, prev = row[0] + 1, last["hash"] if receipts.is_checkpoint(last) else receipts.receipt_hash(last)
        r = receipts.make_receipt(self.node_key, s["id"], seq, s["rx"], s["tx"], int(self.clock()), prev, buyer)
        db.execute("INSERT INTO receipts VALUES (?, ?, ?)", (s["id"], seq, json.dumps(r, sort_keys=True)))
        if s["state"] == "closed":  # co-signed after the close: retention trims the chain again
            db.execute("UPDATE sessions SET retention = 0 WHERE id = ?", (s["id"],))
        return r

    def cosign(self, sid: str, buyer_key: str, stmt: dict) -> dict:
        """The buyer's signed cumulative usage: check it, count it as paid, answer with a receipt."""
        with self.lock:
            s = self.ledger.session(sid)
            if s is None or s["buyer_key"] != buyer_key:
                raise SessionError(404, f"no session {sid} for this buyer key")
            if s["retention"] == 2:
                raise SessionError(409, f"session {sid} closed more than {self.cfg.receipts.keep_days:g} days ago: "
                                        "its receipts are deleted")
            if not receipts.usage_valid(stmt, sid, buyer_key):
                raise SessionError(400, "usage: bad signature or fields (expected up, down, time, key, sig)")
            if stmt["up"] < s["paid_up"] or stmt["down"] < s["paid_down"]:
                raise SessionError(409, "usage: cumulative figures went down from the last co-signed ones")
            ours = s["rx"] + s["tx"]
            theirs = stmt["up"] + stmt["down"]
            tol = self.cfg.metering.tolerance_percent / 100
            agreed = theirs >= ours * (1 - tol) - 65536  # small absolute slack for a poll's lag
            last = self.ledger.db.execute("SELECT body FROM receipts WHERE session = ? ORDER BY seq DESC LIMIT 1",
                                          (sid,)).fetchone()
            last = json.loads(last[0]) if last else None
            if last and last.get("buyer") and (last["up"], last["down"]) == (s["rx"], s["tx"]) and \
                    (last["buyer"]["up"], last["buyer"]["down"]) == (stmt["up"], stmt["down"]):
                r = last  # nothing moved since the last receipt: no new one (keeps idle sessions small)
            else:
                with self.ledger.tx() as db:
                    db.execute("UPDATE sessions SET paid_up = ?, paid_down = ?, paid_time = ? WHERE id = ?",
                               (stmt["up"], stmt["down"], stmt["time"], sid))
                    r = self._issue(db, s, stmt)
            if not agreed:
                log.warning("session %s: buyer signed %d bytes, node counted %d (beyond %.1f%%)", sid, theirs,
                            ours, tol * 100)
        return {"receipt": r, "agreed": agreed, "node_bytes": ours, "buyer_bytes": theirs, "state": s["state"],
                "reason": s["reason"]}

    def prune_receipts(self, batch: int = 1000) -> bool:
        """One step of receipt retention (node.toml [receipts]); False when there is nothing to do.

        Called between polls, never inside one: each step is one short transaction on one closed
        session, deleting at most `batch` receipts. Every committed state still verifies: a chain
        is cut from its end (deleted `keep_days` after the close), or from its start behind a fresh
        node-signed checkpoint (trimmed to the last `keep_closed` once the session is closed).
        Open sessions keep every receipt.
        """
        keep, days = self.cfg.receipts.keep_closed, self.cfg.receipts.keep_days
        db = self.ledger.db
        with self.lock:
            if days:
                row = db.execute("SELECT id FROM sessions WHERE state = 'closed' AND retention < 2 AND closed_at < ? "
                                 "ORDER BY closed_at LIMIT 1", (self.clock() - days * 86400,)).fetchone()
                if row:
                    with self.ledger.tx():
                        db.execute("DELETE FROM receipts WHERE session = ?1 AND seq > (SELECT max(seq) FROM receipts "
                                   "WHERE session = ?1) - ?2", (row[0], batch))
                        if not db.execute("SELECT 1 FROM receipts WHERE session = ?", (row[0],)).fetchone():
                            db.execute("UPDATE sessions SET retention = 2 WHERE id = ?", (row[0],))
                            log.info("session %s: receipts deleted (closed over %g days ago)", row[0], days)
                    return True
            if not keep:
                return False
            row = db.execute("SELECT id FROM sessions WHERE state = 'closed' AND retention < 2 AND retention = 0 "
                             "LIMIT 1").fetchone()
            if not row:
                return False
            sid = row[0]
            lo, hi = db.execute("SELECT min(seq), max(seq) FROM receipts WHERE session = ?", (sid,)).fetchone()
            target = (hi or 0) - keep  # the receipt a checkpoint will stand for, at the end
            with self.ledger.tx():
                if lo is not None and target > lo:
                    c = min(target, lo + batch)
                    r = json.loads(db.execute("SELECT body FROM receipts WHERE session = ? AND seq = ?",
                                              (sid, c)).fetchone()[0])
                    db.execute("UPDATE receipts SET body = ? WHERE session = ? AND seq = ?",
                               (json.dumps(receipts.make_checkpoint(self.node_key, r), sort_keys=True), sid, c))
                    db.execute("DELETE FROM receipts WHERE session = ? AND seq < ?", (sid, c))
                    if c < target:
                        return True
                    log.info("session %s: receipts before seq %d pruned (kept the last %d)", sid, c + 1, keep)
                db.execute("UPDATE sessions SET retention = 1 WHERE id = ?", (sid,))
            return True

    def receipts(self, sid: str) -> list[dict]:
        return json.loads("".join(self.receipts_json(sid)))

    def receipts_json(self, sid: str, page: int = 256):
        """The session's receipts as a JSON array, in pieces: a page of stored bodies at a time, so a
        long chain (17,280 a day at one co-signature every 5 s) never sits in memory whole."""
        yield "["
        seq, sep = -1, ""
        while True:
            with self.lock:
                cur = self.ledger.db.execute("SELECT seq, body FROM receipts WHERE session = ? AND seq > ? "
                                             "ORDER BY seq LIMIT ?", (sid, seq, page))
                cur.row_factory = None
                rows = cur.fetchall()
            if rows:
                yield sep + ",".join(r[1] for r in rows)
                seq, sep = rows[-1][0], ","
            if len(rows) < page:
                break
        yield "]"

    # --- reporting ------------------------------------------------------------------------
    def usage(self) -> dict:
        rx, tx = self.ledger.lifetime()
        return {"lifetime": {"up": rx, "down": tx}, "days": self.ledger.days(),
                "sessions": [{"session": s["id"], "state": s["state"], "up": s["rx"], "down": s["tx"]}
                             for s in self.ledger.sessions(limit=200)]}

    def offer(self) -> dict:
        """What /health tells a marketplace besides the keys: the unit, where its owner is paid
        (signed by the node key, the key of its receipts) and the caps in force."""
        u, pol = self.cfg.unit, self.cfg.policy
        return {
            "unit": {"unit": u.unit, "hostname": u.hostname, "payout_address": u.payout_address or None}
            if u.present else None,
            "payout": self.payout,
            "caps": {"up_mbit": pol.shaping.cap_up / 1e6, "down_mbit": pol.shaping.cap_down / 1e6,
                     "shaped": pol.shaping.enabled, "monthly_gb": pol.quota.monthly_bytes / 1e9,
                     "max_sessions": pol.quota.max_sessions,
                     "from_unit": sorted(u.caps)},
            **(self.home.health() if self.home else {}),
        }

    def metrics(self) -> str:
        rx, tx = self.ledger.lifetime()
        with self.lock:
            n_open = self.ledger.db.execute("SELECT count(*) FROM sessions WHERE state = 'open'").fetchone()[0]
        rss = 0
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
        except OSError:
            pass
        st = self.stats
        lines = [
            ("idlewire_sessions_open", "gauge", "Open buyer sessions", n_open),
            ("idlewire_bytes_up_total", "counter", "Bytes received from buyers (lifetime)", rx),
            ("idlewire_bytes_down_total", "counter", "Bytes sent to buyers (lifetime)", tx),
            ("idlewire_polls_total", "counter", "Metering poll cycles", st.polls),
            ("idlewire_poll_errors_total", "counter", "Failed metering poll cycles", st.poll_errors),
            ("idlewire_poll_cpu_seconds_total", "counter", "CPU spent in poll cycles", round(st.poll_cpu, 6)),
            ("idlewire_poll_cpu_seconds_last", "gauge", "CPU spent in the last poll cycle",
             round(st.last_poll_cpu, 6)),
            ("idlewire_clamps_total", "counter", "Deltas clamped to the line rate", st.clamps),
            ("idlewire_counter_resets_total", "counter", "Counter resets handled", st.resets),
            ("idlewire_resident_memory_bytes", "gauge", "Agent resident memory", rss),
            *(self.home.metrics() if self.home else ()),
        ]
        out = []
        for name, kind, help_, value in lines:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"
