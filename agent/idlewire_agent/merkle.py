"""Epoch statements and reward inclusion proofs, as a node checks them (stdlib + cryptography).

The hub settles every epoch into a statement signed with its ed25519 key. The statement carries
a Merkle root over one leaf per rewarded node; the hub hands each node its leaf and a proof, and
the node checks both here without trusting the hub's word for its reward:

    leaf      = canonical({"v", "epoch", "node", "payout", "reward", "verified_bytes",
                           "multiplier_ppm", "reputation_ppm", "uptime_ppm"})   (sorted keys, no spaces)
    leaf hash = SHA-256(0x00 ‖ leaf)
    node hash = SHA-256(0x01 ‖ left ‖ right)       the prefixes keep a leaf from posing as a node
    leaves are ordered by node key; an odd one out at a level is carried up unchanged (never
    paired with itself, so no two leaf lists share a root)
    proof     = [["L"|"R", HEX], ...] from the leaf up: the sibling and on which side it sits

A statement is signed over canonical(statement without "sig") with the key in "hub".
"""

from __future__ import annotations

import base64
import hashlib
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

LEAF_FIELDS = ("v", "epoch", "node", "payout", "reward", "verified_bytes", "multiplier_ppm", "reputation_ppm",
               "uptime_ppm")
EMPTY_ROOT = hashlib.sha256(b"").hexdigest()


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def leaf_hash(leaf: dict) -> bytes:
    return hashlib.sha256(b"\x00" + canonical(leaf)).digest()


def _parent(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def tree(hashes: list[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaves first, root last."""
    levels = [list(hashes)]
    sha = hashlib.sha256
    while len(levels[-1]) > 1:
        cur = levels[-1]
        # _parent(left, right) for each pair, inline (a hub settles 10,000s of leaves an epoch)
        nxt = [sha(b"\x01" + left + right).digest() for left, right in zip(cur[0::2], cur[1::2], strict=False)]
        if len(cur) % 2:
            nxt.append(cur[-1])
        levels.append(nxt)
    return levels


def root_of(levels: list[list[bytes]]) -> str:
    return levels[-1][0].hex() if levels and levels[0] else EMPTY_ROOT


def proof(levels: list[list[bytes]], index: int) -> list[list[str]]:
    out = []
    for level in levels[:-1]:
        sib = index ^ 1
        if sib < len(level):
            out.append(["L" if sib < index else "R", level[sib].hex()])
        index //= 2
    return out


def verify_inclusion(leaf: dict, path: list, root: str) -> bool:
    """True when LEAF with proof PATH hashes up to ROOT (hex). Never raises on malformed input."""
    try:
        if not isinstance(leaf, dict) or set(leaf) != set(LEAF_FIELDS):
            return False
        h = leaf_hash(leaf)
        for side, sib_hex in path:
            sib = bytes.fromhex(sib_hex)
            if len(sib) != 32:
                return False
            if side == "L":
                h = _parent(sib, h)
            elif side == "R":
                h = _parent(h, sib)
            else:
                return False
        return h.hex() == root
    except (TypeError, ValueError):
        return False


def sign_statement(key: Ed25519PrivateKey, statement: dict) -> dict:
    body = {k: v for k, v in statement.items() if k != "sig"}
    return {**body, "sig": base64.b64encode(key.sign(canonical(body))).decode()}


def statement_hash(statement: dict) -> str:
    return hashlib.sha256(canonical(statement)).hexdigest()


def verify_statement(statement: dict, hub_key: str | None = None) -> bool:
    """The statement's signature is good (and by HUB_KEY, base64 ed25519, when given)."""
    try:
        key = statement["hub"]
        if hub_key is not None and key != hub_key:
            return False
        raw = base64.b64decode(key, validate=True)
        body = {k: v for k, v in statement.items() if k != "sig"}
        Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(statement["sig"], validate=True),
                                                      canonical(body))
        return True
    except (KeyError, TypeError, ValueError, InvalidSignature):
        return False


def check_reward(statement: dict, leaf: dict, path: list, node_key: str, hub_key: str | None = None) -> str | None:
    """What a node runs on the hub's answer: None when all is good, else one line saying what is wrong."""
    if not verify_statement(statement, hub_key):
        return "the epoch statement's signature does not verify (or is not by the expected hub key)"
    if not isinstance(leaf, dict) or leaf.get("node") != node_key:
        return "the reward leaf is not for this node"
    if leaf.get("epoch") != statement.get("epoch"):
        return "the reward leaf is for another epoch than the statement"
    if not verify_inclusion(leaf, path, statement.get("merkle_root", "")):
        return "the reward leaf is not in the statement's Merkle root (tampered leaf or proof)"
    return None
