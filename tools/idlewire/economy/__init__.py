"""The idlewire economy: proof of bandwidth, reputation, regional multipliers, staking and slashing,
burn-and-mint settlement per epoch, and a simulator that drives the same code.

A pure, deterministic, database-free core: every function takes plain records and the rules and
returns plain records; money is integer base units (no floats); iteration is in sorted order, so the
same inputs give the same signed statement byte for byte. The hub calls it and keeps the ledger in
its database behind `ledger.Ledger`.

    rules.py      the network's rules, one typed config loaded from TOML/YAML
    proof.py      proof-of-bandwidth inputs → verified bytes, uptime, probe verdicts, offences
    scores.py     reputation (with decay) and regional multipliers
    ledger.py     the double-entry token ledger (interface + in-memory implementation)
    staking.py    bonding, unbonding, slashing with evidence
    pricefeed.py  the oracle price (interface; file-backed and fixed feeds)
    settle.py     one epoch's burn-and-mint settlement and its signed statement
    simulate.py   a seeded population run through settle() for N epochs; table, JSON and plots
"""

PPM = 1_000_000  # fractions, multipliers and scores are integers in parts per million
