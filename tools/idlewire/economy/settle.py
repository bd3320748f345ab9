"""One epoch's burn-and-mint settlement, and the signed statement it ends in.

    settle(rules, state, inputs, price, ledger, key) → EpochResult

in this order, each step a function of the previous ones only (no clock, no randomness, sorted
iteration), so the same inputs give the same statement hash:

 1. proof of bandwidth: verified bytes per node (co-signed, within tolerance), probe verdicts,
    uptime (heartbeats AND passed probes); offences: the hub's (equivocation) + inflated/forged
    usage + failed probes;
 2. slashing: each offence takes its fraction of the node's bonded and unbonding stake into
    `slashed`, the evidence (receipt or probe ids) recorded with it; an offending node earns nothing
    this epoch;
 3. burn: each buyer's verified bytes * price per GB (micro-USD) ÷ oracle price → tokens burned from
    `buyer:ID` (what it holds at most; the rest is reported as shortfall);
 4. regional multipliers (scores.multipliers) and reputations (scores.next_reputations);
 5. mint: pool = emission_for(epoch) + carry; a node is eligible with stake ≥ staking.min_stake,
    no offence, verified bytes > 0 and uptime > 0; its weight is

        weight = verified_bytes * multiplier_ppm * max(reputation_ppm, floor) * uptime_ppm
        reward = pool * weight // Σ weights                      (integer division: to the last unit)

    minted = Σ rewards ≤ pool; the rest (rounding dust, or all of it when nobody is eligible) is
    carried to the next epoch (emission.unallocated = "carry") or never minted ("drop");
 6. unbonding stake that has served its delay is released;
 7. the statement: totals, multipliers, slashes with evidence, the Merkle root over the rewards
    (idlewire_agent.merkle), the previous statement's hash, signed with the hub's ed25519 key.

The hub runs it inside one database transaction with a `Ledger` on its tables.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, itemgetter
from typing import NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from idlewire_agent import merkle

from . import PPM
from .ledger import BURN, MINT, Ledger, supply
from .proof import NodeReport, Offence, Probe, Usage, Verified, judge_probes, uptimes_ppm, verify_usage
from .rules import Rules, emission_for
from .scores import agreements_ppm, epoch_scores_ppm, multipliers, next_reputations
from .staking import Slash, Unbonding, release, slash, stake_accounts

GENESIS_PREV = "0" * 64


@dataclass
class EconomyState:
    """What settlement carries from one epoch to the next (besides the ledger)."""

    epoch: int = 0
    reputation: dict[str, int] = field(default_factory=dict)
    carry: int = 0
    unbonding: list[Unbonding] = field(default_factory=list)
    prev: str = GENESIS_PREV


@dataclass
class EpochInputs:
    nodes: list[NodeReport]
    usage: list[Usage] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    offences: list[Offence] = field(default_factory=list)   # detected by the hub (equivocation)
    unserved: dict[str, int] = field(default_factory=dict)   # region → bytes asked for with no node to serve


class NodeResult(NamedTuple):
    """One node's figures for an epoch (settle() builds them whole, in one pass, from its columns)."""

    node: str
    region: str
    payout: str
    verified_bytes: int
    uptime_ppm: int
    reputation_ppm: int
    multiplier_ppm: int
    stake: int
    weight: int = 0
    reward: int = 0
    why_not: str = ""   # why the node earned nothing, for `earnings`


@dataclass
class EpochResult:
    statement: dict
    nodes: dict[str, NodeResult]
    rewarded: list[NodeResult]      # the Merkle tree's leaves, in order (by node)
    levels: list[list[bytes]]
    slashes: list[Slash]
    burned: dict[str, int]
    shortfall: dict[str, int]       # buyer → micro-USD of verified usage its tokens did not cover
    released: list[Unbonding]

    @property
    def hash(self) -> str:
        return merkle.statement_hash(self.statement)

    def inclusion_proof(self, node: str) -> tuple[dict, list[list[str]]]:
        """(leaf, proof) for a rewarded node; KeyError for a node without a reward this epoch."""
        epoch = self.statement["epoch"]
        i = bisect.bisect_left(self.rewarded, node, key=lambda r: r.node)
        if i == len(self.rewarded) or self.rewarded[i].node != node:
            raise KeyError(f"{node}: no reward in epoch {epoch}")
        return reward_leaf(epoch, self.rewarded[i]), merkle.proof(self.levels, i)

    def leaves(self) -> list[dict]:
        return [reward_leaf(self.statement["epoch"], r) for r in self.rewarded]


