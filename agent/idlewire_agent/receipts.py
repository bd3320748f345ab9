"""Usage receipts and signed requests: the wire format shared by the agent and the host tools.

A receipt is a JSON object, signed by the node's ed25519 key over its canonical encoding
(sorted keys, no spaces) without the "sig" field:

    {"v": 1, "node": NODE_PUBKEY_B64, "session": ID, "seq": N, "up": BYTES, "down": BYTES,
     "time": UNIX_SECONDS, "prev": SHA256_HEX_OF_PREVIOUS_RECEIPT, "buyer_key": B64,
     "buyer": STATEMENT?, "final": REASON?, "sig": B64}

`up`/`down` are cumulative bytes from/to the buyer. `prev` is the SHA-256 of the previous receipt's
canonical encoding (with its "sig"), 64 zeros for seq 1. `buyer_key` is the buyer's ed25519 key the
session was opened with (bound at open, in every receipt): every co-signature in the chain must be
by that key. `buyer`, when present, is the buyer's co-signed usage statement
{"up", "down", "time", "key", "sig"} that the receipt acknowledges (the buyer's payment promise),
signed by the buyer's ed25519 key over canonical({"v": 1, "type": "usage", "session", "up", "down",
"time"}). `final` marks the node's FINAL receipt, issued when the session closes, with the reason
(buyer, admin, expired, idle, unpaid, quota); up/down are then the session's totals. A receipt
co-signed after the close carries `final` too. A closed session's chain therefore ends with a
`final` receipt: one that does not was cut short (truncated). Receipts from before these two
fields still verify (their buyer binding is the first co-signature's key).

Every JSON document of the wire format is parsed strictly (strict_loads): a duplicated key, NaN or
Infinity is refused, so two parsers can never read two different receipts out of one text.

A payout statement (GET /health, "payout") binds the node key to the owner's payout address:
{"v": 1, "type": "payout", "node", "unit", "address", "sig"}, signed like a receipt.

When the node prunes the start of a closed session's chain (retention, node.toml [receipts]), the
first entry it keeps is a checkpoint in place of the last pruned receipt, signed by the node:

    {"v": 1, "type": "checkpoint", "node", "session", "seq": N, "up", "down", "time",
     "hash": SHA256_HEX_OF_RECEIPT_N, "sig": B64}

It carries receipt N's counts and hash: the chain goes on from it (receipt N+1's prev is that hash)
and is verified from there. A checkpoint is only valid as the first entry of its session. It also carries receipt N's
`buyer_key` and `final` when that receipt had them.

Buyer API calls carry headers X-Idlewire-Key/-Time/-Nonce/-Signature; the signature covers
"idlewire-request-v1\\nMETHOD\\nPATH\\nTIME\\nNONCE\\nSHA256_HEX(BODY)".
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .record import Record

VERSION = 1
GENESIS = "0" * 64
_FIELDS = {"v": int, "node": str, "session": str, "seq": int, "up": int, "down": int, "time": int, "prev": str,
           "sig": str}
_OPTIONAL = {"buyer_key": str, "final": str}  # node-signed; "buyer" (a statement) is checked on its own
NONCE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")  # X-Idlewire-Nonce of a signed request
SLACK_BYTES = 65536  # absolute slack in agreed(): packets in flight between the node's counter and the buyer's


def agreed(node_bytes: int, buyer_bytes: int, tolerance: float) -> bool:
    """The buyer signed at least `node_bytes`, within `tolerance` (a fraction: 0.02 is 2%) and
    SLACK_BYTES. Which node count a statement is held to: acknowledged()."""
    return buyer_bytes >= node_bytes * (1 - tolerance) - SLACK_BYTES


def acknowledged(before: dict | None, statement: dict, tolerance: float) -> bool:
    """Does a buyer's usage statement cover what the node had counted before it, within `tolerance`?

    `before` is the entry that precedes, in the session's chain, the receipt the statement is
    acknowledged by: the node's previous receipt (or the checkpoint standing for it), None at seq 1.
    A statement is never held to its own receipt's count: the buyer signs its counters, the
    statement travels (through the hub's relay, too) and the node counts on meanwhile, so the
    receipt that acknowledges it may count a poll's or a relay's worth more. That is lag, not
    disagreement. The buyer signs its next statement only after the node answered the last one, so
    what the node had counted in that answer, an honest buyer has seen go by: a statement below the
    previous receipt's count (beyond the tolerance) is a real disagreement. The node's cosign() and
    the hub's disagreement flag both decide by this."""
    node = (before["up"] + before["down"]) if before else 0
    return agreed(node, statement["up"] + statement["down"], tolerance)


class StrictJSONError(ValueError):
    """A JSON text that parses differently in different parsers: a duplicated key, NaN or Infinity."""


def _no_duplicates(pairs: list) -> dict:
    seen: dict = {}
    for k, v in pairs:
        if k in seen:
            raise StrictJSONError(f"duplicate key {k[:40]!r} in a JSON object")
        seen[k] = v
    return seen


def _no_constant(name: str):
    raise StrictJSONError(f"{name} is not JSON (strict parsing)")


def _finite(text: str) -> float:
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise StrictJSONError(f"{text[:40]} overflows to Infinity (strict parsing)")
    return v


def strict_loads(text: str | bytes):
    """json.loads that refuses duplicated keys and NaN/Infinity, also as 1e400 (StrictJSONError, a ValueError)."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_finite)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)  # built once: json.dumps
# with arguments builds an encoder per call, a quarter of the encoding's cost


def canonical(obj) -> bytes:
    return _CANONICAL.encode(obj).encode()


def receipt_hash(receipt: dict) -> str:
    return sha256_hex(canonical(receipt))


def pub_b64(key: Ed25519PrivateKey) -> str:
    from .keys import ed25519_public_b64

    return ed25519_public_b64(key)


@functools.lru_cache(maxsize=4096)  # a chain names two keys thousands of times (a refused text is not kept)
def _pub_key(text: str) -> tuple[Ed25519PublicKey, bytes]:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 32:
        raise ValueError("not a 32-byte ed25519 key")
    return Ed25519PublicKey.from_public_bytes(raw), raw


def _pub(text: str) -> Ed25519PublicKey:
    return _pub_key(text)[0]


_faster = None  # a host's faster ed25519 check (use_faster_verify); the node has none


def use_faster_verify(check) -> None:
    """Host side (the hub, `idlewire receipts verify`): `check(raw_key, raw_sig, msg) -> bool` is
    asked first. What it accepts must be a subset of what cryptography (OpenSSL) accepts, as
    libsodium's stricter checks are; what it refuses is asked of cryptography again, so a
    signature is valid exactly when cryptography says so, on the node and on the host alike."""
    global _faster
    _faster = check


def _check_sig(pub: str, sig: str, msg: bytes) -> bool:
    try:
        key, raw = _pub_key(pub)
        sig_raw = base64.b64decode(sig, validate=True)
        if _faster is not None and len(sig_raw) == 64 and _faster(raw, sig_raw, msg):
            return True
        key.verify(sig_raw, msg)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


# --- buyer usage statements ---------------------------------------------------------------------
def usage_message(session: str, up: int, down: int, t: int) -> bytes:
    return canonical({"v": VERSION, "type": "usage", "session": session, "up": up, "down": down, "time": t})


def sign_usage(key: Ed25519PrivateKey, session: str, up: int, down: int, t: int) -> dict:
    sig = key.sign(usage_message(session, up, down, t))
    return {"up": up, "down": down, "time": t, "key": pub_b64(key), "sig": base64.b64encode(sig).decode()}


def usage_valid(stmt: dict, session: str, buyer_key: str | None = None) -> bool:
    try:
        up, down, t, key, sig = stmt["up"], stmt["down"], stmt["time"], stmt["key"], stmt["sig"]
    except (KeyError, TypeError):
        return False
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (up, down, t)):
        return False
    if not isinstance(key, str) or not isinstance(sig, str) or (buyer_key and key != buyer_key):
        return False
    return _check_sig(key, sig, usage_message(session, up, down, t))


# --- payout statement ---------------------------------------------------------------------------
def payout_statement(key: Ed25519PrivateKey, address: str, unit: str = "") -> dict:
    """The node's signed word that receipts signed by its key are paid to `address` (reported in
    /health). {"v":1, "type":"payout", "node", "unit", "address", "sig"}: ed25519 by the node key
    over the canonical JSON without "sig"; the same key signs the receipts."""
    body = {"v": VERSION, "type": "payout", "node": pub_b64(key), "unit": unit, "address": address}
    return {**body, "sig": base64.b64encode(key.sign(canonical(body))).decode()}


def payout_valid(stmt: dict, node_key: str | None = None) -> bool:
    """A payout statement whose signature holds (and made by `node_key`, when given)."""
    if not isinstance(stmt, dict) or set(stmt) != {"v", "type", "node", "unit", "address", "sig"}:
        return False
    if stmt["v"] != VERSION or stmt["type"] != "payout" or (node_key and stmt["node"] != node_key):
        return False
    if not all(isinstance(stmt[k], str) for k in ("node", "unit", "address", "sig")):
        return False
    body = {k: v for k, v in stmt.items() if k != "sig"}
    return _check_sig(stmt["node"], stmt["sig"], canonical(body))


# --- receipts -----------------------------------------------------------------------------------
def make_receipt(key: Ed25519PrivateKey, session: str, seq: int, up: int, down: int, t: int, prev: str,
                 buyer: dict | None = None, buyer_key: str | None = None, final: str | None = None) -> dict:
    body = {"v": VERSION, "node": pub_b64(key), "session": session, "seq": seq, "up": up, "down": down,
            "time": t, "prev": prev}
    if buyer is not None:
        body["buyer"] = buyer
    if buyer_key is not None:
        body["buyer_key"] = buyer_key
    if final is not None:
        body["final"] = final or "closed"
    return {**body, "sig": base64.b64encode(key.sign(canonical(body))).decode()}


def node_signed(r: dict) -> bool:
    """Does a receipt's node signature hold (over everything but "sig")? One receipt, no chain."""
    if not isinstance(r, dict) or not isinstance(r.get("node"), str) or not isinstance(r.get("sig"), str):
        return False
    return _check_sig(r["node"], r["sig"], canonical({k: v for k, v in r.items() if k != "sig"}))


