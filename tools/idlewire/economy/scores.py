"""Reputation per node and multipliers per region: the documented formulas, in integers.

Reputation (ppm, 0 … 1_000_000), updated once per epoch for every node the epoch saw:

    agreement = 1 - min(1, disagreement / claimed)       node vs buyer counts (1 with no usage)
    score     = uptime * agreement                        uptime = heartbeats AND passed probes
              = 0 in an epoch with any offence
    rep_new   = rep_old * decay + score * (1 - decay)     decay = reputation.decay_ppm
    a new node starts at reputation.initial_ppm; a node the epoch did not see decays toward 0
    (score 0); the reward uses max(rep_new, reputation.floor_ppm).

Regional multiplier (ppm), recomputed every epoch and published in the statement:

    demand_r = verified bytes in region r + bytes buyers asked for there and got no node
               (the hub: each buyer holding tokens refused there, as the epoch's mean session)
    supply_r = Σ advertised caps of nodes heard in r, as bytes per epoch
    mult_r   = clamp((demand_r / supply_r) / (Σ demand / Σ supply), min, max)   (1x … 3x by default)

so a region whose demand per unit of capacity is above the network's pays more, up to the bound;
a region with demand and no supply gets the maximum; with no demand anywhere every region is 1x.
"""

from __future__ import annotations

from . import PPM
from .rules import Rules

BYTES_PER_MBIT_SECOND = 125_000


def agreements_ppm(claimed: list[int], disagreement: list[int]) -> list[int]:
    """agreement per node, for CLAIMED and DISAGREEMENT in the same order (lists: settlement runs the
    formulas for every node of an epoch at once, without a call each)."""
    return [PPM if c <= 0 else (PPM - off if (off := d * PPM // c) < PPM else 0)
            for c, d in zip(claimed, disagreement, strict=True)]


def epoch_scores_ppm(uptime: list[int], agreement: list[int], offended: list[bool]) -> list[int]:
    return [0 if bad else u * a // PPM for u, a, bad in zip(uptime, agreement, offended, strict=True)]


def next_reputations(rules: Rules, old: list[int | None], score: list[int]) -> list[int]:
    """rep_new per node (None: a new node, starting at reputation.initial_ppm)."""
    r = rules.reputation
    decay, keep, initial = r.decay_ppm, PPM - r.decay_ppm, r.initial_ppm
    return [((initial if o is None else o) * decay + s * keep) // PPM for o, s in zip(old, score, strict=True)]


def multipliers(rules: Rules, demand: dict[str, int], supply_mbit: dict[str, int]) -> dict[str, int]:
    """mult_r in ppm for every region with demand or supply, sorted by region."""
    lo, hi = rules.regions.min_multiplier_ppm, rules.regions.max_multiplier_ppm
    secs = rules.epoch_seconds * BYTES_PER_MBIT_SECOND
    supply = {r: c * secs for r, c in supply_mbit.items()}
    total_d, total_s = sum(demand.values()), sum(supply.values())
    out = {}
    for region in sorted(set(demand) | set(supply)):
        d, s = demand.get(region, 0), supply.get(region, 0)
        if total_d == 0 or d == 0:
            m = lo
        elif s == 0 or total_s == 0:
            m = hi
        else:
            m = d * total_s * PPM // (s * total_d)
        out[region] = min(hi, max(lo, m))
    return out