def tokens_for(rules: Rules, nbytes: int, price_micro_usd: int) -> tuple[int, int]:
    """(base units to burn, micro-USD owed) for NBYTES of verified usage at the oracle PRICE."""
    owed = nbytes * rules.market.price_per_gb_micro_usd // 10**9
    return owed * 10**rules.market.decimals // price_micro_usd, owed


def public_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


# What json.JSONEncoder(ensure_ascii=True).encode does for a str, without its per-call dispatch.
_json_str = json.encoder.encode_basestring_ascii
_sha256 = hashlib.sha256
_new = tuple.__new__
_first = itemgetter(0)
_bytes, _claimed, _disagreement = attrgetter("bytes"), attrgetter("claimed"), attrgetter("disagreement")
_NO_USAGE = Verified()   # a node without usage this epoch (read only)


def reward_leaf(epoch: int, res: NodeResult) -> dict:
    return {"v": 1, "epoch": epoch, "node": res.node, "payout": res.payout, "reward": res.reward,
            "verified_bytes": res.verified_bytes, "multiplier_ppm": res.multiplier_ppm,
            "reputation_ppm": res.reputation_ppm, "uptime_ppm": res.uptime_ppm}


def _leaf_hashes(epoch: int, rewarded: list[NodeResult]) -> list[bytes]:
    """merkle.leaf_hash(reward_leaf(epoch, r)) for each r, built without a dict and a generic json.dumps
    per leaf (the 0x00 leaf prefix is the string's first character). Each leaf's text is hashed as it
    is made (10,000s an epoch: no list of texts kept around to hash afterwards)."""
    s, sha = _json_str, _sha256
    return [sha(f'\x00{{"epoch":{epoch},"multiplier_ppm":{m},"node":{s(n)},"payout":{s(p)},"reputation_ppm":{rp},'
                f'"reward":{rw},"uptime_ppm":{u},"v":1,"verified_bytes":{vb}}}'.encode()).digest()
            for n, _, p, vb, u, rp, m, _, _, rw, _ in rewarded]


def _leaf_hash(epoch: int, res: NodeResult) -> bytes:
    return _leaf_hashes(epoch, [res])[0]


def reward_tree(epoch: int, rewarded: list[NodeResult]) -> list[list[bytes]]:
    """The Merkle tree over an epoch's rewarded nodes (sorted by node): settle() builds it, and the hub
    rebuilds it from its stored rewards to hand a node its proof."""
    return merkle.tree(_leaf_hashes(epoch, rewarded))