CHECKPOINT_FIELDS = {"v": int, "type": str, "node": str, "session": str, "seq": int, "up": int, "down": int,
                     "time": int, "hash": str, "sig": str}


def is_checkpoint(entry) -> bool:
    return isinstance(entry, dict) and entry.get("type") == "checkpoint"


def make_checkpoint(key: Ed25519PrivateKey, receipt: dict) -> dict:
    """The signed stand-in for `receipt` when it and everything before it are pruned."""
    body = {"v": VERSION, "type": "checkpoint", "node": pub_b64(key), "session": receipt["session"],
            "seq": receipt["seq"], "up": receipt["up"], "down": receipt["down"], "time": receipt["time"],
            "hash": receipt_hash(receipt)}
    body.update({k: receipt[k] for k in _OPTIONAL if k in receipt})
    return {**body, "sig": base64.b64encode(key.sign(canonical(body))).decode()}


def checkpoints(entries: list) -> dict[str, int]:
    """session -> seq of the checkpoint its chain starts from (sessions whose start was pruned)."""
    return {e["session"]: e["seq"] for e in entries if is_checkpoint(e) and isinstance(e.get("session"), str)}


# Problems that are a buyer statement the node signed into its receipt and the session's buyer did
# not sign (the hub judges them against the buyer it sold the session to: forged usage).
BAD_COSIGNATURE = "bad buyer co-signature"
SWITCHED_BUYER = "co-signed by another buyer key than the session's (switched keys mid-session)"


