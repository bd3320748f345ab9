"""A faster ed25519 signature check for the host side: libsodium through PyNaCl (Debian's
python3-nacl; already installed with paramiko), about twice OpenSSL's verify rate here.

libsodium accepts a subset of what OpenSSL accepts (the same cofactorless equation, plus refusals
of small-order and non-canonical points); the receipts code asks OpenSSL again whatever libsodium
refuses (agent receipts.use_faster_verify), so what verifies is unchanged: the node, the hub and
`idlewire receipts verify` accept exactly the same signatures. Only the honest case gets faster.
"""

from __future__ import annotations


def install() -> bool:
    """Make the agent's receipts code ask libsodium first; False (nothing changed) without PyNaCl."""
    try:
        from nacl.bindings import crypto_sign_open
        from nacl.exceptions import CryptoError
    except ImportError:
        return False
    from idlewire_agent import receipts

    def check(key: bytes, sig: bytes, msg: bytes) -> bool:
        try:
            crypto_sign_open(sig + msg, key)  # (the receipts code passes 64-byte signatures only)
            return True
        except (CryptoError, ValueError, TypeError):
            return False

    receipts.use_faster_verify(check)
    return True