def settle(rules: Rules, state: EconomyState, inputs: EpochInputs, price_micro_usd: int, ledger: Ledger,
           key: Ed25519PrivateKey) -> EpochResult:
    if price_micro_usd <= 0:
        raise ValueError(f"epoch {state.epoch}: oracle price must be > 0 micro-USD, got {price_micro_usd}")
    epoch = state.epoch
    nodes = inputs.nodes
    reports: dict[str, NodeReport] = dict(zip(map(_first, nodes), nodes, strict=True))
    if len(reports) != len(nodes):
        seen: set[str] = set()
        for r in nodes:
            if r.node in seen:
                raise ValueError(f"epoch {epoch}: node {r.node} reported twice")
            seen.add(r.node)

    # 1. proof of bandwidth
    verified, usage_offences, buyer_bytes = verify_usage(rules, inputs.usage)
    probe_counts, probe_offences = judge_probes(rules, inputs.probes)

    # 2. slashing
    offences = sorted([*inputs.offences, *usage_offences, *probe_offences],
                      key=lambda o: (o.node, o.kind, o.evidence))
    slashes = [slash(rules, ledger, state.unbonding, epoch, o) for o in offences]
    offended = {o.node for o in offences}

    # 3. burn
    burned: dict[str, int] = {}
    shortfall: dict[str, int] = {}
    for buyer in sorted(buyer_bytes):
        want, owed = tokens_for(rules, buyer_bytes[buyer], price_micro_usd)
        acct = f"buyer:{buyer}"
        have = ledger.balance(acct)
        take = min(want, have)
        ledger.transfer(epoch, "burn", acct, BURN, take, f"usage:{buyer_bytes[buyer]}")
        burned[buyer] = take
        if take < want:
            shortfall[buyer] = owed - take * price_micro_usd // 10**rules.market.decimals

    # 4. multipliers and reputation
    # Column-wise, by node (ids are unique: the reports never get compared): the formulas take the
    # epoch's nodes as lists (10,000s of nodes, 365 epochs in a simulated year: no call per node),
    # each column made by C-level map/zip, the NodeResults made whole at the end.
    order = sorted(reports)
    count = len(order)
    # NodeReport's fields as columns (one C-level transpose), and what the epoch proved per node
    _, regions, payouts, caps, hbs = zip(*map(reports.__getitem__, order), strict=True) if order else ((),) * 5
    vs = list(map(verified.get, order, repeat(_NO_USAGE)))
    vbs = list(map(_bytes, vs))
    demand: dict[str, int] = dict(inputs.unserved)
    cap: dict[str, int] = {}
    for g, vb, hb, c in zip(regions, vbs, hbs, caps, strict=True):
        if vb:
            demand[g] = demand.get(g, 0) + vb
        if hb > 0:
            cap[g] = cap.get(g, 0) + c
    mults = multipliers(rules, demand, cap)
    rep = state.reputation
    floor = rules.reputation.floor_ppm
    min_stake = rules.staking.min_stake
    ups = uptimes_ppm(rules, hbs, list(map(probe_counts.get, order, repeat((0, 0)))))
    agreement = agreements_ppm(list(map(_claimed, vs)), list(map(_disagreement, vs)))
    bad = list(map(offended.__contains__, order)) if offended else [False] * count
    reps = next_reputations(rules, list(map(rep.get, order)), epoch_scores_ppm(ups, agreement, bad))
    rep.update(zip(order, reps, strict=True))
    stakes = ledger.balances(stake_accounts(order))
    node_mults = list(map(mults.get, regions, repeat(PPM)))
    weights = [0 if b or s < min_stake or not vb or not u else vb * m * (rp if rp > floor else floor) * u
               for b, s, vb, u, m, rp in zip(bad, stakes, vbs, ups, node_mults, reps, strict=True)]
    total = sum(weights)
    why_not = [""] * count
    for i in [i for i, w in enumerate(weights) if not w]:
        if bad[i]:
            why_not[i] = "slashed this epoch"
        elif stakes[i] < min_stake:
            why_not[i] = f"stake {stakes[i]} below the minimum {min_stake}"
        elif vbs[i] == 0:
            why_not[i] = "no verified usage"
        elif ups[i] == 0:
            why_not[i] = "no uptime (no heartbeats or every probe failed)"
    # nodes not seen this epoch decay toward 0 (and are forgotten at 0); the dict's order is never read
    gone = list(rep.keys() - reports.keys())
    decayed = next_reputations(rules, list(map(rep.__getitem__, gone)), [0] * len(gone))
    rep.update(zip(gone, decayed, strict=True))
    for g in [g for g, r in zip(gone, decayed, strict=True) if not r]:
        del rep[g]

    # 5. mint
    emission = emission_for(rules, epoch)
    pool = emission + state.carry
    rewards = [pool * w // total if w else 0 for w in weights] if total else [0] * count
    columns = zip(order, regions, payouts, vbs, ups, reps, node_mults, stakes, weights, rewards, why_not, strict=True)
    results: dict[str, NodeResult] = dict(zip(order, map(_new, repeat(NodeResult), columns), strict=True))
    rewarded: list[NodeResult] = list(compress(results.values(), rewards))   # sorted by node
    ref = f"epoch:{epoch}"
    ledger.transfers(epoch, "mint", zip(repeat(MINT), ["payout:" + p for p in compress(payouts, rewards)],
                                        [r for r in rewards if r], repeat(ref)))
    minted = sum(rewards)
    carry_out = pool - minted if rules.emission.unallocated == "carry" else 0

    # 6. unbonding
    released = release(ledger, state.unbonding, epoch)

    # 7. statement
    levels = reward_tree(epoch, rewarded)
    statement = {
        "v": 1, "type": "epoch", "network": rules.name, "rules": rules.digest(), "epoch": epoch,
        "price_micro_usd": price_micro_usd, "emission": emission, "carried_in": state.carry, "minted": minted,
        "carried_out": carry_out, "burned": sum(burned.values()), "supply": supply(ledger),
        "slashed": sum(s.amount for s in slashes), "slashes": [s.to_dict() for s in slashes],
        "multipliers": mults, "rewarded": len(rewarded), "merkle_root": merkle.root_of(levels),
        "prev": state.prev, "hub": public_b64(key),
    }
    statement = merkle.sign_statement(key, statement)
    state.epoch, state.carry, state.prev = epoch + 1, carry_out, merkle.statement_hash(statement)
    return EpochResult(statement, results, rewarded, levels, slashes, burned, shortfall, released)
