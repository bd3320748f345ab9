"""The economy in the hub's database: the pure core (idlewire.economy) run on the hub's own records.

    settle_epoch(engine, cfg)   one epoch, from the verified receipts, heartbeats, probes and flags
                                stored here, through economy.settle.settle() (the only copy of the
                                formulas), into the ledger tables and a signed statement
    stake / unbond / fund       operators' ledger moves (staking.bond / staking.unbond)
    earnings / node_earnings    what a node earned, and its reward leaf + Merkle proof

Consistency with several hub processes: every ledger writer first takes the row lock of the one
`econ_meta` row (SELECT … FOR UPDATE on PostgreSQL; SQLite writers are serialised by BEGIN IMMEDIATE
and the hub's writer lock), and `econ_epochs.epoch` is the primary key: an epoch is settled once;
a second `settle` of it finds it settled and changes nothing. The ledger is read into a
MemoryLedger under that lock, moved by the core, and written back (journal entries + balances) in
the same transaction.

What settlement reads for epoch N = [genesis_at + N·epoch_seconds, + epoch_seconds):
  * usage per session: receipts stored (hub clock) in the epoch; the session's bytes are its newest
    receipt in the epoch minus the receipt before the first one in the epoch (receipts carry
    running totals); the newest is the newest co-signed one (a final receipt the node signed after
    the buyer left proves nothing more, and must not void the session); the buyer's statements are
    held to the node's count in the receipt before each (lag is not disagreement: proof.Usage.seen_bytes);
  * heartbeats: nodes.heartbeats minus what the previous settlement counted (econ_heartbeats), so
    a settlement run late credits the heartbeats up to when it ran (uptime is capped at 100 %);
  * probes stored in the epoch (table `probes`);
  * unserved demand: requests for a region the hub could not place (table `unserved`), one per
    buyer holding tokens, each the epoch's mean buyer session, into the region's demand;
  * equivocation and forged-usage flags created in the epoch → one offence per node and kind, the
    flag ids as evidence (the receipts are in the flags and are copied into the slash's evidence):
    forged usage is a buyer statement in a session the hub sold that its buyer did not sign
    (service.Hub.store_receipts refuses the batch and keeps the node-signed receipts as the flag).
Same database → same statement hash (sorted reads, no clock inside the core).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from idlewire_agent import merkle
from sqlalchemy import delete, func, insert, select, text

from ..economy import ledger as econ_ledger
from ..economy import pricefeed, staking
from ..economy import rules as econ_rules
from ..economy import settle as core
from ..economy.proof import (
    COSIGNED,
    EQUIVOCATION,
    FAILED_PROBES,
    FORGED_USAGE,
    INFLATED_USAGE,
    UNSIGNED,
    NodeReport,
    Offence,
    Probe,
    Usage,
)
from . import db


class EconomyError(ValueError):
    """A refusal; str() is one line naming what and the fix."""


@dataclass(frozen=True)
class Economy:
    rules: econ_rules.Rules
    key: Ed25519PrivateKey
    prices: pricefeed.PriceFeed

    @property
    def hub_key(self) -> str:
        return core.public_b64(self.key)


def _data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "idlewire"


def load_key(path: Path | str | None) -> Ed25519PrivateKey:
    """The hub's statement key (raw 32 bytes, base64, one line); created 0600 on first use."""
    path = Path(path) if path else _data_dir() / "hub-statement.key"
    try:
        raw = base64.b64decode(path.read_text().strip(), validate=True)
        return Ed25519PrivateKey.from_private_bytes(raw)
    except FileNotFoundError:
        pass
    except (ValueError, OSError) as exc:
        raise EconomyError(f"{path}: not a hub statement key (base64 of a raw 32-byte ed25519 key): "
                           f"{exc}; move it away to have a new one made") from None
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(raw).decode() + "\n")
    try:
        os.link(tmp, path)  # another hub process may have made one meanwhile: its key wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return load_key(path)


