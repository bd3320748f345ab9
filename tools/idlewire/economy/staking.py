"""Staking: bonded stake as skin in the game, unbonding with a delay, slashing with evidence.

Stake lives in ledger accounts `stake:NODE` (bonded) and `unbonding:NODE` (on its way out, released
to the owner's account `unbonding_epochs` after the request and slashable until then). A slash takes
its configured fraction of both into `slashed`; fractions of a balance ≥ 0 cannot make it negative,
and the ledger refuses any transfer that would.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import PPM
from .ledger import SLASHED, Ledger
from .proof import EQUIVOCATION, FAILED_PROBES, FORGED_USAGE, INFLATED_USAGE, Offence
from .rules import Rules


class StakeError(ValueError):
    """An operator's stake request that cannot be done; str() names the node and the fix."""


@dataclass(slots=True)
class Unbonding:
    node: str
    amount: int
    release_epoch: int
    to: str             # the account the stake returns to


@dataclass(frozen=True, slots=True)
class Slash:
    node: str
    kind: str
    amount: int
    evidence: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"node": self.node, "kind": self.kind, "amount": self.amount, "evidence": list(self.evidence)}


STAKE = "stake:"


def stake_account(node: str) -> str:
    return STAKE + node


def stake_accounts(nodes) -> list[str]:
    """stake_account(n) for each of NODES, without a call each."""
    return list(map(STAKE.__add__, nodes))


def unbonding_account(node: str) -> str:
    return f"unbonding:{node}"


def fraction_for(rules: Rules, kind: str) -> int:
    s = rules.staking
    return {EQUIVOCATION: s.slash_equivocation_ppm, FORGED_USAGE: s.slash_forged_usage_ppm,
            INFLATED_USAGE: s.slash_inflated_usage_ppm, FAILED_PROBES: s.slash_failed_probes_ppm}[kind]


def bond(ledger: Ledger, epoch: int, node: str, src: str, amount: int) -> None:
    if amount <= 0:
        raise StakeError(f"stake for {node}: amount must be > 0")
    if ledger.balance(src) < amount:
        raise StakeError(f"stake for {node}: {src} holds {ledger.balance(src)} base units, not {amount}")
    ledger.transfer(epoch, "bond", src, stake_account(node), amount)


def unbond(rules: Rules, ledger: Ledger, queue: list[Unbonding], epoch: int, node: str, amount: int,
           to: str) -> Unbonding:
    bonded = ledger.balance(stake_account(node))
    if amount <= 0 or amount > bonded:
        raise StakeError(f"unbond {node}: {amount} base units requested, {bonded} bonded")
    ledger.transfer(epoch, "unbond", stake_account(node), unbonding_account(node), amount)
    u = Unbonding(node, amount, epoch + rules.staking.unbonding_epochs, to)
    queue.append(u)
    return u


def release(ledger: Ledger, queue: list[Unbonding], epoch: int) -> list[Unbonding]:
    """Pay out every unbonding entry due at EPOCH; returns them (and drops them from QUEUE)."""
    due = [u for u in queue if u.release_epoch <= epoch]
    if due:
        queue[:] = [u for u in queue if u.release_epoch > epoch]
        for u in due:
            ledger.transfer(epoch, "release", unbonding_account(u.node), u.to, u.amount)
    return due


def slash(rules: Rules, ledger: Ledger, queue: list[Unbonding], epoch: int, offence: Offence) -> Slash:
    frac = fraction_for(rules, offence.kind)
    node = offence.node
    ref = f"{offence.kind}:{','.join(offence.evidence)}"
    taken = ledger.balance(stake_account(node)) * frac // PPM
    ledger.transfer(epoch, "slash", stake_account(node), SLASHED, taken, ref)
    for u in queue:
        if u.node == node:
            cut = u.amount * frac // PPM
            u.amount -= cut
            taken += cut
            ledger.transfer(epoch, "slash", unbonding_account(node), SLASHED, cut, ref)
    return Slash(node, offence.kind, taken, offence.evidence)
