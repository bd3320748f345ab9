"""Node keys as the vendor gives them: read and checked (units.py, stamp.py share this)."""

from __future__ import annotations

import base64


def load_node_key(data: bytes):
    """An ed25519 private key from PEM (PKCS#8), OpenSSH, or the agent's own format (base64 of the
    32 raw bytes, as /etc/idlewire/node.key holds it); ValueError says what is wrong."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    text = data.strip()
    if text and b"-----" not in text:
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError:
            raw = b""
        if len(raw) == 32:
            return Ed25519PrivateKey.from_private_bytes(raw)
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, Exception) as exc:  # cryptography raises several kinds
        raise ValueError("not an unencrypted ed25519 private key (PEM, OpenSSH, or base64 of 32 bytes) "
                         f"({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"expected an ed25519 key, got {type(key).__name__.removeprefix('_')}")
    return key


def raw_private(data: bytes) -> bytes:
    """The 32 raw bytes of a node key file (the same key in any of its formats compares equal)."""
    from cryptography.hazmat.primitives import serialization

    return load_node_key(data).private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())