def load(rules_path=None, key_path=None, prices_path=None) -> Economy:
    """The hub's economy config: rules file (reference rules without), statement key, price file
    (default: $XDG_DATA_HOME/idlewire/prices.csv)."""
    try:
        rules = econ_rules.load_rules(rules_path)
        prices = pricefeed.FilePriceFeed(prices_path or _data_dir() / "prices.csv")
    except (econ_rules.RulesError, pricefeed.PriceError) as exc:
        msg = str(exc)
        if "no such price file" in msg:
            msg += " (the oracle price, lines 'EPOCH,PRICE_USD', e.g. '0,0.25'; or name one with --prices)"
        raise EconomyError(msg) from None
    return Economy(rules, load_key(key_path), prices)


def parse_amount(text_: str, decimals: int) -> int:
    """'12.5' tokens → base units; refuses more decimals than the token has."""
    try:
        d = Decimal(text_)
    except InvalidOperation:
        d = Decimal("NaN")
    units = d * 10**decimals if d.is_finite() else d
    if not units.is_finite() or units <= 0 or units != units.to_integral_value():
        raise EconomyError(f"amount {text_!r}: expected tokens > 0 with at most {decimals} decimals, e.g. 1000 or 0.5")
    return int(units)


def tokens(units: int, decimals: int) -> str:
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), 10**decimals)
    return f"{sign}{whole:,}" + (f".{frac:0{decimals}d}".rstrip("0") if frac else "")


# --- the ledger on the tables ---------------------------------------------------------------------
class DbLedger(econ_ledger.MemoryLedger):
    """The balances read once (under the economy lock), moved in memory by the core's own rules
    (MemoryLedger.transfer: no account but `mint` below zero), written back by flush()."""

    def __init__(self, conn):
        super().__init__(journal=True)
        a = db.econ_accounts.c
        self._bal.update({k: int(v) for k, v in conn.execute(select(a.account, a.balance))})
        self._before = dict(self._bal)

    def flush(self, conn, now: float) -> None:
        if self.journal:
            rows = [{"epoch": e.epoch, "kind": e.kind, "src": e.src, "dst": e.dst, "amount": e.amount,
                     "ref": e.ref, "at": now} for e in self.journal]
            for i in range(0, len(rows), 5000):
                conn.execute(insert(db.econ_entries), rows[i:i + 5000])
        changed = sorted(k for k, v in self._bal.items() if self._before.get(k) != v)
        if changed:
            a = db.econ_accounts.c
            for i in range(0, len(changed), 500):
                conn.execute(delete(db.econ_accounts).where(a.account.in_(changed[i:i + 500])))
            rows = [{"account": k, "balance": self._bal[k]} for k in changed]
            for i in range(0, len(rows), 5000):
                conn.execute(insert(db.econ_accounts), rows[i:i + 5000])
        self.journal = []
        self._before = dict(self._bal)


