"""`idlewire economy simulate`: the settlement code driven by a seeded population, no network.

A population of nodes in regions (shares of nodes and of demand differ, so some regions are
underserved), a demand curve (growth plus a weekly swing), cheaters (nodes that advertise ten
times the speed they deliver and so fail probes; nodes that inflate their usage above what buyers
co-sign), churn (nodes leave; new ones join where rewards per node are highest: the flywheel), and
a token market (owners sell part of their rewards, buyers buy the tokens they burn, the price
moves with the tokens buyers want against the tokens owners sell). Each epoch calls
settle.settle() exactly as the hub does, on an in-memory ledger; numpy only draws the population.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import PPM
from .ledger import MemoryLedger, apply_genesis, supply
from .proof import COSIGNED, Probe, Usage
from .proof import NodeReport as Report
from .rules import Rules
from .settle import EconomyState, EpochInputs, settle, tokens_for
from .staking import bond, stake_account, unbond

# region: (share of nodes at the start, share of demand)
REGIONS = {"US": (0.32, 0.22), "DE": (0.20, 0.14), "JP": (0.12, 0.08), "GB": (0.10, 0.10), "IN": (0.10, 0.16),
           "BR": (0.08, 0.12), "NG": (0.04, 0.10), "KE": (0.04, 0.08)}
CAPS = np.array([20, 50, 100, 300])
BYTES_PER_GB = 10**9
PROBE_BYTES = 50 * 10**6   # what one probe session moves
_new = tuple.__new__


@dataclass
class SimConfig:
    nodes: int = 1000
    epochs: int = 90
    seed: int = 1
    gb_per_node: float = 2.0          # demand at the start, GB per node per epoch
    growth: float = 0.005             # demand growth per epoch
    churn: float = 0.004              # share of nodes leaving per epoch
    fake_speed: float = 0.03          # share of new nodes that advertise 10x what they deliver
    inflaters: float = 0.02           # share of new nodes that sometimes claim 30 % more than buyers co-sign
    sell: float = 0.6                 # share of its reward an owner sells to the market each epoch
    price_usd: float = 0.25           # oracle price at genesis
    probe_rate: float = 0.25          # chance a node is probed in an epoch (3 probes when the first fails)


@dataclass
class SimResult:
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    statement_hashes: list[str] = field(default_factory=list)


class _Pop:
    """Column arrays, one slot per node ever created."""

    def __init__(self, size: int):
        self.region = np.zeros(size, dtype=np.int64)
        self.cap = np.zeros(size, dtype=np.int64)
        self.reliab = np.zeros(size)
        self.kind = np.zeros(size, dtype=np.int64)     # 0 honest, 1 fake speed, 2 inflater
        self.alive = np.zeros(size, dtype=bool)
        self.n = 0


def _price_step(price: int, wanted: int, sold: int) -> int:
    """The market: tokens buyers want at this price against tokens owners sold; excess demand lifts
    the price, excess supply lowers it (at most 5 % an epoch). Its rest point is burned = sold."""
    if sold <= 0:
        return price * 105 // 100 if wanted else price
    change = max(-0.05, min(0.05, 0.05 * (wanted - sold) / sold))
    return max(1, round(price * (1 + change)))


def run(rules: Rules, cfg: SimConfig, progress=None) -> SimResult:
    """Settle CFG.epochs epochs of a seeded population under RULES.

    Each epoch allocates a few container objects per node (records, results) that live into the
    next one; with the collector's default thresholds a 10,000-node year ran ~270 full collections,
    each walking every live object. The collector stays on, at a coarser cadence, for the run only."""
    before = gc.get_threshold()
    gc.set_threshold(100_000, 50, 100)
    try:
        return _run(rules, cfg, progress)
    finally:
        gc.set_threshold(*before)


def _run(rules: Rules, cfg: SimConfig, progress) -> SimResult:
    t0, c0 = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(cfg.seed)
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))   # the simulated hub's key (fixed: reproducible)
    codes = list(REGIONS)
    node_share = np.array([REGIONS[c][0] for c in codes])
    demand_share = np.array([REGIONS[c][1] for c in codes])
    ledger = MemoryLedger(journal=False)
    apply_genesis(ledger, rules)
    market = "market"
    state = EconomyState()
    pop = _Pop(cfg.nodes * 4 + 16)
    price = max(1, round(cfg.price_usd * 1e6))
    dec = 10**rules.market.decimals
    min_stake = rules.staking.min_stake
    expected_hb = max(1, rules.epoch_seconds // rules.probes.heartbeat_seconds)
    secs_bytes = rules.epoch_seconds * 125_000
    ids: list[str] = []        # per node slot: its id, payout address, payout account (built once)
    payouts: list[str] = []
    payout_accounts: list[str] = []
    prober = rules.probes.prober_buyer

    def join(count_per_region: np.ndarray, epoch: int) -> None:
        for ri, count in enumerate(count_per_region.tolist()):
            for _ in range(int(count)):
                i = pop.n
                if i >= len(pop.alive):
                    return
                pop.n += 1
                pop.region[i] = ri
                pop.cap[i] = CAPS[rng.integers(0, len(CAPS))]
                pop.reliab[i] = rng.uniform(0.85, 1.0)
                u = rng.random()
                pop.kind[i] = 1 if u < cfg.fake_speed else 2 if u < cfg.fake_speed + cfg.inflaters else 0
                pop.alive[i] = True
                nid = f"n{i:06d}"
                ids.append(nid)
                payouts.append(f"p{i:06d}")
                payout_accounts.append(payout := f"payout:{payouts[-1]}")
                stake = min_stake * int(rng.integers(1, 4))
                if ledger.balance(market) >= stake:
                    ledger.transfer(epoch, "transfer", market, payout, stake, "buy stake")
                    bond(ledger, epoch, nid, payout, stake)

    join(np.round(node_share * cfg.nodes).astype(np.int64), 0)
    result = SimResult()
    reward_per_node = np.ones(len(codes))
    for epoch in range(cfg.epochs):
        # churn: some leave (unbonding their stake), new ones join where rewards per node are highest
        alive_idx = np.flatnonzero(pop.alive[:pop.n])
        leaving = alive_idx[rng.random(len(alive_idx)) < cfg.churn]
        for i in leaving.tolist():
            pop.alive[i] = False
            nid = ids[i]
            bonded = ledger.balance(stake_account(nid))
            if bonded:
                unbond(rules, ledger, state.unbonding, epoch, nid, bonded, payout_accounts[i])
        if epoch:
            attract = reward_per_node / max(reward_per_node.mean(), 1e-12)
            weights = node_share * attract
            weights /= weights.sum()
            join(rng.multinomial(rng.poisson(cfg.churn * cfg.nodes * 1.02), weights), epoch)
        alive = np.flatnonzero(pop.alive[:pop.n])
        region, cap, kind = pop.region[alive], pop.cap[alive], pop.kind[alive]
        delivered_cap = np.where(kind == 1, cap // 10, cap)

        # demand per region, served by the region's nodes up to 30 % of their delivered capacity
        weekly = 1 + 0.1 * math.sin(2 * math.pi * epoch / 7)
        total_gb = cfg.nodes * cfg.gb_per_node * (1 + cfg.growth) ** epoch * weekly
        demand = rng.poisson(demand_share * total_gb * 1000) * (BYTES_PER_GB // 1000)
        capacity = delivered_cap * secs_bytes * 3 // 10
        region_cap = np.bincount(region, weights=capacity, minlength=len(codes))
        served_ratio = np.minimum(1.0, demand / np.maximum(region_cap, 1))
        online = rng.random(len(alive)) > 0.02
        served = (capacity * served_ratio[region] * online * rng.uniform(0.7, 1.3, len(alive))).astype(np.int64)
        unserved = np.maximum(0, demand - np.bincount(region, weights=served, minlength=len(codes))).astype(np.int64)
        hb = np.where(online, (expected_hb * pop.reliab[alive]).astype(np.int64), 0)
        inflate = (kind == 2) & (rng.random(len(alive)) < 0.3)
        probed = rng.random(len(alive)) < cfg.probe_rate

        # the epoch's records, as the hub would hand them to settlement
        # Built column-wise by C-level map/zip (tuple.__new__ is what the NamedTuple's own constructor
        # calls); the order of the records does not matter to settle(). Only probed nodes are looped over.
        alive_list = alive.tolist()
        node_ids = list(map(ids.__getitem__, alive_list))
        node_codes = list(map(codes.__getitem__, region.tolist()))
        caps = cap.tolist()
        nodes = list(map(_new, repeat(Report), zip(node_ids, node_codes, map(payouts.__getitem__, alive_list), caps,
                                                   hb.tolist(), strict=True)))
        sessions = np.flatnonzero(served).tolist()
        who = list(map(node_ids.__getitem__, sessions))
        claimed = np.where(inflate, served * 13 // 10, served)
        suffix = f"/e{epoch}"
        usage = list(map(_new, repeat(Usage), zip(map(str.__add__, who, repeat(suffix)), who,
                                                  map(node_codes.__getitem__, sessions),
                                                  claimed[sessions].tolist(), served[sessions].tolist(),
                                                  repeat(COSIGNED), repeat(None))))
        probes = []
        heard = probed & (hb > 0)   # the prober reaches a node that is up
        probe_suffix, inflated_suffix = f"{suffix}/p", f"{suffix}/probe"
        for j, k, inf in zip(np.flatnonzero(heard).tolist(), kind[heard].tolist(), inflate[heard].tolist(),
                             strict=True):
            nid, c = node_ids[j], caps[j]
            got = c // 10 if k == 1 else c * 9 // 10
            for t in range(1 if k != 1 else 3):
                probes.append(_new(Probe, (f"{nid}{probe_suffix}{t}", nid, True, got, c, 40)))
            if inf:   # an inflater inflates the prober's session too, and the prober's word is enough
                usage.append(_new(Usage, (nid + inflated_suffix, nid, prober, PROBE_BYTES * 13 // 10, PROBE_BYTES,
                                          COSIGNED, None)))
        # buyers buy from the market the tokens they will burn
        wanted = 0
        served_region = np.bincount(region, weights=served, minlength=len(codes)).astype(np.int64).tolist()
        for ri, code in enumerate(codes):
            need, _ = tokens_for(rules, served_region[ri], price)
            wanted += need
            ledger.transfer(epoch, "transfer", market, f"buyer:{code}", min(need, ledger.balance(market)), "buy")
        unserved_by = dict(zip(codes, unserved.tolist(), strict=True))
        res = settle(rules, state, EpochInputs(nodes, usage, probes, [], unserved_by), price, ledger, key)
        st = res.statement
        # owners sell part of what they earned
        count_region = np.bincount(region, minlength=len(codes)).astype(float)
        sell = round(cfg.sell * PPM)
        # the rewarded nodes' columns (NodeResult is a tuple): region, payout, reward
        r_regions, r_payouts, r_rewards = (([r[i] for r in res.rewarded]) for i in (1, 2, 9))
        amounts = [x * sell // PPM for x in r_rewards]
        ledger.transfers(epoch, "transfer", zip(map("payout:".__add__, r_payouts), repeat(market), amounts,
                                                repeat("sell")))
        sold = sum(amounts)
        earned = dict.fromkeys(codes, 0.0)   # summed in floats in this order, as the arrays did
        for g, x in zip(r_regions, r_rewards, strict=True):
            earned[g] += x
        per_region = np.array([earned[c] for c in codes], dtype=float)
        reward_per_node = 0.7 * reward_per_node + 0.3 * (per_region / np.maximum(count_region, 1)) / dec
        row = {"epoch": epoch, "nodes": len(alive), "price_usd": price / 1e6, "supply": st["supply"] / dec,
               "minted": st["minted"] / dec, "burned": st["burned"] / dec, "emission": st["emission"] / dec,
               "carried": st["carried_out"] / dec, "slashed": st["slashed"] / dec, "slashes": len(st["slashes"]),
               "rewarded": st["rewarded"], "demand_gb": float(demand.sum()) / BYTES_PER_GB,
               "unserved_gb": float(unserved.sum()) / BYTES_PER_GB,
               "nodes_per_region": dict(zip(codes, count_region.astype(int).tolist(), strict=True)),
               "multipliers": {c: st["multipliers"].get(c, PPM) / PPM for c in codes},
               "statement": res.hash}
        result.rows.append(row)
        price = _price_step(price, wanted, sold)
        # the epoch's records and results go now, not when the next epoch's replace them: the next
        # epoch's are built in the memory (and the cache) they leave
        del nodes, usage, probes, res, st
        if progress:
            progress(epoch + 1, cfg.epochs, time.perf_counter() - t0)
    assert supply(ledger) == -ledger.balance("mint") - ledger.balance("burn")
    result.seconds = time.perf_counter() - t0
    result.cpu_seconds = time.process_time() - c0
    return result


PLOTS = ("supply", "burned_vs_minted", "price", "nodes_per_region", "multipliers")


def plot(result: SimResult, out: Path) -> list[Path]:
    """One PNG per view into OUT (written to a temp name, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = result.rows
    x = [r["epoch"] for r in rows]
    codes = list(rows[0]["nodes_per_region"]) if rows else []
    views = {
        "supply": ("Token supply", "tokens", {"supply": [r["supply"] for r in rows]}),
        "burned_vs_minted": ("Burned vs minted per epoch", "tokens", {
            "emission (schedule)": [r["emission"] for r in rows], "minted": [r["minted"] for r in rows],
            "burned": [r["burned"] for r in rows]}),
        "price": ("Oracle price", "USD per token", {"price": [r["price_usd"] for r in rows]}),
        "nodes_per_region": ("Nodes per region", "nodes", {c: [r["nodes_per_region"][c] for r in rows] for c in codes}),
        "multipliers": ("Regional multipliers", "multiplier (x)",
                        {c: [r["multipliers"][c] for r in rows] for c in codes}),
    }
    paths = []
    for name in PLOTS:
        title, ylabel, series = views[name]
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        for label, ys in series.items():   # the schedule dashed: minted lies on it when every unit is earned
            ax.plot(x, ys, label=label, linewidth=1.4, linestyle="--" if "schedule" in label else "-")
        ax.set_title(title)
        ax.set_xlabel("epoch (day)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = out / f"{name}.png"
        tmp = out / f".{name}.png.tmp"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def table(result: SimResult, lines: int = 12) -> str:
    """Every few epochs and the last one, as a fixed-width table."""
    rows = result.rows
    step = max(1, len(rows) // lines)
    pick = rows[::step] + ([rows[-1]] if rows and (len(rows) - 1) % step else [])
    head = (f"{'epoch':>5} {'nodes':>6} {'price $':>9} {'supply':>14} {'minted':>11} {'burned':>11} "
            f"{'slashed':>9} {'unserved':>8}  top multiplier")
    out = [head, "-" * len(head)]
    for r in pick:
        region, mult = max(r["multipliers"].items(), key=lambda kv: (kv[1], kv[0]))
        unserved = r["unserved_gb"] / r["demand_gb"] if r["demand_gb"] else 0.0
        out.append(f"{r['epoch']:>5} {r['nodes']:>6} {r['price_usd']:>9.4f} {r['supply']:>14,.0f} "
                   f"{r['minted']:>11,.0f} "
                   f"{r['burned']:>11,.0f} {r['slashed']:>9,.0f} {unserved:>8.1%}  {region} {mult:.2f}x")
    return "\n".join(out)


def progress_printer(stream=sys.stderr):
    last = [0.0]

    def show(done: int, total: int, elapsed: float) -> None:
        if done != total and elapsed - last[0] < 1.0:
            return
        last[0] = elapsed
        rate = done / elapsed if elapsed else 0.0
        eta = (total - done) / rate if rate else 0.0
        end = "\n" if done == total or not stream.isatty() else "\r"
        stream.write(f"epoch {done}/{total}  {rate:.1f} epochs/s  ETA {eta:.0f} s   {end}")
        stream.flush()

    return show