class Problem(Record):
    index: int  # position in the list (0-based)
    session: str
    seq: object
    reason: str

    def __str__(self) -> str:
        return f"receipt #{self.index + 1} (session {self.session}, seq {self.seq}): {self.reason}"


class Chain(Record):
    """What a verified chain says about its session."""

    last: dict  # the last entry (receipt or checkpoint)
    buyer_key: str | None = None  # bound at open (or, in receipts from before, by the first co-signature)
    final: str | None = None  # the close reason of the node's final receipt; None: no final receipt (open)
    checkpoint: int | None = None  # the seq of the checkpoint the chain starts from, when pruned


def verify(receipts: list, node_key: str | None = None, buyer_key: str | None = None,
           closed: bool | set = False, chains: dict | None = None, encoded: list | None = None) -> Problem | None:
    """Check every receipt in order; return the first problem, or None when all are good.

    Per session: seq counts 1, 2, 3 ... with no gaps (or N+1, N+2 ... after a checkpoint for N, see
    above); prev is the hash of the previous receipt; up, down and time never decrease; every
    signature (node's, and the buyer's when present) holds; one node key throughout (the one
    given, when given); one buyer key throughout (the one bound at open, or `buyer_key` when
    given): every co-signature is by it; after the final receipt only final receipts. A session
    known to be closed (`closed`: True for all, or a set of ids) must end with a final receipt, else
    its chain is truncated. `chains`, when given, is filled with a Chain per session; `encoded`,
    when given, gets each receipt's canonical encoding (its hash's input; None for a checkpoint).
    """
    chains = {} if chains is None else chains
    last_hash: dict[str, str] = {}
    for i, r in enumerate(receipts):
        sess = r.get("session", "?") if isinstance(r, dict) else "?"
        seq = r.get("seq", "?") if isinstance(r, dict) else "?"

        def bad(reason: str, i=i, sess=sess, seq=seq) -> Problem:
            return Problem(i, str(sess), seq, reason)

        if not isinstance(r, dict):
            return bad("not a JSON object")
        if is_checkpoint(r):
            why = _checkpoint_problem(r, node_key, r.get("session") in chains)
            if why:
                return bad(why)
            if buyer_key and r.get("buyer_key", buyer_key) != buyer_key:
                return bad("buyer_key is not the buyer key given")
            chains[r["session"]] = Chain(r, r.get("buyer_key") or buyer_key, r.get("final"), r["seq"])
            last_hash[r["session"]] = r["hash"]
            if encoded is not None:
                encoded.append(None)
            continue
        for k, kind in _FIELDS.items():
            if not isinstance(r.get(k), kind) or isinstance(r.get(k), bool):
                return bad(f"field {k!r} missing or not a {kind.__name__}")
        for k, kind in _OPTIONAL.items():
            if k in r and (not isinstance(r[k], kind) or not r[k]):
                return bad(f"field {k!r} is not a non-empty {kind.__name__}")
        extra = set(r) - set(_FIELDS) - set(_OPTIONAL) - {"buyer"}
        if extra:
            return bad(f"unknown field(s) {', '.join(sorted(extra))}")
        if r["v"] != VERSION:
            return bad(f"unknown version {r['v']}")
        if min(r["seq"], r["up"], r["down"], r["time"]) < 0:
            return bad("negative number")
        if node_key and r["node"] != node_key:
            return bad("signed by another node key than the one given")
        body = {k: v for k, v in r.items() if k != "sig"}
        if not _check_sig(r["node"], r["sig"], canonical(body)):
            return bad("bad node signature (tampered or forged)")
        if "buyer" in r and not usage_valid(r["buyer"], r["session"]):
            return bad(BAD_COSIGNATURE)
        c = chains.get(r["session"])
        if c is None:
            if r["seq"] != 1:
                return bad(f"first receipt of the session has seq {r['seq']}, expected 1 (or, when the node "
                           "pruned the start, its signed checkpoint before it)")
            if r["prev"] != GENESIS:
                return bad("first receipt of the session must have prev = 64 zeros")
            c = chains[r["session"]] = Chain(r, buyer_key)
        else:
            prev = c.last
            if r["node"] != prev["node"]:
                return bad("node key changed within the session")
            if r["seq"] != prev["seq"] + 1:
                return bad(f"seq {r['seq']} follows {prev['seq']} (missing, repeated or reordered)")
            if r["prev"] != last_hash[r["session"]]:
                return bad("prev is not the hash of the previous receipt (chain broken)")
            for k in ("up", "down", "time"):
                if r[k] < prev[k]:
                    return bad(f"{k} went down from {prev[k]} to {r[k]}")
            if c.final is not None and r.get("final") is None:
                return bad("a receipt without 'final' after the session's final receipt")
        # The buyer binding: the key given, else the one the node bound at open, else (receipts from
        # before the binding) the first co-signature's; every co-signature must be by it.
        if "buyer_key" in r:
            if c.buyer_key is not None and r["buyer_key"] != c.buyer_key:
                return bad("buyer_key is not the buyer key given" if buyer_key else
                           "buyer_key changed within the session")
            c.buyer_key = r["buyer_key"]
        elif c.buyer_key is not None and r["seq"] > 1 and chains[r["session"]].last.get("buyer_key"):
            return bad("buyer_key missing (the session's earlier receipts bind one)")
        if "buyer" in r:
            if c.buyer_key is None:
                c.buyer_key = r["buyer"]["key"]
            elif r["buyer"]["key"] != c.buyer_key:
                return bad(SWITCHED_BUYER)
        c.last, c.final = r, r.get("final", c.final)
        enc = canonical(r)
        last_hash[r["session"]] = sha256_hex(enc)
        if encoded is not None:
            encoded.append(enc)
    for sid, c in chains.items():
        if c.final is None and (closed is True or (closed and sid in closed)):
            return Problem(receipts.index(c.last), str(sid), c.last.get("seq"),
                           "truncated: the session is closed but its chain ends without the node's final receipt")
    return None