def _lock(conn, eco: Economy, now: float) -> dict:
    """The economy's row, locked for this transaction; made (with the genesis allocation) on first use.
    Refuses a hub whose rules or statement key differ from the ones the economy was started with."""
    m = db.econ_meta
    dialect = conn.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dinsert
    else:
        from sqlalchemy.dialects.sqlite import insert as dinsert
    r = eco.rules
    made = conn.execute(dinsert(m).values(
        id=1, network=r.name, rules_digest=r.digest(), hub_key=eco.hub_key,
        genesis_at=float(int(now) // r.epoch_seconds * r.epoch_seconds), epoch_seconds=r.epoch_seconds)
        .on_conflict_do_nothing().returning(m.c.id)).first()
    q = select(m).where(m.c.id == 1)
    row = dict(conn.execute(q.with_for_update() if dialect == "postgresql" else q).mappings().one())
    if made is not None:
        ledger = DbLedger(conn)
        econ_ledger.apply_genesis(ledger, r)
        ledger.flush(conn, now)
    if row["rules_digest"] != r.digest():
        raise EconomyError(f"rules: this economy ({row['network']}) was started under rules "
                           f"{row['rules_digest'][:12]}; this hub has {r.digest()[:12]}: give it the same --rules file")
    if row["hub_key"] != eco.hub_key:
        raise EconomyError(f"--key: this economy's statements are signed by {row['hub_key']}; this hub's key is "
                           f"{eco.hub_key}: give it the same statement key file")
    return row


def _next_epoch(conn) -> int:
    got = conn.execute(select(func.max(db.econ_epochs.c.epoch))).scalar()
    return 0 if got is None else int(got) + 1


def epoch_bounds(meta: dict, epoch: int) -> tuple[float, float]:
    start = meta["genesis_at"] + epoch * meta["epoch_seconds"]
    return start, start + meta["epoch_seconds"]


def genesis(engine, eco: Economy, now: float | None = None) -> dict:
    with db.write(engine) as conn:
        return _lock(conn, eco, time.time() if now is None else now)


# --- what the epoch proves, read from the tables --------------------------------------------------
_USAGE = text("""
WITH e AS (
  SELECT node_id, session, min(seq) AS lo,
         coalesce(max(CASE WHEN cosigned THEN seq END), max(seq)) AS hi FROM receipts
  WHERE stored_at >= :t0 AND stored_at < :t1 AND kind = 'receipt' GROUP BY node_id, session)
SELECT e.node_id, e.session, e.hi, h.up + h.down, h.buyer_up + h.buyer_down, h.cosigned,
       b.up + b.down, coalesce(b.buyer_up + b.buyer_down, b.up + b.down), s.buyer_key,
       p.up + p.down, CASE WHEN b.buyer_up IS NULL THEN b.up + b.down ELSE bp.up + bp.down END
FROM e
JOIN receipts h ON h.node_id = e.node_id AND h.session = e.session AND h.seq = e.hi
LEFT JOIN receipts b ON b.node_id = e.node_id AND b.session = e.session AND b.seq = e.lo - 1
LEFT JOIN receipts p ON p.node_id = e.node_id AND p.session = e.session AND p.seq = e.hi - 1
LEFT JOIN receipts bp ON bp.node_id = e.node_id AND bp.session = e.session AND bp.seq = e.lo - 2
LEFT JOIN sessions s ON s.node_id = e.node_id AND s.session = e.session
ORDER BY e.node_id, e.session
""")
# The buyer's statement in a receipt acknowledges what the node had counted in the receipt before it
# (receipts.acknowledged: it lags its own receipt by up to a poll's worth). So the buyer's bytes in
# the epoch, newest statement minus the one before the epoch, are held to the node's count in the
# receipt before each: p (before the newest) minus bp (before the baseline; the baseline's own
# count when it carries no statement, as the buyer's baseline then is).


def _inputs(conn, rules, t0: float, t1: float,
            hub_key: str = "") -> tuple[core.EpochInputs, dict[str, int], dict[str, list]]:
    n = db.nodes.c
    counted = dict(conn.execute(select(db.econ_heartbeats.c.node_id, db.econ_heartbeats.c.counted)).all())
    reports, beats = [], {}
    for nid, region, payout, caps, hb in conn.execute(
            select(n.id, n.region, n.payout_address, n.caps, n.heartbeats).where(n.registered_at < t1).order_by(n.id)):
        cap = json.loads(caps).get("down_mbit") or 0
        beats[nid] = int(hb)
        reports.append(NodeReport(nid, region, payout, round(cap), max(0, int(hb) - int(counted.get(nid, 0)))))
    known = set(beats)
    usage = []
    prober, prober_key = rules.probes.prober_buyer, hub_key
    for nid, sid, hi, nb, bb, cosigned, nb0, bb0, buyer, seen, seen0 in conn.execute(_USAGE, {"t0": t0, "t1": t1}):
        if nid not in known:
            continue
        node_bytes = max(0, int(nb) - int(nb0 or 0))
        if buyer == prober_key:  # the hub's prober buys with the statement key (hub/prober.py)
            buyer = prober
        if cosigned and bb is not None:
            usage.append(Usage(f"{nid}/{sid}/{hi}", nid, buyer or f"unknown:{nid}", node_bytes,
                               max(0, int(bb) - int(bb0 or 0)), COSIGNED,
                               min(node_bytes, max(0, int(seen or 0) - int(seen0 or 0)))))
        else:
            usage.append(Usage(f"{nid}/{sid}/{hi}", nid, buyer or f"unknown:{nid}", node_bytes, 0, UNSIGNED))
    p = db.probes.c
    probes = [Probe(r.id, r.node_id, bool(r.reached), int(r.mbit), int(r.advertised_mbit), int(r.latency_ms))
              for r in conn.execute(select(p.id, p.node_id, p.reached, p.mbit, p.advertised_mbit, p.latency_ms)
                                    .where(p.at >= t0, p.at < t1).order_by(p.id)) if r.node_id in known]
    f = db.flags.c
    evidence: dict[str, list] = {}
    ids: dict[tuple[str, str], list[str]] = {}
    for fid, nid, kind, ev in conn.execute(select(f.id, f.node_id, f.kind, f.evidence).where(
            f.kind.in_((EQUIVOCATION, FORGED_USAGE)), f.created >= t0, f.created < t1).order_by(f.id)):
        if nid in known:
            ids.setdefault((nid, kind), []).append(f"flag:{fid}")
            evidence.setdefault(f"{kind}:{nid}", []).append(json.loads(ev))
    offences = [Offence(nid, kind, tuple(sorted(v))) for (nid, kind), v in sorted(ids.items())]
    unserved = _unserved(conn, t0, t1, [min(u.node_bytes, u.buyer_bytes) for u in usage
                                        if u.status == COSIGNED and u.buyer != prober])
    for pr in probes:  # a failed-probes slash carries the measurements with the probe ids
        evidence.setdefault(f"failed_probes:{pr.node}", []).append(pr._asdict())
    return core.EpochInputs(reports, usage, probes, offences, unserved), beats, evidence


def _unserved(conn, t0: float, t1: float, sessions: list[int]) -> dict[str, int]:
    """Region → demand no node served: each buyer holding tokens whose request for the region the hub
    could not place in the epoch counts once, as much as the epoch's mean buyer session (the prober's
    aside; 1 byte when nothing was served: the multipliers are ratios). A buyer without tokens adds
    nothing (requests cost nothing; the tokens are what a buyer could not spend)."""
    u = db.unserved.c
    asked = conn.execute(select(u.region, u.buyer_key).where(u.at >= t0, u.at < t1).distinct()).all()
    if not asked:
        return {}
    a = db.econ_accounts.c
    accounts = sorted({f"buyer:{k}" for _, k in asked})
    funded = set()
    for i in range(0, len(accounts), 500):
        funded |= {acct for acct, in conn.execute(select(a.account).where(a.account.in_(accounts[i:i + 500]),
                                                                          a.balance > 0))}
    per = sum(sessions) // len(sessions) if sessions else 1
    out: dict[str, int] = {}
    for region, key in asked:
        if f"buyer:{key}" in funded:
            out[region] = out.get(region, 0) + max(1, per)
    return dict(sorted(out.items()))


def _state(conn, epoch: int) -> core.EconomyState:
    st = core.EconomyState(epoch=epoch)
    if epoch:
        prev = conn.execute(select(db.econ_epochs.c.hash, db.econ_epochs.c.statement).where(
            db.econ_epochs.c.epoch == epoch - 1)).one()
        st.prev, st.carry = prev.hash, int(json.loads(prev.statement)["carried_out"])
    rep = db.econ_reputation.c
    st.reputation = {k: int(v) for k, v in conn.execute(select(rep.node_id, rep.reputation_ppm).order_by(rep.node_id))}
    u = db.econ_unbonding.c
    st.unbonding = [staking.Unbonding(r.node_id, int(r.amount), int(r.release_epoch), r.to_account)
                    for r in conn.execute(select(u.node_id, u.amount, u.release_epoch, u.to_account).order_by(u.id))]
    return st


def _replace(conn, table, rows: list[dict]) -> None:
    conn.execute(delete(table))
    for i in range(0, len(rows), 5000):
        conn.execute(insert(table), rows[i:i + 5000])


@dataclass
class Settled:
    epoch: int
    hash: str
    statement: dict
    already: bool = False       # settled before (by this or another hub process): nothing changed
    result: core.EpochResult | None = None


def settle_epoch(engine, eco: Economy, epoch: int | None = None, now: float | None = None) -> Settled:
    """Settle EPOCH (default: the next unsettled one). Refuses an epoch that has not ended or that
    skips one; an epoch settled already is returned as it stands (already=True)."""
    now = time.time() if now is None else now
    genesis(engine, eco, now)  # committed on its own: a refusal below must not undo the genesis
    with db.write(engine) as conn:
        meta = _lock(conn, eco, now)
        nxt = _next_epoch(conn)
        epoch = nxt if epoch is None else epoch
        if epoch < 0:
            raise EconomyError(f"--epoch {epoch}: epochs count from 0")
        if epoch < nxt:
            row = conn.execute(select(db.econ_epochs).where(db.econ_epochs.c.epoch == epoch)).mappings().one()
            return Settled(epoch, row["hash"], json.loads(row["statement"]), already=True)
        if epoch > nxt:
            raise EconomyError(f"--epoch {epoch}: epoch {nxt} is not settled yet; epochs settle in order "
                               f"(run `idlewire hub settle` without --epoch)")
        t0, t1 = epoch_bounds(meta, epoch)
        if now < t1:
            ends = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t1))
            raise EconomyError(f"epoch {epoch} has not ended: it ends at {ends} (in {int(t1 - now) + 1} s)")
        inputs, beats, evidence = _inputs(conn, eco.rules, t0, t1, eco.hub_key)
        state = _state(conn, epoch)
        ledger = DbLedger(conn)
        try:
            price = eco.prices.price_at(epoch)
        except pricefeed.PriceError as exc:
            raise EconomyError(str(exc)) from None
        res = core.settle(eco.rules, state, inputs, price, ledger, eco.key)
        ledger.flush(conn, now)
        st = res.statement
        conn.execute(insert(db.econ_epochs).values(epoch=epoch, hash=res.hash, prev=st["prev"],
                                                   statement=json.dumps(st, sort_keys=True), start=t0, end=t1,
                                                   settled_at=now))
        rows = [{"epoch": epoch, "node_id": r.node, "region": r.region, "payout": r.payout, "reward": r.reward,
                 "verified_bytes": r.verified_bytes, "uptime_ppm": r.uptime_ppm, "reputation_ppm": r.reputation_ppm,
                 "multiplier_ppm": r.multiplier_ppm, "stake": r.stake, "why_not": r.why_not[:200]}
                for r in res.nodes.values()]
        for i in range(0, len(rows), 5000):
            conn.execute(insert(db.econ_rewards), rows[i:i + 5000])
        if st["multipliers"]:
            conn.execute(insert(db.econ_multipliers), [{"epoch": epoch, "region": k, "multiplier_ppm": v}
                                                        for k, v in st["multipliers"].items()])
        if res.slashes:
            def records(s) -> list:  # the receipts or probe measurements behind the evidence ids
                got = evidence.get(f"{s.kind}:{s.node}", [])
                if s.kind == FAILED_PROBES:
                    return [r for r in got if r.get("id") in s.evidence]
                if s.kind == INFLATED_USAGE:  # ids NODE/SESSION/SEQ: the newest receipt of each session
                    rc_ = db.receipts.c
                    return [json.loads(conn.execute(select(rc_.body).where(
                        rc_.node_id == n, rc_.session == sid, rc_.seq == int(seq))).scalar())
                        for n, sid, seq in (e.split("/") for e in s.evidence)]
                return got

            conn.execute(insert(db.econ_slashes), [
                {"epoch": epoch, "node_id": s.node, "kind": s.kind, "amount": s.amount,
                 "evidence": json.dumps({"ids": list(s.evidence), "records": records(s)}, sort_keys=True)}
                for s in res.slashes])
        _replace(conn, db.econ_reputation, [{"node_id": k, "reputation_ppm": v}
                                            for k, v in sorted(state.reputation.items())])
        _replace(conn, db.econ_unbonding, [{"node_id": u.node, "amount": u.amount, "release_epoch": u.release_epoch,
                                            "to_account": u.to} for u in state.unbonding])
        _replace(conn, db.econ_heartbeats, [{"node_id": k, "counted": v} for k, v in sorted(beats.items())])
    return Settled(epoch, res.hash, st, result=res)


