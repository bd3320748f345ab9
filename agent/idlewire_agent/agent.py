"""The agent's core: tunnel sessions, the metering poll, receipts and the cut-off rules.

Locks, always taken in this order and never the other way round:
- `wg_lock` serialises what touches the WireGuard interface (a poll's read and the record of what it
  read, a session's peer being added or removed), so a counter is never read by one and recorded
  by another out of order;
- `lock` (the ledger's) guards the ledger and the in-memory state only: no external command ever
  runs while it is held, so a wedged `wg` or `tc` never stalls the API (health, metrics, co-signing)
  or the metering's bookkeeping.
Shaping changes (tc) are handed to one worker thread in order, outside both locks: a wedged `tc`
delays the shaping of a session, never a poll.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import queue
import threading
import time

from . import keys, receipts
from .config import NodeConfig
from .ledger import Delta, Ledger, LedgerError
from .record import Record, field
from .wg import Peer, Tunnel, WgError

log = logging.getLogger("idlewire.agent")

LINE_POLL_S = 2.0  # how often the shaping worker looks whether the line's device was made anew


def link_index(dev: str) -> int | None:
    """The kernel's index of network device `dev` (new each time it is created), None when absent."""
    try:
        with open(f"/sys/class/net/{dev}/ifindex") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


class SessionError(Exception):
    """A refused session operation; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


_UNREAD = object()  # cosign: the peer's counters have not been read afresh (yet)


class _ReadAgain(Exception):
    """cosign: the claim is beyond the last poll's figures; read the peer afresh (no lock held) and retry."""

    def __init__(self, wg_key: str):
        super().__init__(wg_key)
        self.wg_key = wg_key


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
        self.wg_lock = threading.RLock()
        # Set once a session opened or closed (committed): the market thread wakes and tells the hub,
        # however short the session was (market.Seller).
        self.sessions_changed = threading.Event()
        from . import run

        run.forbid_under(self.lock)
        self._shape_q: queue.SimpleQueue | None = None
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
        self.guard = None  # isolation.Guard when [firewall] required: checked before opening and every poll
        self.home = None  # idle.Home: UPnP port mapping and node-mode measurement ([home])
        self.earnings: dict | None = None  # the last settled epoch as market.Seller checked it

    # --- policy: shaping, schedule, quota, isolation ------------------------------------------
    def start_policy(self, stop: threading.Event) -> None:
        """Quota always; shaping trees and the schedule when [shaping] is enabled.

        The interfaces and tunnel port come from [interfaces]/[tunnel] (one source of truth); the
        shaping trees are brought in line with the sessions that survived a restart.
        """
        from . import quota
        from .policy import SHAPING_STATE_PATH

        pol = self.cfg.policy
        self.quota = quota.QuotaKeeper(pol.quota, os.path.join(self.cfg.state_dir, "quota.json"),
                                       on_exhausted=self.close_all)
        if pol.firewall.required:
            from . import isolation

            self.guard = isolation.Guard(pol.firewall.table, self.cfg.tunnel.interface, pol.firewall.public_addresses)
        from . import idle

        # [home]: the UPnP mapping (its thread; the router's public address goes to the guard) and,
        # below, the node-mode meter; neither runs a command under the ledger lock.
        self.home = idle.Home(self.cfg, stop, report=self.guard.report if self.guard is not None else None)
        sh = pol.shaping.replace(wan_interface=self.cfg.interfaces.wan,
                                 tunnel_interface=self.cfg.tunnel.interface, tunnel_port=self.cfg.tunnel.port)
        if not sh.enabled and not os.path.exists(SHAPING_STATE_PATH):
            return  # shaping off: its code (~1 MB of RSS) is not even imported
        from . import schedule, shaping

        if not sh.enabled:  # shaping was on before: take the trees down
            shaping.Shaper(sh, pol.firewall, pol.quota.max_sessions).teardown()
            return
        self.shaper = shaping.Shaper(sh, pol.firewall, pol.quota.max_sessions)
        self._line_index = link_index(sh.wan_interface)
        if self._line_index is None:  # PPPoE: ppp0 comes with the first dial-up, and anew with each redial
            log.warning("shaping: the line %s is not up yet; its trees are set up when it comes up", sh.wan_interface)
        self.shaper.setup()
        self._shape_q = queue.SimpleQueue()
        threading.Thread(target=self._shape_worker, args=(shaping.TcError,), daemon=True, name="shaping").start()
        with self.lock:
            rows = self.ledger.db.execute("SELECT id, address FROM sessions WHERE state = 'open'").fetchall()
        self.shaper.sync_sessions({sid: [addr.split("/")[0]] for sid, addr in rows})
        # node mode: the idle measurement sits between the schedule and the shaper (minimum of both)
        sched = schedule.Scheduler(pol.schedule, (sh.cap_up, sh.cap_down),
                                   self.home.start_meter(sh, self.shaper.set_caps))
        threading.Thread(target=sched.run, args=(stop,), daemon=True, name="schedule").start()

    def _shape(self, method: str, *args) -> None:
        """Hand a shaping change to the worker (in order); never waits for tc."""
        if self.shaper is not None and self._shape_q is not None:
            self._shape_q.put((method, args))

    def _shape_worker(self, tc_error: type[Exception]) -> None:
        while True:
            try:
                method, args = self._shape_q.get(timeout=LINE_POLL_S)
            except queue.Empty:
                # The line's device came back as a new link (ppp0 after a redial, a USB adapter
                # plugged again): its qdiscs went with the old one, so the trees are set up again.
                index = link_index(self.shaper.sh.wan_interface)
                if index is None or index == self._line_index:
                    continue
                self._line_index = index
                log.info("shaping: %s is up (link %d): setting up its trees", self.shaper.sh.wan_interface, index)
                method, args = "setup", ()
            try:
                getattr(self.shaper, method)(*args)
            except tc_error as exc:  # the tree is re-asserted whole by the next change
                log.warning("shaping %s %s: %s", method, args[0] if args else "", exc)
            except Exception:
                log.exception("shaping %s failed", method)

    def close_all(self, reason: str) -> None:
        """Close every open session gracefully (final receipts), e.g. when the quota is reached."""
        with self.lock:
            sids = [r[0] for r in self.ledger.db.execute("SELECT id FROM sessions WHERE state = 'open'")]
        for sid in sids:
            self.close_session(sid, "quota")
        log.warning("%s: closed %d session(s)", reason, len(sids))

    def _admit(self, open_count: int, buyer_key: str, buyer_open: int) -> None:
        """Refuse a session the node's limits, the buyer's record or missing isolation do not allow.
        Ledger lock held: no external command here (isolation is the poll's last check)."""
        ses = self.cfg.sessions
        if buyer_open >= ses.max_per_buyer:
            raise SessionError(429, f"this buyer key has its maximum of {ses.max_per_buyer} sessions open")
        wait = self._unpaid_backoff(buyer_key)
        if wait > 0:
            raise SessionError(429, f"this buyer key was cut off for unpaid usage; next session in {wait:.0f} s")
        if self.quota is not None:
            ok, why = self.quota.admit(open_count)
            if not ok:
                raise SessionError(503, why)
        if self.guard is not None and not self.guard.recent(self.cfg.metering.poll_interval):
            raise SessionError(503, f"buyer isolation is not in force ({self.guard.why}); the node refuses "
                                    "sessions until it is")

    def _unpaid_backoff(self, buyer_key: str) -> float:
        """Seconds this key still waits after being closed for unpaid usage: sessions.unpaid_backoff,
        doubled for each further unpaid close within sessions.unpaid_backoff_max seconds of the end of
        the previous wait, at most unpaid_backoff_max (a key that pays for that long starts over)."""
        ses = self.cfg.sessions
        if ses.unpaid_backoff <= 0:
            return 0.0
        now = self.clock()
        wait, last = 0.0, None
        for (t,) in self.ledger.db.execute(
                "SELECT closed_at FROM sessions WHERE buyer_key = ? AND reason = 'unpaid' AND closed_at > ? "
                "ORDER BY closed_at", (buyer_key, now - 30 * 86400)):
            streak = last is not None and t - last <= wait + ses.unpaid_backoff_max
            wait = min(wait * 2 if streak else ses.unpaid_backoff, ses.unpaid_backoff_max)
            last = t
        return 0.0 if last is None else max(0.0, last + wait - now)

    def _isolation(self) -> bool:
        """Isolation check of a poll (wg_lock held, not the ledger lock: it runs nft): when lost, every
        buyer peer goes (counted first by the poll) and stays away until the table is back. True when
        buyers may pass."""
        if self.guard is None:
            return True
        ok, _ = self.guard.check()
        return ok

    def _cut_off_peers(self, dump: dict[str, Peer]) -> None:
        for key in dump:
            self._try(self.tunnel.remove_peer, key)
        if dump:
            lost = self.guard.lost_at
            log.error("buyer isolation lost: %d buyer peer(s) removed (%.2f s after the loss was seen)", len(dump),
                      time.monotonic() - lost if lost is not None else 0.0)

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
        with self.wg_lock:
            try:
                self.sync_interface()
                dump = self.tunnel.dump()
            except WgError as exc:
                self.stats.poll_errors += 1
                log.warning("poll: %s", exc)
                return []
            except LedgerError as exc:
                return self._ledger_failed(exc)
            isolated = self._isolation()
            try:
                with self.lock:
                    deltas, missing, stale = self._record(dump, self._open_peers())
            except LedgerError as exc:
                return self._ledger_failed(exc)
            if self._ledger_down:
                log.warning("ledger: writable again, the counters are committed (%s)", self.ledger.path)
                self._ledger_down = False
            if not isolated:  # counted above; every buyer peer goes until the table is back
                self._cut_off_peers(dump)
            else:
                for key, session in missing:
                    self._readd(key, session)
                for key in stale:
                    log.info("removing stale peer %s (no open session)", key)
                    self._try(self.tunnel.remove_peer, key)
        if self.quota is not None and deltas:  # its own lock; may close every session (quota reached)
            self.quota.add_usage(sum(d.rx for d in deltas), sum(d.tx for d in deltas))
        self.enforce()
        ch1 = os.times()
        cpu = time.thread_time() - cpu0 + (ch1.children_user - ch0.children_user) + \
            (ch1.children_system - ch0.children_system)
        self.stats.polls += 1
        self.stats.poll_cpu += cpu
        self.stats.last_poll_cpu = cpu
        return deltas

    _ledger_down = False

    def _ledger_failed(self, exc: LedgerError) -> list[Delta]:
        """A poll could not commit (full disk, damage): nothing was counted, the WireGuard counters
        keep the bytes and the next poll that commits counts them. One line per episode."""
        self.stats.poll_errors += 1
        if not self._ledger_down:
            log.error("poll: %s; retrying every poll", exc)
            self._ledger_down = True
        return []

    def _record(self, dump: dict[str, Peer], rows, only: str | None = None):
        """(deltas, missing peers, stale peers) of one dump; the deltas are committed. Ledger lock held:
        the caller re-adds the missing and removes the stale peers after releasing it."""
        now = self.clock()
        mono = time.monotonic()
        if self._last_poll_mono is None:
            last = self.ledger.meta("last_poll")
            elapsed = max(now - float(last), 0.0) if last is not None else self.cfg.metering.poll_interval
        else:
            elapsed = mono - self._last_poll_mono
        # Never clamp below one poll interval's worth (scheduling jitter is not traffic).
        limit = self.cfg.metering.line_rate_bytes * max(elapsed, self.cfg.metering.poll_interval)
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
        if deltas or only is None:
            self.ledger.record(deltas, now, {"resets": resets, "clamped_bytes": clamped_total})
        if only is None:  # committed: the clamp's clock moves on (not while the disk is full)
            self._last_poll_mono = mono
        self.stats.resets += resets
        stale = [] if only is not None else list(dump.keys() - seen)
        return deltas, (missing if only is None else []), stale

    def _readd(self, key: str, session: str) -> None:
        """An open session's peer is missing from the interface: add it back, counting from zero.
        (wg_lock held, ledger lock not.)"""
        log.info("session %s: peer missing from %s, adding it back", session, self.tunnel.ifname)
        s = self.ledger.session(session)
        if s and s["state"] == "open" and self._try(self.tunnel.add_peer, key, s["address"]):
            try:
                self.ledger.reset_baselines([key])
            except LedgerError as exc:
                log.warning("session %s: %s", session, exc)

    @staticmethod
    def _try(fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except WgError as exc:
            log.warning("%s: %s", fn.__name__, exc)
            return False

    # --- sessions -------------------------------------------------------------------------
    def open_session(self, buyer_key: str, wg_key: str, sold: bool = False) -> dict:
        """A session for BUYER_KEY's WireGuard key WG_KEY. SOLD: the marketplace hub sold it (the
        request came over the hub's channel): its receipts go to the hub (Ledger.enable_uploads)."""
        if not keys.is_wg_key(wg_key):
            raise SessionError(400, "wg_public_key: expected a WireGuard public key (base64 of 32 bytes)")
        with self.wg_lock:
            with self.lock:  # reserve the address and the session in the ledger; no command under this lock
                open_ = self.ledger.db.execute("SELECT wg_key, address, buyer_key FROM sessions WHERE state = 'open'"
                                               ).fetchall()
                if any(row[0] == wg_key for row in open_):
                    raise SessionError(409, "wg_public_key: a session with this key is already open")
                if len(open_) >= self.cfg.sessions.max:
                    raise SessionError(503, f"the node has its maximum of {self.cfg.sessions.max} sessions open")
                self._admit(len(open_), buyer_key, sum(1 for row in open_ if row[2] == buyer_key))
                used = {ipaddress.ip_interface(row[1]).ip for row in open_} | {self.node_addr}
                del open_
                addr = self._pick_address(used)
                if addr is None:
                    raise SessionError(503, "the address pool is exhausted")
                sid = os.urandom(8).hex()
                now = self.clock()
                address = f"{addr}/{addr.max_prefixlen}"
                try:
                    with self.ledger.tx() as db:
                        db.execute("INSERT INTO sessions (id, buyer_key, wg_key, address, state, created, expires, "
                                   "last_active, sold) VALUES (?, ?, ?, ?, 'open', ?, ?, ?, ?)",
                                   (sid, buyer_key, wg_key, address, now, now + self.cfg.sessions.expiry, now,
                                    int(sold)))
                        db.execute("INSERT OR REPLACE INTO peers VALUES (?, ?, 0, 0)", (wg_key, sid))
                except LedgerError as exc:
                    raise SessionError(503, f"the node cannot record a session now: {exc}") from None
            # Nothing of an earlier holder of the address reaches this buyer: its flows go (again).
            self._forget_flows(address)
            # A fresh peer has zero counters: remove any stale one first, then add.
            self._try(self.tunnel.remove_peer, wg_key)
            try:
                self.tunnel.add_peer(wg_key, address)
            except WgError as exc:
                with self.ledger.tx() as db:  # nothing happened: the reservation goes
                    db.execute("DELETE FROM peers WHERE wg_key = ? AND session = ?", (wg_key, sid))
                    db.execute("DELETE FROM sessions WHERE id = ?", (sid,))
                raise SessionError(503, f"cannot add the WireGuard peer: {exc}") from None
        self._shape("add_session", sid, [str(addr)])
        self.sessions_changed.set()
        log.info("session %s opened: %s for %s", sid, address, wg_key)
        return self.describe(sid)

    def _pick_address(self, used: set):
        """A free pool address that rested sessions.address_rest seconds since its last session closed
        (flows of the old holder still arriving are dropped, not handed to a new buyer); when every free
        address rests, the one closed longest ago. Call with the lock held."""
        rest = self.cfg.sessions.address_rest
        resting: dict = {}
        if rest > 0:
            for a, t in self.ledger.db.execute("SELECT address, max(closed_at) FROM sessions WHERE state = 'closed' "
                                               "AND closed_at > ? GROUP BY address", (self.clock() - rest,)):
                resting[ipaddress.ip_interface(a).ip] = t
        addr = next((h for h in self.network.hosts() if h not in used and h not in resting), None)
        if addr is None and resting:
            addr = min((t, a) for a, t in resting.items() if a not in used)[1]
            log.warning("every free address of the pool rests: %s is reused after %.0f s", addr,
                        self.clock() - resting[addr])
        return addr

    @staticmethod
    def _forget_flows(address: str) -> None:
        from . import isolation

        isolation.forget_flows(address)

    def public_endpoint(self) -> tuple[str, int]:
        """(host, port) buyers reach WireGuard at: the UPnP/NAT-PMP mapping on the home router while
        there is one, else [tunnel] endpoint and port (host "" = unknown: the host of the API URL)."""
        mapped = self.home.endpoint() if self.home is not None else None
        return mapped or (self.cfg.tunnel.endpoint, self.cfg.tunnel.port)

    def describe(self, sid: str) -> dict:
        s = self.ledger.session(sid)
        if s is None:
            raise SessionError(404, f"no session {sid}")
        price = self.cfg.price_per_gb
        return {
            "session": s["id"], "state": s["state"], "reason": s["reason"],
            "address": s["address"], "node_address": str(self.node_addr),
            "allowed_ips": str(self.network), "wg_public_key": self.wg_pub,
            **dict(zip(("endpoint_host", "endpoint_port"), self.public_endpoint(), strict=True)),
            "node_key": self.node_pub, "buyer_key": s["buyer_key"], "buyer_wg_key": s["wg_key"],
            "created": s["created"], "expires": s["expires"], "last_active": s["last_active"],
            "up": s["rx"], "down": s["tx"], "paid_up": s["paid_up"], "paid_down": s["paid_down"],
            "unpaid": max(0, s["rx"] + s["tx"] - s["paid_up"] - s["paid_down"]),
            "unpaid_cap": self.cfg.metering.unpaid_cap_bytes,
            "tolerance_percent": self.cfg.metering.tolerance_percent,
            "price_per_gb": price, "cost": round((s["rx"] + s["tx"]) / 1e9 * price, 9),
        }

    def close_session(self, sid: str, reason: str) -> dict:
        """Count what the peer carried since the last poll, remove it, then close the session in the
        ledger with the node's final receipt. Commands run under wg_lock, never the ledger lock."""
        with self.wg_lock:
            s = self.ledger.session(sid)
            if s is None:
                raise SessionError(404, f"no session {sid}")
            if s["state"] != "open":
                return self.describe(sid)
            try:
                dump = self.tunnel.dump()
            except WgError as exc:
                log.warning("close %s: final read failed: %s", sid, exc)
                dump = None
            try:
                with self.lock:
                    if dump is not None:
                        self._record(dump, self._open_peers(s["wg_key"]), only=s["wg_key"])
            except LedgerError as exc:  # keep the peer (and its counters) until the ledger can take them
                raise SessionError(503, f"session {sid} not closed: {exc}") from None
            self._try(self.tunnel.remove_peer, s["wg_key"])
            self._forget_flows(s["address"])
            try:
                with self.lock:
                    s = self.ledger.session(sid)
                    with self.ledger.tx() as db:
                        db.execute("UPDATE sessions SET state = 'closed', reason = ?, closed_at = ? WHERE id = ?",
                                   (reason, self.clock(), sid))
                        db.execute("DELETE FROM peers WHERE wg_key = ?", (s["wg_key"],))
                        self._issue(db, {**s, "state": "closed", "reason": reason}, None)
            except LedgerError as exc:  # still open in the ledger: the next poll adds the peer back
                raise SessionError(503, f"session {sid} not closed: {exc}") from None
        self._shape("remove_session", sid)
        self.sessions_changed.set()
        log.info("session %s closed (%s): up %d, down %d bytes", sid, reason, s["rx"], s["tx"])
        return self.describe(sid)

    def enforce(self) -> None:
        """Close sessions past expiry, idle too long, or with too much unpaid usage."""
        if self.ledger.full:  # closing needs the ledger: a session is not cut off for the node's full disk
            return
        now = self.clock()
        cap = self.cfg.metering.unpaid_cap_bytes
        idle = self.cfg.sessions.idle_timeout
        with self.lock:
            due = self.ledger.db.execute(
                "SELECT id, CASE WHEN expires <= ?1 THEN 'expired' WHEN ?1 - last_active > ?2 THEN 'idle' "
                "ELSE 'unpaid' END FROM sessions WHERE state = 'open' AND (expires <= ?1 OR ?1 - last_active > ?2 "
                "OR rx + tx - paid_up - paid_down > ?3)", (now, idle, cap)).fetchall()
            # A session that never completed its WireGuard handshake (nothing ever came from the
            # peer, not even the handshake initiation) gives its slot back.
            due = self.ledger.db.execute(
                "SELECT id, 'no_handshake' FROM sessions WHERE state = 'open' AND rx = 0 AND created <= ?",
                (now - self.cfg.sessions.handshake_timeout,)).fetchall() + due
        for sid, reason in dict(due).items():  # the reasons above win over no_handshake
            try:
                self.close_session(sid, reason)
            except SessionError as exc:  # e.g. the disk filled up between the check and the close
                log.warning("closing %s (%s): %s", sid, reason, exc)

    # --- receipts -------------------------------------------------------------------------
    def _issue(self, db, s: dict, buyer: dict | None) -> dict:
        row = db.execute("SELECT seq, body FROM receipts WHERE session = ? ORDER BY seq DESC LIMIT 1",
                         (s["id"],)).fetchone()
        seq, prev = 1, receipts.GENESIS
        if row:
            last = json.loads(row[1])
            seq, prev = row[0] + 1, last["hash"] if receipts.is_checkpoint(last) else receipts.receipt_hash(last)
        # Every receipt binds the buyer key the session was opened with; those issued at and after
        # the close carry the reason as "final": a closed session's chain ends with one.
        r = receipts.make_receipt(self.node_key, s["id"], seq, s["rx"], s["tx"], int(self.clock()), prev, buyer,
                                  buyer_key=s["buyer_key"], final=s["reason"] if s["state"] == "closed" else None)
        db.execute("INSERT INTO receipts VALUES (?, ?, ?)", (s["id"], seq, json.dumps(r, sort_keys=True)))
        if s["state"] == "closed":  # co-signed after the close: retention trims the chain again
            db.execute("UPDATE sessions SET retention = 0 WHERE id = ?", (s["id"],))
        return r

    def cosign(self, sid: str, buyer_key: str, stmt: dict) -> dict:
        """The buyer's signed cumulative usage: check it, count it as paid, answer with a receipt."""
        try:
            return self._cosign(sid, buyer_key, stmt, _UNREAD)
        except _ReadAgain as again:  # claims beyond the last poll: read that peer afresh, then decide
            return self._cosign(sid, buyer_key, stmt, self._peek_peer(again.wg_key))

    def _peek_peer(self, wg_key: str) -> Peer | None:
        """One peer's counters now, read under wg_lock and not the ledger lock (a command runs). Only
        to judge a claim: not recorded, so a poll's older dump can never meet newer baselines (that
        read as a counter reset and counted everything again); the next poll counts the bytes, and
        the receipt states what the ledger holds."""
        with self.wg_lock:
            try:
                return self.tunnel.dump().get(wg_key)
            except WgError as exc:
                log.warning("peer %s: fresh read failed: %s", wg_key, exc)
                return None

    def _cosign(self, sid: str, buyer_key: str, stmt: dict, fresh) -> dict:
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
            tol = self.cfg.metering.tolerance_percent / 100
            s = self._bound_statement(s, stmt, tol, fresh)
            ours = s["rx"] + s["tx"]
            theirs = stmt["up"] + stmt["down"]
            newest = [json.loads(b) for (b,) in self.ledger.db.execute(
                "SELECT body FROM receipts WHERE session = ? ORDER BY seq DESC LIMIT 2", (sid,))]
            last = before = newest[0] if newest else None
            if last and last.get("buyer") and (last["up"], last["down"]) == (s["rx"], s["tx"]) and \
                    (last["buyer"]["up"], last["buyer"]["down"]) == (stmt["up"], stmt["down"]):
                r = last  # nothing moved since the last receipt: no new one (keeps idle sessions small)
                before = newest[1] if len(newest) > 1 else None
            else:
                with self.ledger.tx() as db:
                    db.execute("UPDATE sessions SET paid_up = ?, paid_down = ?, paid_time = ? WHERE id = ?",
                               (stmt["up"], stmt["down"], stmt["time"], sid))
                    r = self._issue(db, s, stmt)
            # held to the count of the receipt before the one acknowledging it: the count the buyer had
            # been answered with before it signed (its own receipt may count more: lag, no disagreement)
            agreed = receipts.acknowledged(before, stmt, tol)
            if not agreed:
                log.warning("session %s: buyer signed %d bytes after the node had counted %d (beyond %.1f%%)", sid,
                            theirs, before["up"] + before["down"], tol * 100)
        return {"receipt": r, "agreed": agreed, "node_bytes": ours, "buyer_bytes": theirs, "state": s["state"],
                "reason": s["reason"]}

    def _bound_statement(self, s: dict, stmt: dict, tol: float, fresh) -> dict:
        """A buyer statement may not claim more than the node measured plus the tolerance (and a poll's
        lag: a claim beyond the last poll's figures raises _ReadAgain once; the caller reads the peer
        afresh outside the ledger lock and passes its counters as `fresh`): paid usage above what was
        carried would hide later unpaid usage from the cut-off. Returns the session as measured.
        Ledger lock held."""
        def beyond(s):
            return [f"{d} {stmt[d]} > {m} + {tol:.0%}" for d, m in (("up", s["rx"]), ("down", s["tx"]))
                    if stmt[d] > m * (1 + tol) + 65536]
        over = beyond(s)
        if over and s["state"] == "open":
            if fresh is _UNREAD:
                raise _ReadAgain(s["wg_key"])
            base = self.ledger.db.execute("SELECT rx_raw, tx_raw FROM peers WHERE wg_key = ? AND session = ?",
                                          (s["wg_key"], s["id"])).fetchone()
            if fresh is not None and base is not None:
                over = beyond({**s, "rx": s["rx"] + max(0, fresh.rx - base[0]),
                               "tx": s["tx"] + max(0, fresh.tx - base[1])})
        if over:
            log.warning("session %s: buyer statement refused, it claims more than the node measured: %s",
                        s["id"], "; ".join(over))
            raise SessionError(409, f"usage: claims more than the node measured ({'; '.join(over)} tolerance)")
        return s

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
        # With a marketplace, a session whose receipts wait in the upload queue is left alone.
        market = 1 if self.cfg.marketplace else 0
        with self.lock:
            if days:
                row = db.execute("SELECT id FROM sessions WHERE state = 'closed' AND retention < 2 AND closed_at < ? "
                                 "AND (? = 0 OR NOT EXISTS (SELECT 1 FROM uploads u WHERE u.session = sessions.id)) "
                                 "ORDER BY closed_at LIMIT 1", (self.clock() - days * 86400, market)).fetchone()
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
                             "AND (? = 0 OR NOT EXISTS (SELECT 1 FROM uploads u WHERE u.session = sessions.id)) "
                             "LIMIT 1", (market,)).fetchone()
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
            # the last settled epoch as the node checked it (market.check_earnings); None off the market
            "earnings": self.earnings,
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
        earned = self.earnings or {}
        if earned.get("epoch") is not None:
            ok = earned.get("state") == "verified"
            lines += [
                ("idlewire_earnings_epoch", "gauge", "Last settled epoch the hub reported", earned["epoch"]),
                ("idlewire_earnings_reward", "gauge", "Reward in that epoch (base units; 0 unless its proof "
                 "verified)", (earned.get("reward") or 0) if ok else 0),
                ("idlewire_earnings_verified", "gauge", "1 when the reward's Merkle proof and the statement "
                 "signature verified", int(ok)),
                ("idlewire_reputation_ppm", "gauge", "Reputation in that epoch (ppm)",
                 earned.get("reputation_ppm") or 0),
                ("idlewire_region_multiplier_ppm", "gauge", "The node's regional multiplier (ppm)",
                 earned.get("multiplier_ppm") or 0),
            ]
        out = []
        for name, kind, help_, value in lines:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"
