#!/usr/bin/env python3
"""One epoch's settlement at scale: 10,000 nodes and 1,000,000 verified receipts through the pure core.

    .venv/bin/python bench/settle.py [--nodes 10000] [--receipts 1000000] [--json]

Builds a seeded population (8 regions, 5 % cheaters: inflated usage, failed probes, forged
co-signatures; 1 probe per 4 nodes; every node staked) and settles one epoch with
idlewire.economy.settle.settle() on the in-memory ledger, as the hub will inside a database
transaction: usage verification and aggregation, slashing with evidence, burns, multipliers,
reputation, the mint, the Merkle tree over the rewards and the signed statement. Then a sample of
rewarded nodes check their inclusion proof as the node would (idlewire_agent.merkle.check_reward).

Prints wall and CPU seconds per phase and the ratio against the goal (≤ 30 s on 2 cores). On a
shared machine the CPU figure is the one to compare: wall time includes waiting for a core.
The database side (SQLite, PostgreSQL) is measured once the hub is merged.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--receipts", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--proofs", type=int, default=200, help="Rewarded nodes (a random sample) that check their "
                    "inclusion proof as the node would (each verifies the statement's signature).")
    ap.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    a = ap.parse_args()
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


if __name__ == "__main__":
    main()
