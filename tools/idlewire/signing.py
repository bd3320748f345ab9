"""Signing build artifacts and checking them before a flash: OpenSSH signatures (`ssh-keygen -Y`).

Why SSH signatures: every vendor already has SSH keys and openssh-client on every build and flash
host (no new tool, no new key format to guard); the format is stable since OpenSSH 8.1, documented
(PROTOCOL.sshsig), bound to a namespace so that a signature made for images is never valid for
anything else (and vice versa), and verifiable by anyone with `ssh-keygen -Y verify` alone.

A signature is FILE.sig beside FILE. `idlewire flash --key PUB` accepts an image only if its
signature (and its bmap's, when the flash reads one) verifies with one of the given public keys;
giving the old and the new key during a rotation accepts both (see README, "Signing").
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import UserError

NAMESPACE = "idlewire-image"
PRINCIPAL = "idlewire"
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-")


def sig_path(path: Path) -> Path:
    return path.with_name(path.name + ".sig")


def check_private_key(key: Path) -> None:
    """One line naming the problem when `key` cannot sign (checked before a build starts)."""
    if not key.is_file():
        raise UserError(f"--sign {key}: no such key file; make one with ssh-keygen -t ed25519 -f {key}")
    try:
        head = key.read_bytes()[:64]
    except OSError as exc:
        raise UserError(f"--sign {key}: cannot read it ({exc.strerror})") from None
    if head.startswith(tuple(t.encode() for t in KEY_TYPES)):
        if os.environ.get("SSH_AUTH_SOCK"):
            return  # ssh-keygen signs with the private half held by ssh-agent (or a token)
        raise UserError(f"--sign {key}: this is a public key; give the private key "
                        f"({key.with_suffix('') if key.suffix == '.pub' else 'without .pub'}), or load it "
                        "into ssh-agent")
    if b"PRIVATE KEY" not in head:
        raise UserError(f"--sign {key}: not an SSH private key (expected '-----BEGIN OPENSSH PRIVATE KEY-----')")


def sign_files(key: Path, files: Sequence[Path], run=None) -> list[Path]:
    """Sign each file (FILE.sig beside it); returns the signatures. `run`: a build Runner to log to."""
    sigs = []
    for path in files:
        sig = sig_path(path)
        sig.unlink(missing_ok=True)  # ssh-keygen will not replace one
        cmd = ["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", NAMESPACE, str(path)]
        if run is not None:
            run.run(cmd)
        else:
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise UserError(f"signing {path} with {key} failed: {_last_line(res.stderr)}")
        sigs.append(sig)
    return sigs


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def allowed_signers(keys: Iterable[Path]) -> str:
    """An allowed_signers text (ssh-keygen(1)) from public key files: each may hold several keys."""
    lines = []
    for key in keys:
        try:
            text = key.read_text(errors="replace")
        except FileNotFoundError:
            raise UserError(f"--key {key}: no such file (give the signer's public key, e.g. signing.pub)") from None
        except OSError as exc:
            raise UserError(f"--key {key}: cannot read it ({exc.strerror})") from None
        found = 0
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "PRIVATE KEY" in line:
                raise UserError(f"--key {key}: this is a private key; give its public half ({key}.pub)")
            fields = line.split()
            # "TYPE BASE64 [comment]" (.pub / authorized_keys style, options not accepted)
            if len(fields) >= 2 and fields[0].startswith(KEY_TYPES) and "\n" not in line:
                lines.append(f'{PRINCIPAL} namespaces="{NAMESPACE}" {fields[0]} {fields[1]}')
                found += 1
            else:
                raise UserError(f"--key {key}: line {raw[:40]!r} is not an SSH public key "
                                "(expected 'ssh-ed25519 AAAA... comment')")
        if not found:
            raise UserError(f"--key {key}: no public key in it")
    return "".join(line + "\n" for line in lines)


def verify_files(files: Sequence[Path], keys: Sequence[Path]) -> None:
    """Each file's signature must verify with one of `keys`; else one line naming the file, exit 2."""
    signers = allowed_signers(keys)
    with tempfile.TemporaryDirectory(prefix="idlewire-verify-") as tmp:
        allowed = Path(tmp) / "allowed_signers"
        allowed.write_text(signers)
        for path in files:
            sig = sig_path(path)
            if not sig.is_file():
                raise UserError(f"{path}: not signed (no {sig.name} beside it); refusing to flash with --key")
            try:
                with path.open("rb") as data:
                    res = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", PRINCIPAL,
                                          "-n", NAMESPACE, "-s", str(sig)], stdin=data,
                                         capture_output=True, text=True)
            except OSError as exc:
                raise UserError(f"{path}: cannot read it ({exc.strerror})") from None
            if res.returncode != 0:
                names = ", ".join(str(k) for k in keys)
                raise UserError(f"{path}: signature {sig.name} does not verify with {names} (the file changed "
                                "after signing, or another key signed it); refusing to flash")


def flash_inputs(image: Path, bmap: Path | None) -> list[Path]:
    """What `idlewire flash` reads and so must be signed: the image, and its bmap if there is one."""
    from .stamp import find_bmap  # the same search `idlewire flash` does

    bmap = bmap or find_bmap(image)
    return [image, *([bmap] if bmap else [])]


def verify_for_flash(image: Path, bmap: Path | None, keys: Sequence[Path]) -> None:
    """Called by `idlewire flash --key` before anything is opened for writing."""
    verify_files(flash_inputs(image, bmap), keys)