def _checkpoint_problem(c: dict, node_key: str | None, mid_chain: bool) -> str | None:
    for k, kind in CHECKPOINT_FIELDS.items():
        if not isinstance(c.get(k), kind) or isinstance(c.get(k), bool):
            return f"checkpoint field {k!r} missing or not a {kind.__name__}"
    extra = set(c) - set(CHECKPOINT_FIELDS) - set(_OPTIONAL)
    if extra:
        return f"unknown checkpoint field(s) {', '.join(sorted(extra))}"
    if c["v"] != VERSION:
        return f"unknown version {c['v']}"
    for k, kind in _OPTIONAL.items():
        if k in c and (not isinstance(c[k], kind) or not c[k]):
            return f"checkpoint field {k!r} is not a non-empty {kind.__name__}"
    if mid_chain:
        return "checkpoint inside the chain (only the first entry of a session may be one)"
    if min(c["seq"], c["up"], c["down"], c["time"]) < 0 or c["seq"] < 1:
        return "negative number or seq below 1"
    if len(c["hash"]) != 64:
        return "checkpoint hash is not a SHA-256 hex digest"
    if node_key and c["node"] != node_key:
        return "signed by another node key than the one given"
    if not _check_sig(c["node"], c["sig"], canonical({k: v for k, v in c.items() if k != "sig"})):
        return "bad node signature on the checkpoint (tampered or forged)"
    return None


