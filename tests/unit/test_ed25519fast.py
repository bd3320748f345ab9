"""The host's faster ed25519 check (libsodium first, tools/idlewire/ed25519fast.py) accepts exactly
the signatures the agent's receipts code accepts with cryptography (OpenSSL) alone: honest ones,
and the edge cases the two libraries treat differently, decided by OpenSSL as on the node."""

import base64
import os

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from idlewire import ed25519fast
from idlewire_agent import receipts as rc

pytest.importorskip("nacl")

IDENTITY = bytes([1]) + bytes(31)  # the neutral point: a small-order key
# With the neutral point as key and as R, and S = 0, the cofactorless equation holds for every
# message: OpenSSL accepts, libsodium refuses small-order points.
ANY_MESSAGE = IDENTITY + bytes(32)


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def openssl(key: bytes, sig: bytes, msg: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, msg)
        return True
    except (InvalidSignature, ValueError):
        return False


@pytest.fixture
def faster():
    assert ed25519fast.install()
    yield
    rc.use_faster_verify(None)


def cases():
    k = Ed25519PrivateKey.generate()
    key = k.public_key().public_bytes_raw()
    msg = os.urandom(100)
    sig = k.sign(msg)
    flipped = sig[:40] + bytes([sig[40] ^ 1]) + sig[41:]
    return [(key, sig, msg), (key, sig, msg + b"x"), (key, flipped, msg), (key, sig[:63], msg),
            (key, sig[:63], sig[63:] + msg),  # a short signature cannot borrow the message's first byte
            (IDENTITY, ANY_MESSAGE, msg), (IDENTITY, ANY_MESSAGE, b"anything"), (bytes(32), sig, msg)]


def test_the_faster_check_accepts_exactly_what_openssl_accepts(faster):
    got = [rc._check_sig(b64(key), b64(sig), msg) for key, sig, msg in cases()]
    assert got == [openssl(key, sig, msg) for key, sig, msg in cases()]
    assert got[0] is True and got[1:5] == [False] * 4
    # the edge case where the libraries differ is decided by OpenSSL, as on the node
    assert openssl(IDENTITY, ANY_MESSAGE, b"x") and got[5]
    rc.use_faster_verify(None)
    assert [rc._check_sig(b64(k), b64(s), m) for k, s, m in cases()] == got


def test_a_chain_verifies_alike_with_and_without_it(faster):
    key, buyer = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    prev, chain = rc.GENESIS, []
    for seq in range(1, 6):
        r = rc.make_receipt(key, "s1", seq, seq, seq, seq, prev, rc.sign_usage(buyer, "s1", seq, seq, seq))
        prev = rc.receipt_hash(r)
        chain.append(r)
    bad = [*chain[:3], {**chain[3], "up": 99}, chain[4]]
    encoded: list = []
    assert rc.verify(chain, rc.pub_b64(key), encoded=encoded) is None
    assert [rc.sha256_hex(e) for e in encoded] == [rc.receipt_hash(r) for r in chain]
    assert "bad node signature" in str(rc.verify(bad))
    rc.use_faster_verify(None)
    assert rc.verify(chain, rc.pub_b64(key)) is None and "bad node signature" in str(rc.verify(bad))
