"""Node keys and secrets: created on first use, written 0600 via a temp file and a rename."""

from __future__ import annotations

import base64
import os

try:  # the enums alone: the public `serialization` package also loads SSH/PKCS12 code (~0.6 MB RSS)
    from cryptography.hazmat.primitives import _serialization as serialization
except ImportError:  # pragma: no cover (a cryptography without the private module)
    from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

_RAW = serialization.Encoding.Raw
_RAWPRIV = serialization.PrivateFormat.Raw
_RAWPUB = serialization.PublicFormat.Raw
_NOENC = serialization.NoEncryption()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# cryptography >= 40 has *_bytes_raw(); its public_bytes()/private_bytes() import the whole public
# `serialization` package (SSH, PKCS#12, bcrypt: ~2 MB of RSS) on first use. Older ones (Debian
# bookworm's 38) only have the general methods.
def _raw_public(key) -> bytes:
    raw = getattr(key, "public_bytes_raw", None)
    return raw() if raw else key.public_bytes(_RAW, _RAWPUB)


def _raw_private(key) -> bytes:
    raw = getattr(key, "private_bytes_raw", None)
    return raw() if raw else key.private_bytes(_RAW, _RAWPRIV, _NOENC)


def write_secret(path: str, text: str) -> None:
    """Write a secret atomically with mode 0600 (never world-readable, not even briefly)."""
    write_atomic(path, text, 0o600)


def write_atomic(path: str | os.PathLike, text: str, mode: int = 0o600) -> None:
    """Write a file via a temp file, fsync and rename: readers see the old or the new content."""
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    os.makedirs(d, mode=0o750, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_or_create(path: str, make) -> str:
    try:
        with open(path) as f:
            text = f.read().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    text = make()
    write_secret(path, text + "\n")
    return text


def ed25519_private(path: str) -> Ed25519PrivateKey:
    """The node's signing key (base64 of the 32 raw bytes), created if missing."""
    text = _read_or_create(path, lambda: b64(_raw_private(Ed25519PrivateKey.generate())))
    try:
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(text, validate=True))
    except ValueError as exc:
        raise ValueError(f"{path}: not an ed25519 key (base64 of 32 bytes): {exc}") from None


def ed25519_public_b64(key: Ed25519PrivateKey) -> str:
    return b64(_raw_public(key.public_key()))


def ed25519_public_from_b64(text: str) -> Ed25519PublicKey:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 32:
        raise ValueError("an ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def wg_private(path: str) -> tuple[str, str]:
    """The node's WireGuard key pair (private, public), base64 as `wg` writes it; created if missing."""
    text = _read_or_create(path, lambda: b64(_raw_private(X25519PrivateKey.generate())))
    priv = X25519PrivateKey.from_private_bytes(base64.b64decode(text, validate=True))
    return text, b64(_raw_public(priv.public_key()))


def wg_keypair() -> tuple[str, str]:
    priv = X25519PrivateKey.generate()
    return b64(_raw_private(priv)), b64(_raw_public(priv.public_key()))


def admin_token(path: str) -> str:
    """The admin API token, created (0600) if missing."""
    return _read_or_create(path, lambda: base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode())


def is_wg_key(text: str) -> bool:
    try:
        return len(text) == 44 and len(base64.b64decode(text, validate=True)) == 32
    except ValueError:
        return False