def load_file(text: str, closed: set | None = None) -> list:
    """Receipts from a JSON array, a {"receipts": [...], "closed": [SESSION...]} object (what
    `idlewire client connect --receipts` saves: "closed" names the sessions it saw closed, whose
    chains must end in a final receipt; added to `closed` when given), or JSON lines. Strict JSON:
    StrictJSONError on a duplicated key, NaN or Infinity."""
    text = text.strip()
    if not text:
        return []
    try:
        data = strict_loads(text)
    except json.JSONDecodeError:
        data = [strict_loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict) and "receipts" in data:
        if closed is not None and isinstance(data.get("closed"), list):
            closed.update(x for x in data["closed"] if isinstance(x, str))
        data = data["receipts"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError("expected a JSON array of receipts, {\"receipts\": [...]} or JSON lines")
    return data


# --- signed requests ----------------------------------------------------------------------------
def request_message(method: str, path: str, t: str, nonce: str, body: bytes) -> bytes:
    return f"idlewire-request-v1\n{method}\n{path}\n{t}\n{nonce}\n{sha256_hex(body)}".encode()


def sign_request(key: Ed25519PrivateKey, method: str, path: str, body: bytes, t: int, nonce: str) -> dict:
    sig = key.sign(request_message(method, path, str(t), nonce, body))
    return {"X-Idlewire-Key": pub_b64(key), "X-Idlewire-Time": str(t), "X-Idlewire-Nonce": nonce,
            "X-Idlewire-Signature": base64.b64encode(sig).decode()}


def request_valid(key: str, sig: str, method: str, path: str, t: str, nonce: str, body: bytes) -> bool:
    return _check_sig(key, sig, request_message(method, path, t, nonce, body))
