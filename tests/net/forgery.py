"""Test-only: turn a real agent process into one that forges usage, as an owner with root over the
node could (the shipped agent has no such setting; this module lives under tests/ only).

    python -c 'import forgery; forgery.run_agent(1.3, "--config", CFG)'    (tests/net on sys.path)

wraps the agent's receipt maker so every receipt it signs states FACTOR times the bytes its meter
counted, up and down. Everything else is the agent as shipped: it still meters the tunnel, checks
each buyer statement against what it really measured, and uploads its (now inflated) receipts to
the hub over its channel. The receipts are good node signatures over numbers the buyers'
co-signed statements do not back.
"""

from __future__ import annotations

import runpy
import sys


def install(factor: float) -> None:
    from idlewire_agent import receipts

    honest = receipts.make_receipt

    def inflated(key, session, seq, up, down, t, prev, buyer=None, buyer_key=None, final=None):
        return honest(key, session, seq, int(up * factor), int(down * factor), t, prev, buyer, buyer_key, final)

    receipts.make_receipt = inflated   # agent.py calls receipts.make_receipt: looked up at each call


def run_agent(factor: float, *args: str) -> None:
    install(factor)
    sys.argv = ["idlewire_agent", "run", *args]
    runpy.run_module("idlewire_agent", run_name="__main__", alter_sys=True)