def settle_due(engine, eco: Economy, now: float | None = None) -> list[Settled]:
    """Every epoch that has ended and is not settled, in order (the schedule inside `hub serve`)."""
    out = []
    while True:
        try:
            s = settle_epoch(engine, eco, now=now)
        except EconomyError as exc:
            if "has not ended" in str(exc):
                return out
            raise
        out.append(s)


def start_schedule(engine, eco: Economy, every: float, log) -> threading.Thread:
    """`hub serve --settle-every S`: settle due epochs every S seconds in a thread (any number of hub
    processes may run it: the database settles each epoch once)."""
    stop = threading.Event()

    def run():
        while not stop.wait(every):
            try:
                for s in settle_due(engine, eco):
                    log.info("settled epoch %d: statement %s, minted %s", s.epoch, s.hash, s.statement["minted"])
            except Exception as exc:  # the database away, or a refusal: log one line, try next tick
                log.warning("settlement: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    t = threading.Thread(target=run, name="hub-settle", daemon=True)
    t.stop = stop
    t.start()
    return t


# --- probes -------------------------------------------------------------------------------------
def record_probe(engine, node: str, reached: bool, mbit: float, advertised_mbit: float, latency_ms: float,
                 detail: str = "", now: float | None = None) -> dict:
    """Store one probe the hub's prober ran (a short session bought as a buyer would): settlement
    judges it (proof.judge_probes: throughput against the advertised cap, latency) into uptime,
    reputation and, after `probes.slash_after_failures` failures in an epoch, a slash whose
    evidence is the probe ids (the rows hold the measurements)."""
    now = time.time() if now is None else now
    pid = os.urandom(12).hex()
    row = {"id": pid, "node_id": node, "at": now, "reached": bool(reached), "mbit": int(mbit),
           "advertised_mbit": round(advertised_mbit), "latency_ms": round(latency_ms),
           "detail": detail[:500]}
    with db.write(engine) as conn:
        row["node_id"] = _node_row(conn, node)["id"]
        conn.execute(insert(db.probes).values(**row))
    return row


# --- operators ------------------------------------------------------------------------------------
def _node_row(conn, node: str) -> dict:
    n = db.nodes.c
    row = conn.execute(select(n.id, n.payout_address).where((n.id == node) | (n.node_key == node))).first()
    if row is None:
        raise EconomyError(f"node {node!r}: not registered here (see `idlewire hub nodes`)")
    return {"id": row.id, "payout": row.payout_address}


def stake(engine, eco: Economy, node: str, amount: int, src: str | None = None, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    with db.write(engine) as conn:
        _lock(conn, eco, now)
        nd = _node_row(conn, node)
        src = src or f"payout:{nd['payout']}"
        ledger = DbLedger(conn)
        try:
            staking.bond(ledger, _next_epoch(conn), nd["id"], src, amount)
        except staking.StakeError as exc:
            raise EconomyError(f"{exc}; fund it first or name another --from account") from None
        ledger.flush(conn, now)
        return {"node": nd["id"], "from": src, "bonded": ledger.balance(staking.stake_account(nd["id"]))}


def unbond(engine, eco: Economy, node: str, amount: int, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    with db.write(engine) as conn:
        _lock(conn, eco, now)
        nd = _node_row(conn, node)
        epoch = _next_epoch(conn)
        queue = _state(conn, epoch).unbonding
        ledger = DbLedger(conn)
        try:
            u = staking.unbond(eco.rules, ledger, queue, epoch, nd["id"], amount, f"payout:{nd['payout']}")
        except staking.StakeError as exc:
            raise EconomyError(str(exc)) from None
        ledger.flush(conn, now)
        conn.execute(insert(db.econ_unbonding).values(node_id=u.node, amount=u.amount, release_epoch=u.release_epoch,
                                                       to_account=u.to))
        return {"node": nd["id"], "unbonding": u.amount, "release_epoch": u.release_epoch, "to": u.to,
                "bonded": ledger.balance(staking.stake_account(nd["id"]))}


def fund(engine, eco: Economy, account: str, amount: int, src: str, now: float | None = None) -> dict:
    """Move tokens between plain accounts (e.g. treasury → buyer:KEY); stake accounts move only by
    stake/unbond, system accounts never by hand."""
    now = time.time() if now is None else now
    for a in (account, src):
        if a in (econ_ledger.MINT, econ_ledger.BURN, econ_ledger.SLASHED) or a.startswith(("stake:", "unbonding:")) \
                or not a.isprintable() or not 0 < len(a) <= 200:
            raise EconomyError(f"account {a!r}: not one to move tokens by hand (system or stake account, or "
                               f"unprintable); use stake/unbond for stakes")
    with db.write(engine) as conn:
        _lock(conn, eco, now)
        ledger = DbLedger(conn)
        try:
            ledger.transfer(_next_epoch(conn), "transfer", src, account, amount, "by hand")
        except econ_ledger.Overdraft as exc:
            raise EconomyError(str(exc)) from None
        ledger.flush(conn, now)
        return {"from": src, "to": account, "amount": amount, "balance": ledger.balance(account)}


# --- reading ------------------------------------------------------------------------------------
def epochs(engine, limit: int = 100) -> list[dict]:
    e = db.econ_epochs.c
    with db.read(engine) as conn:
        rows = conn.execute(select(e.epoch, e.hash, e.statement, e.start, e.end).order_by(e.epoch.desc())
                            .limit(limit)).all()
    out = []
    for r in rows:
        s = json.loads(r.statement)
        out.append({"epoch": r.epoch, "hash": r.hash, "start": r.start, "end": r.end,
                    **{k: s[k] for k in ("emission", "minted", "burned", "slashed", "supply", "carried_out",
                                         "rewarded", "price_micro_usd", "merkle_root")},
                    "multipliers": s["multipliers"]})
    return out


def statement(engine, epoch: int | None = None) -> dict | None:
    e = db.econ_epochs.c
    q = select(e.statement)
    q = q.where(e.epoch == epoch) if epoch is not None else q.order_by(e.epoch.desc()).limit(1)
    with db.read(engine) as conn:
        got = conn.execute(q).scalar()
    return json.loads(got) if got else None


def earnings(engine, node: str | None = None, epoch: int | None = None) -> list[dict]:
    """Rewards per node: the last settled epoch's (or EPOCH's) for every node, or every epoch of NODE
    (id or node key), with its payout balance and stake now."""
    r = db.econ_rewards.c
    with db.read(engine) as conn:
        q = select(db.econ_rewards)
        if node:
            nid = _node_row(conn, node)["id"]
            q = q.where(r.node_id == nid).order_by(r.epoch.desc())
            if epoch is not None:
                q = q.where(r.epoch == epoch)
        else:
            if epoch is None:
                epoch = conn.execute(select(func.max(r.epoch))).scalar()
                if epoch is None:
                    return []
            q = q.where(r.epoch == epoch).order_by(r.reward.desc(), r.node_id)
        rows = [dict(x) for x in conn.execute(q).mappings()]
        accts = {f"payout:{x['payout']}" for x in rows} | {f"stake:{x['node_id']}" for x in rows}
        a = db.econ_accounts.c
        bal = dict(conn.execute(select(a.account, a.balance).where(a.account.in_(sorted(accts)))).all()) \
            if accts else {}
    for x in rows:
        x["payout_balance"] = int(bal.get(f"payout:{x['payout']}", 0))
        x["stake_now"] = int(bal.get(f"stake:{x['node_id']}", 0))
    return rows


def balances(engine, prefix: str = "") -> dict[str, int]:
    a = db.econ_accounts.c
    with db.read(engine) as conn:
        return {k: int(v) for k, v in conn.execute(select(a.account, a.balance).where(
            a.account.startswith(prefix, autoescape=True)).order_by(a.account))}


_trees: dict[tuple[int, str], list[list[bytes]]] = {}  # (epoch, statement hash) → tree: a cache, not state


def node_earnings(engine, nid: str) -> dict:
    """What GET /v1/nodes/{nid}/earnings answers: the last settled epoch's signed statement, the
    node's reward leaf and its Merkle proof (leaf and proof null when it earned nothing, with why)."""
    e, r = db.econ_epochs.c, db.econ_rewards.c
    with db.read(engine) as conn:
        last = conn.execute(select(e.epoch, e.hash, e.statement).order_by(e.epoch.desc()).limit(1)).first()
        if last is None:
            return {"statement": None, "leaf": None, "proof": None, "why_not": "no epoch settled yet"}
        mine = conn.execute(select(db.econ_rewards).where(r.epoch == last.epoch, r.node_id == nid)).mappings().first()
        st = json.loads(last.statement)
        out = {"statement": st, "leaf": None, "proof": None, "region": None, "why_not": "not seen in this epoch"}
        if mine is None:
            return out
        out.update(region=mine["region"], why_not=mine["why_not"], stake=int(mine["stake"]),
                   reputation_ppm=mine["reputation_ppm"], multiplier_ppm=mine["multiplier_ppm"],
                   uptime_ppm=mine["uptime_ppm"], verified_bytes=int(mine["verified_bytes"]))
        if not mine["reward"]:
            return out
        levels = _trees.get((last.epoch, last.hash))
        if levels is None:
            rewarded = [_result(x) for x in conn.execute(select(db.econ_rewards).where(
                r.epoch == last.epoch, r.reward > 0).order_by(r.node_id)).mappings()]
            levels = core.reward_tree(last.epoch, rewarded)
            _trees.clear()
            _trees[(last.epoch, last.hash)] = levels
            index = [x.node for x in rewarded].index(nid)
        else:
            index = conn.execute(select(func.count()).where(r.epoch == last.epoch, r.reward > 0,
                                                             r.node_id < nid)).scalar()
    out["leaf"] = core.reward_leaf(last.epoch, _result(mine))
    out["proof"] = merkle.proof(levels, index)
    return out


def _result(row) -> core.NodeResult:
    return core.NodeResult(row["node_id"], row["region"], row["payout"], int(row["verified_bytes"]), row["uptime_ppm"],
                           row["reputation_ppm"], row["multiplier_ppm"], int(row["stake"]), reward=int(row["reward"]))
