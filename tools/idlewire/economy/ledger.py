"""The token ledger: double entry, integer base units.

Every movement is one entry that takes AMOUNT from one account and gives it to another, so the
balances of all accounts always sum to zero. System accounts:

    mint            the issuer: its balance is minus every token ever created (genesis + epoch mints)
    burn            the sink: its balance is every token buyers burned
    slashed         stake taken from offending nodes (kept, not destroyed: part of the supply)
    stake:NODE      bonded stake;  unbonding:NODE  stake on its way out (still slashable)
    payout:ADDRESS  rewards to a node owner's payout address
    buyer:ID        a buyer's tokens, burned as it spends

Supply = -balance(mint) - balance(burn): so supply change = minted - burned, by construction.
No account but `mint` may go below zero (a transfer that would is refused): stakes are never negative.

The hub backs `Ledger` with SQLAlchemy; `MemoryLedger` is the reference implementation and the
simulator's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat
from typing import Protocol

MINT, BURN, SLASHED = "mint", "burn", "slashed"
ISSUERS = frozenset({MINT})


class Overdraft(ValueError):
    """A transfer would take an account below zero."""


@dataclass(frozen=True, slots=True)
class Entry:
    epoch: int
    kind: str       # genesis, mint, burn, bond, unbond, release, slash, transfer
    src: str
    dst: str
    amount: int
    ref: str = ""   # evidence or reason: receipt ids, probe ids, statement hash


class Ledger(Protocol):
    def transfer(self, epoch: int, kind: str, src: str, dst: str, amount: int, ref: str = "") -> None: ...
    def transfers(self, epoch: int, kind: str, moves: Iterable[tuple[str, str, int, str]]) -> None: ...
    def balance(self, account: str) -> int: ...
    def balances(self, accounts: Iterable[str]) -> list[int]: ...
    def accounts(self, prefix: str = "") -> dict[str, int]: ...


class MemoryLedger:
    """Balances in a dict; the journal too unless `journal=False` (the simulator's 10,000 nodes * 365 epochs)."""

    def __init__(self, journal: bool = True):
        self._bal: dict[str, int] = {}
        self.journal: list[Entry] | None = [] if journal else None
        self.totals: dict[str, int] = {}  # per kind: the sum moved, for reports

    def transfer(self, epoch: int, kind: str, src: str, dst: str, amount: int, ref: str = "") -> None:
        self.transfers(epoch, kind, ((src, dst, amount, ref),))

    def transfers(self, epoch: int, kind: str, moves: Iterable[tuple[str, str, int, str]]) -> None:
        """transfer(epoch, kind, src, dst, amount, ref) for each (src, dst, amount, ref) of MOVES in order
        (the same checks, entries and balances) in one call: an epoch's mints, the simulator's sales."""
        bal, journal, moved = self._bal, self.journal, 0
        get = bal.get
        try:
            for src, dst, amount, ref in moves:
                if amount.__class__ is not int or amount < 0:
                    raise ValueError(f"ledger: amount must be a whole number ≥ 0, got {amount!r}")
                if not amount:
                    continue
                have = get(src, 0)
                if have < amount and src not in ISSUERS:
                    raise Overdraft(f"ledger: {src} holds {have}, cannot move {amount} to {dst} ({kind})")
                bal[src] = have - amount
                bal[dst] = get(dst, 0) + amount
                moved += amount
                if journal is not None:
                    journal.append(Entry(epoch, kind, src, dst, amount, ref))
        finally:
            if moved:
                self.totals[kind] = self.totals.get(kind, 0) + moved

    def balance(self, account: str) -> int:
        return self._bal.get(account, 0)

    def balances(self, accounts: Iterable[str]) -> list[int]:
        """[balance(a) for a in ACCOUNTS] without a call each (settlement reads every node's stake)."""
        return list(map(self._bal.get, accounts, repeat(0)))

    def accounts(self, prefix: str = "") -> dict[str, int]:
        return {k: v for k, v in sorted(self._bal.items()) if k.startswith(prefix)}


def supply(ledger: Ledger) -> int:
    return -ledger.balance(MINT) - ledger.balance(BURN)


def apply_genesis(ledger: Ledger, rules) -> None:
    for g in rules.genesis:
        ledger.transfer(0, "genesis", MINT, g.account, g.amount, "genesis")
