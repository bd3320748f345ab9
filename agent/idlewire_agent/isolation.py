"""Is the buyers' isolation in force? The nftables table itself comes from roles/firewall.

The session manager refuses new sessions while ``table_loaded()`` is False and policy
``firewall.required`` is true: a tunnel without isolation would hand the owner's LAN to buyers.
"""

from __future__ import annotations

import json
import logging

from . import run

log = logging.getLogger("idlewire.isolation")


def table_loaded(table: str, netns: str | None = None) -> bool:
    """True when ``table inet <table>`` is loaded with its forward chain (nft -j list table)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    try:
        p = run.run([*prefix, "nft", "-j", "list", "table", "inet", table], check=False)
    except run.CommandError as exc:
        log.warning("isolation check: %s", exc)
        return False
    if p.returncode != 0:
        return False
    try:
        items = json.loads(p.stdout).get("nftables", [])
    except ValueError:
        return False
    return any(i.get("chain", {}).get("name") == "forward" for i in items)
