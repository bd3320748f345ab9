#!/usr/bin/env python3
"""One epoch's settlement at scale: 10,000 nodes and 1,000,000 verified receipts, through the pure core
and through the hub's database (SQLite and a PostgreSQL the bench starts itself).

    .venv/bin/python bench/settle.py [--nodes 10000] [--receipts 1000000] [--db memory,sqlite,postgresql] [--json]

Builds a seeded population (8 regions, 5 % cheaters: inflated usage, failed probes, forged
co-signatures; 1 probe per 4 nodes; every node staked) and settles one epoch with
idlewire.economy.settle.settle() on the in-memory ledger, as the hub will inside a database
transaction: usage verification and aggregation, slashing with evidence, burns, multipliers,
reputation, the mint, the Merkle tree over the rewards and the signed statement. Then a sample of
rewarded nodes check their inclusion proof as the node would (idlewire_agent.merkle.check_reward).

With --db sqlite / postgresql the same kind of population is written into a hub database (nodes,
sessions, 1,000,000 receipt rows = 10 per session, heartbeats, probes, stakes and buyer balances in
the ledger tables; written directly, not through the upload API: that is bench/hub.py's job) and
`idlewire hub settle`'s function (hub.economy.settle_epoch) is timed: the SQL that reads the epoch,
the core, and the writes of the ledger, rewards and statement, in one transaction; then a sample of
nodes fetch their proof as GET /v1/nodes/{id}/earnings builds it and check it.

Prints wall and CPU seconds per phase and the ratio against the goal (≤ 30 s on 2 cores). On a
shared machine the CPU figure is the one to compare for the pure core: wall time includes waiting
for a core (and, for PostgreSQL, the server's own CPU, which the bench process does not see).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "agent"), str(REPO / "tools")]

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from idlewire.economy.ledger import MemoryLedger, apply_genesis  # noqa: E402
from idlewire.economy.proof import COSIGNED, FORGED, NodeReport, Probe, Usage  # noqa: E402
from idlewire.economy.rules import Rules  # noqa: E402
from idlewire.economy.settle import EconomyState, EpochInputs, public_b64, settle  # noqa: E402
from idlewire.economy.staking import bond  # noqa: E402
from idlewire_agent import merkle  # noqa: E402

GOAL_SECONDS = 30.0
REGIONS = ["US", "DE", "JP", "GB", "IN", "BR", "NG", "KE"]


class Clock:
    def __init__(self):
        self.rows: dict[str, tuple[float, float]] = {}

    def __call__(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                self.t, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                clock.rows[name] = (time.perf_counter() - self.t, time.process_time() - self.c)

        return _Phase()


def population(rules: Rules, nodes: int, receipts: int, seed: int):
    rnd = random.Random(seed)
    ids = [f"node{i:06d}" for i in range(nodes)]
    ledger = MemoryLedger()
    apply_genesis(ledger, rules)
    for i, n in enumerate(ids):
        ledger.transfer(0, "transfer", "market", f"payout:p{i}", rules.staking.min_stake)
        bond(ledger, 0, n, f"payout:p{i}", rules.staking.min_stake)
    buyers = [f"buyer{i}" for i in range(1000)]
    for b in buyers:
        ledger.transfer(0, "transfer", "market", f"buyer:{b}", 10**9 * 10**rules.market.decimals // 10**6)
    hb = rules.epoch_seconds // rules.probes.heartbeat_seconds
    reports = [NodeReport(n, REGIONS[i % 8], f"p{i}", rnd.choice((20, 50, 100, 300)), hb - rnd.randrange(30))
               for i, n in enumerate(ids)]
    kind = {n: rnd.choices(("honest", "inflate", "fake", "forge"), (95, 2, 2, 1))[0] for n in ids}
    usage = []
    for r in range(receipts):
        n = ids[r % nodes]
        b = rnd.randrange(1, 50_000_000)
        k = kind[n]
        nb = b * 2 if k == "inflate" and r % 7 == 0 else b
        usage.append(Usage(f"rcpt{r:07d}", n, buyers[r % 1000], nb, b, FORGED if k == "forge" and r % 5 == 0
                           else COSIGNED))
    probes = []
    for i, n in enumerate(ids[::4]):
        cap = reports[i * 4].cap_mbit
        got = cap // 10 if kind[n] == "fake" else cap * 9 // 10
        probes += [Probe(f"probe{i}-{t}", n, True, got, cap, 30) for t in range(3 if kind[n] == "fake" else 1)]
    return ledger, EpochInputs(reports, usage, probes, [], {"NG": 10**12})


SESSION_RECEIPTS = 10


def db_population(url: str, rules: Rules, key, nodes: int, receipts: int, seed: int):
    """A hub database holding one day's epoch: (engine, economy, time the epoch ends)."""
    import tempfile

    from idlewire.hub import db
    from idlewire.hub import economy as eco_db
    from sqlalchemy import insert

    rnd = random.Random(seed)
    engine = db.make_engine(url)
    db.migrate(engine)
    prices = Path(tempfile.mkstemp(suffix=".csv")[1])
    prices.write_text("0,0.25\n")
    eco = eco_db.Economy(rules, key, eco_db.pricefeed.FilePriceFeed(prices))
    t0 = 1_800_000_000 // rules.epoch_seconds * rules.epoch_seconds
    eco_db.genesis(engine, eco, now=t0)
    hb = rules.epoch_seconds // rules.probes.heartbeat_seconds
    ids = [f"n{i:019d}" for i in range(nodes)]
    kind = {n: rnd.choices(("honest", "inflate", "fake"), (95, 3, 2))[0] for n in ids}
    caps = {n: rnd.choice((20, 50, 100, 300)) for n in ids}
    node_rows = [{"id": n, "node_key": f"key{i}", "wg_key": "", "payout": "{}", "payout_address": f"p{i}", "unit": "",
                  "region": REGIONS[i % 8], "location": "", "caps": json.dumps({"down_mbit": caps[n], "up_mbit": 10,
                  "max_sessions": 4}), "max_sessions": 4, "price_per_gb": 0.5, "endpoint": "", "version": "1",
                  "registered_at": t0 - 1, "last_seen": t0, "channel_seen": 0, "uptime": 0, "open_sessions": 0,
                  "heartbeats": hb - rnd.randrange(30)} for i, n in enumerate(ids)]
    sessions = max(1, receipts // SESSION_RECEIPTS)
    buyers = [f"buyer{i}" for i in range(1000)]
    sess_rows = [{"node_id": ids[j % nodes], "session": f"s{j:015d}", "buyer_key": buyers[j % 1000],
                  "state": "closed", "opened_at": t0, "updated_at": t0, "head": "", "stored_seq": SESSION_RECEIPTS,
                  "up": 0, "down": 0, "paid_up": 0, "paid_down": 0} for j in range(sessions)]

    def receipt_rows(lo: int, hi: int):
        out = []
        for j in range(lo, hi):
            n = ids[j % nodes]
            step = rnd.randrange(1, 5_000_000)
            inflate = kind[n] == "inflate" and j % 7 == 0
            for seq in range(1, SESSION_RECEIPTS + 1):
                b = step * seq
                out.append({"node_id": n, "session": f"s{j:015d}", "seq": seq, "hash": f"{j:032x}{seq:032x}",
                            "kind": "receipt", "up": 0, "down": b * 2 if inflate else b, "time": t0 + seq,
                            "cosigned": True, "buyer_up": 0, "buyer_down": b, "body": "{}",
                            "stored_at": t0 + (j * 7 + seq * 600) % rules.epoch_seconds})
        return out

    probes = []
    for i, n in enumerate(ids[::4]):
        got = caps[n] // 10 if kind[n] == "fake" else caps[n] * 9 // 10
        probes += [{"id": f"probe{i}-{t}", "node_id": n, "at": t0 + 60 * t, "reached": True, "mbit": got,
                    "advertised_mbit": caps[n], "latency_ms": 30, "detail": ""}
                   for t in range(3 if kind[n] == "fake" else 1)]
    with db.write(engine) as conn:
        for table, rows in ((db.nodes, node_rows), (db.sessions, sess_rows), (db.probes, probes)):
            for i in range(0, len(rows), 20_000):
                conn.execute(insert(table), rows[i:i + 20_000])
        for j in range(0, sessions, 2000):
            conn.execute(insert(db.receipts), receipt_rows(j, min(sessions, j + 2000)))
        eco_db._lock(conn, eco, t0)
        ledger = eco_db.DbLedger(conn)
        for i, n in enumerate(ids):
            ledger.transfer(0, "transfer", "market", f"payout:p{i}", rules.staking.min_stake)
            bond(ledger, 0, n, f"payout:p{i}", rules.staking.min_stake)
        for b in buyers:
            ledger.transfer(0, "transfer", "market", f"buyer:{b}", 10**9 * 10**rules.market.decimals // 10**6)
        ledger.flush(conn, t0)
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
    return engine, eco, t0 + rules.epoch_seconds + 1, prices


def bench_db(backend: str, a, rules: Rules, key) -> dict:
    from idlewire.hub import economy as eco_db

    pg = None
    tmp = None
    if backend == "sqlite":
        import tempfile

        tmp = tempfile.mkdtemp(prefix="settle-bench-")
        url = f"sqlite:///{tmp}/hub.sqlite"
    else:
        sys.path.insert(0, str(REPO / "tests" / "hub"))
        from hublab import Postgres, postgres_missing

        why = postgres_missing()
        if why:
            return {"backend": backend, "skipped": why}
        pg = Postgres().start()
        url = pg.new_database("settlebench")
    clock = Clock()
    try:
        with clock("generate + write (not counted)"):
            engine, eco, end, prices = db_population(url, rules, key, a.nodes, a.receipts, a.seed)
        with clock("hub settle (SQL + core + writes)"):
            s = eco_db.settle_epoch(engine, eco, now=end)
        rewarded = [r["node_id"] for r in eco_db.earnings(engine) if r["reward"]]
        sample = random.Random(a.seed).sample(rewarded, min(len(rewarded), a.proofs))
        with clock(f"{len(sample)} nodes fetch + check their proof"):
            bad = 0
            for n in sample:
                got = eco_db.node_earnings(engine, n)
                bad += merkle.check_reward(got["statement"], got["leaf"], got["proof"], n, eco.hub_key) is not None
        with clock("second settle of the epoch (no-op)"):
            again = eco_db.settle_epoch(engine, eco, epoch=0, now=end)
        engine.dispose()
        prices.unlink()
    finally:
        if pg is not None:
            pg.stop()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    wall, cpu = clock.rows["hub settle (SQL + core + writes)"]
    st = s.statement
    return {"backend": backend, "settle_wall_s": round(wall, 2), "settle_cpu_s": round(cpu, 2),
            "goal_ratio_wall": round(GOAL_SECONDS / wall, 1), "rewarded": st["rewarded"], "slashes": len(st["slashes"]),
            "minted": st["minted"], "burned": st["burned"], "proofs_failed": bad, "statement": s.hash,
            "second_settle_noop": again.already and again.hash == s.hash,
            "phases": {k: {"wall_s": round(w, 2), "cpu_s": round(c, 2)} for k, (w, c) in clock.rows.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--receipts", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--proofs", type=int, default=200, help="Rewarded nodes (a random sample) that check their "
                    "inclusion proof as the node would (each verifies the statement's signature).")
    ap.add_argument("--db", default="memory,sqlite,postgresql", help="Comma-separated: memory (the pure core "
                    "on the in-memory ledger), sqlite, postgresql (a temporary server the bench starts).")
    ap.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    a = ap.parse_args()
    backends = [b.strip() for b in a.db.split(",") if b.strip()]
    unknown = set(backends) - {"memory", "sqlite", "postgresql"}
    if unknown:
        ap.error(f"--db {a.db}: unknown {', '.join(sorted(unknown))}; expected memory, sqlite, postgresql")
    if "memory" not in backends:
        return report_db(a, backends)
    rules = Rules()
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    clock = Clock()
    with clock("generate (not counted)"):
        ledger, inputs = population(rules, a.nodes, a.receipts, a.seed)
    with clock("settle"):
        res = settle(rules, EconomyState(), inputs, 250_000, ledger, key)
    sample = random.Random(a.seed).sample(res.rewarded, min(len(res.rewarded), a.proofs))
    with clock(f"{len(sample)} nodes check their proof"):
        hub = public_b64(key)
        bad = sum(merkle.check_reward(res.statement, *res.inclusion_proof(r.node), r.node, hub) is not None
                  for r in sample)
    wall, cpu = clock.rows["settle"]
    s = res.statement
    figures = {"nodes": a.nodes, "receipts": a.receipts, "settle_wall_s": round(wall, 2), "settle_cpu_s": round(cpu, 2),
               "receipts_per_cpu_s": round(a.receipts / cpu) if cpu else None, "goal_s": GOAL_SECONDS,
               "goal_ratio_cpu": round(GOAL_SECONDS / cpu, 1) if cpu else None,
               "rewarded": s["rewarded"], "slashes": len(s["slashes"]), "minted": s["minted"], "burned": s["burned"],
               "proofs_failed": bad, "statement": res.hash,
               "phases": {k: {"wall_s": round(w, 2), "cpu_s": round(c, 2)} for k, (w, c) in clock.rows.items()}}
    if a.json:
        print(json.dumps(figures, indent=1))
    else:
        for name, (w, c) in clock.rows.items():
            print(f"{name:30} {w:7.2f} s wall  {c:7.2f} s CPU")
        print(f"one epoch, {a.nodes:,} nodes, {a.receipts:,} receipts: {cpu:.2f} s CPU ({wall:.2f} s wall) — "
              f"{figures['goal_ratio_cpu']}x inside the {GOAL_SECONDS:.0f} s goal; "
              f"{figures['receipts_per_cpu_s']:,} receipts/s per core")
        print(f"rewarded {s['rewarded']:,} nodes, {len(s['slashes'])} slashes with evidence, "
              f"{bad} of {len(sample)} inclusion proofs checked failed; statement {res.hash[:16]}…")
    if bad:
        sys.exit(1)
    if len(backends) > 1:
        report_db(a, [b for b in backends if b != "memory"], core_cpu=cpu)


def report_db(a, backends: list[str], core_cpu: float | None = None) -> None:
    rules = Rules()
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    rows = [bench_db(b, a, rules, key) for b in backends]
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            if "skipped" in r:
                print(f"{r['backend']}: skipped ({r['skipped']})")
                continue
            print(f"--- {r['backend']}: one epoch from the database, {a.nodes:,} nodes, {a.receipts:,} receipts")
            for name, ph in r["phases"].items():
                print(f"{name:40} {ph['wall_s']:7.2f} s wall  {ph['cpu_s']:7.2f} s CPU (this process)")
            ratio = f" (the pure core alone, on its own population above: {core_cpu:.2f} s CPU)" if core_cpu else ""
            print(f"{r['backend']}: settle {r['settle_wall_s']:.2f} s wall — {r['goal_ratio_wall']}x inside the "
                  f"{GOAL_SECONDS:.0f} s goal{ratio}; rewarded {r['rewarded']:,}, {r['slashes']} slashes, "
                  f"{r['proofs_failed']} proofs failed, second settle a no-op: {r['second_settle_noop']}; "
                  f"statement {r['statement'][:16]}…")
    if any(r.get("proofs_failed") or r.get("second_settle_noop") is False for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
