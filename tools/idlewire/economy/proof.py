"""Proof of bandwidth: what the hub knows about an epoch, as plain records, and what it proves.

The hub supplies, per epoch:
  * `Usage`: one session's bytes in the epoch from its receipts — what the node signed and what the
    buyer co-signed (the hub has verified both signatures and the chain with
    idlewire_agent.receipts; `status` says what it found);
  * `NodeReport`: per node, region, payout address, advertised cap and heartbeats seen;
  * `Probe`: each probe the hub's prober ran (a short session bought as a buyer would);
  * `Offence`: what the hub detected itself, e.g. equivocation (two node-signed receipts for one
    session and sequence number), with the receipt ids.

Only co-signed usage within tolerance counts as verified. Uptime = heartbeats AND passed probes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from . import PPM
from .rules import Rules

# Usage.status values the hub reports.
COSIGNED = "cosigned"    # node and buyer signatures good
UNSIGNED = "unsigned"    # no buyer co-signature: counts nothing, costs nothing (the buyer may have vanished)
FORGED = "forged"        # a buyer co-signature that does not verify, or by a key not the session's buyer

EQUIVOCATION, FORGED_USAGE, INFLATED_USAGE, FAILED_PROBES = ("equivocation", "forged_usage", "inflated_usage",
                                                             "failed_probes")
OFFENCES = (EQUIVOCATION, FORGED_USAGE, INFLATED_USAGE, FAILED_PROBES)


class Usage(NamedTuple):
    receipt: str        # id of the newest receipt of the session in this epoch (evidence)
    node: str
    buyer: str
    node_bytes: int     # up + down the node signed for this session in the epoch
    buyer_bytes: int    # up + down the buyer co-signed
    status: str = COSIGNED
    # up + down the node had counted when the buyer signed its newest statement: the node's receipt
    # before the newest one (receipts.acknowledged). A buyer signs its counters, the statement travels
    # and the node counts on meanwhile, so a statement lags its own receipt's count by up to a poll's
    # worth; it is held to the count before it. None: no lag known (node_bytes).
    seen_bytes: int | None = None


class NodeReport(NamedTuple):
    node: str
    region: str         # ISO 3166 country code the node claims
    payout: str         # payout address from its signed payout statement
    cap_mbit: int       # advertised down cap in force (supply)
    heartbeats: int     # heartbeats the hub received in the epoch


class Probe(NamedTuple):
    id: str
    node: str
    reached: bool
    mbit: int           # measured throughput
    advertised_mbit: int
    latency_ms: int


class Offence(NamedTuple):
    node: str
    kind: str           # one of OFFENCES
    evidence: tuple[str, ...]   # receipt ids or probe ids


@dataclass(slots=True)
class Verified:
    """What the epoch proves for one node."""

    bytes: int = 0          # verified: co-signed, within tolerance (the smaller of the two counts)
    claimed: int = 0        # what the node signed, all sessions
    disagreement: int = 0   # bytes outside [seen, node] the buyer signed, summed over co-signed sessions
    receipts: int = 0       # sessions that counted


def verify_usage(rules: Rules, usage: list[Usage]) -> tuple[dict[str, Verified], list[Offence], dict[str, int]]:
    """Verified bytes per node, the usage offences (inflated, forged) with receipt ids, bytes per buyer.

    A co-signed session agrees when the buyer signed at least what the node had counted when it
    signed (seen_bytes) and at most what the node signed (node_bytes), each within tolerance: the
    lag between them is not disagreement. It then counts min(node, buyer) bytes. Beyond tolerance
    it counts nothing and lowers the node's agreement (reputation); if the buyer signed less than the
    node had counted and `staking.inflated_min_buyers` different buyers (or the hub's prober, a buyer
    the hub trusts) say so in the epoch, it is inflated usage. A forged buyer signature is forged
    usage. Buyers are charged for what counted.
    """
    out: dict[str, Verified] = {}
    buyers: dict[str, int] = {}
    inflated: dict[str, list[str]] = {}
    forged: dict[str, list[str]] = {}
    tol_bytes, tol_ppm = rules.market.tolerance_bytes, rules.market.tolerance_ppm
    out_get, buyers_get = out.get, buyers.get   # once per session of the epoch: bound once
    # Unpacked in the loop header (Usage is a tuple: no attribute lookup per field, per session).
    for receipt, node, buyer, nb, bb, status, sb in usage:
        v = out_get(node)
        if v is None:
            v = out[node] = Verified()
        if sb is None:
            sb = nb
        if nb < 0 or bb < 0 or sb < 0:
            raise ValueError(f"usage {receipt}: byte counts must be ≥ 0, got node {nb}, buyer {bb}, seen {sb}")
        v.claimed += nb
        if status != COSIGNED:
            if status == FORGED:
                forged.setdefault(node, []).append(receipt)
            continue
        short = sb - bb   # the buyer signed less than the node had counted: > 0
        off = short if short > 0 else (bb - nb if bb > nb else 0)
        v.disagreement += off
        if off <= tol_bytes or off <= (nb if nb > bb else bb) * tol_ppm // PPM:   # market.tolerance_bytes or _ppm
            counted = nb if nb < bb else bb
            v.bytes += counted
            v.receipts += 1
            buyers[buyer] = buyers_get(buyer, 0) + counted
        elif short > 0:
            inflated.setdefault(node, []).append((receipt, buyer))
    need, prober = rules.staking.inflated_min_buyers, rules.probes.prober_buyer
    offences = [Offence(n, FORGED_USAGE, tuple(sorted(ids))) for n, ids in forged.items()]
    for n, claims in inflated.items():
        buyers_saying_so = {b for _, b in claims}
        if need and (len(buyers_saying_so) >= need or prober in buyers_saying_so):
            offences.append(Offence(n, INFLATED_USAGE, tuple(sorted(r for r, _ in claims))))
    return out, offences, buyers


def probe_passed(rules: Rules, p: Probe) -> bool:
    r = rules.probes
    return (p.reached and p.latency_ms <= r.max_latency_ms
            and p.mbit * PPM >= p.advertised_mbit * r.pass_throughput_ppm)


def judge_probes(rules: Rules, probes: list[Probe]) -> tuple[dict[str, tuple[int, int]], list[Offence]]:
    """(passed, failed) per node, and a failed-probes offence with the probe ids for a node that
    failed at least `probes.slash_after_failures` probes in the epoch."""
    counts: dict[str, list[int]] = {}
    failed_ids: dict[str, list[str]] = {}
    for p in probes:
        c = counts.setdefault(p.node, [0, 0])
        if probe_passed(rules, p):
            c[0] += 1
        else:
            c[1] += 1
            failed_ids.setdefault(p.node, []).append(p.id)
    need = rules.probes.slash_after_failures
    offences = [Offence(n, FAILED_PROBES, tuple(sorted(ids))) for n, ids in failed_ids.items()
                if need and len(ids) >= need]
    return {n: (c[0], c[1]) for n, c in counts.items()}, offences


def uptimes_ppm(rules: Rules, heartbeats: list[int], probes: list[tuple[int, int]]) -> list[int]:
    """Per node: heartbeat coverage of the epoch, times the share of probes passed (1 when no probe
    ran), for HEARTBEATS and (passed, failed) PROBES in the same order. Settlement runs it for every
    node of an epoch at once (a list in, a list out: 10,000s of nodes without a call each)."""
    expected = max(1, rules.epoch_seconds // rules.probes.heartbeat_seconds)
    return [(c if c < PPM else PPM) if not (p or f) else (c if c < PPM else PPM) * p // (p + f)
            for c, (p, f) in zip([h * PPM // expected for h in heartbeats], probes, strict=True)]
