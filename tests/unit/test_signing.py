"""Signed artifacts: `idlewire flash --key` refuses a changed image, an unsigned one and a wrong key
before writing a byte, and accepts what the key signed (also after a key rotation)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from idlewire import signing
from idlewire.errors import UserError
from imagelab import idlewire, make_image, run

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("mcopy", "sfdisk", "mkfs.vfat", "zstd",
                                                                   "ssh-keygen")),
                                reason="needs mtools, fdisk, dosfstools, zstd, openssh-client")
MiB = 1 << 20


def keypair(d: Path, name: str) -> tuple[Path, Path]:
    key = d / name
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", key)
    return key, d / f"{name}.pub"


@pytest.fixture(scope="module")
def signed(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("signed")
    img = make_image(d / "idlewire-test-1.img", data_mib=2)
    run("zstd", "-q", "-k", img)
    key, pub = keypair(d, "vendor")
    other, other_pub = keypair(d, "other")
    files = [img, img.with_suffix(".bmap"), img.with_name(img.name + ".zst")]
    sigs = signing.sign_files(key, files)
    return {"dir": d, "img": img, "key": key, "pub": pub, "other": other, "other_pub": other_pub, "sigs": sigs}


def refused(res: subprocess.CompletedProcess, words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert words in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def copy_set(signed: dict, d: Path) -> Path:
    d.mkdir()
    for p in signed["dir"].iterdir():
        if p.name.startswith("idlewire-test-1"):
            shutil.copyfile(p, d / p.name)
    return d / signed["img"].name


def test_signatures_are_ssh_signatures(signed):
    """Anyone can check them with ssh-keygen alone (the format is OpenSSH's, the namespace ours)."""
    img, sig = signed["img"], signed["sigs"][0]
    assert sig.read_text().startswith("-----BEGIN SSH SIGNATURE-----")
    allowed = signed["dir"] / "allowed"
    allowed.write_text(f'vendor namespaces="idlewire-image" {signed["pub"].read_text()}')
    with img.open("rb") as f:
        ok = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", allowed, "-I", "vendor", "-n", "idlewire-image",
                             "-s", sig], stdin=f, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    with img.open("rb") as f:  # a signature for images is not valid in another namespace
        other = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", allowed, "-I", "vendor", "-n", "file",
                                "-s", sig], stdin=f, capture_output=True, text=True)
    assert other.returncode != 0


@pytest.mark.parametrize("suffix", ["", ".zst"])
def test_flash_accepts_what_the_key_signed(signed, tmp_path, suffix):
    img = copy_set(signed, tmp_path / "set")
    src = img.with_name(img.name + suffix)
    card = tmp_path / "card.img"
    idlewire("flash", src, card, "--key", signed["pub"])
    assert card.read_bytes() == signed["img"].read_bytes()


def test_one_changed_byte_is_refused_before_writing(signed, tmp_path):
    img = copy_set(signed, tmp_path / "set")
    data = bytearray(img.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte, inside the root filesystem's data
    img.write_bytes(bytes(data))
    card = tmp_path / "card.img"
    card.write_bytes(b"old card contents")  # not an image idlewire wrote: --force, so only the signature stops it
    res = idlewire("flash", img, card, "--key", signed["pub"], "--force", check=False)
    refused(res, "does not verify")
    assert img.name in res.stderr and "nothing written" in res.stderr
    assert card.read_bytes() == b"old card contents"
    assert not list(tmp_path.glob(".card.img*"))  # not even a partial file beside it


def test_changed_bmap_is_refused(signed, tmp_path):
    """The bmap decides which blocks are written: it is checked like the image."""
    img = copy_set(signed, tmp_path / "set")
    bmap = img.with_suffix(".bmap")
    bmap.write_text(bmap.read_text().replace("<BlockSize>", "<!-- edited --><BlockSize>"))
    refused(idlewire("flash", img, tmp_path / "card.img", "--key", signed["pub"], check=False), "bmap")
    assert not (tmp_path / "card.img").exists()


def test_wrong_key_and_unsigned_are_refused(signed, tmp_path):
    img = copy_set(signed, tmp_path / "set")
    card = tmp_path / "card.img"
    refused(idlewire("flash", img, card, "--key", signed["other_pub"], check=False), "does not verify")
    img.with_name(img.name + ".sig").unlink()
    refused(idlewire("flash", img, card, "--key", signed["pub"], check=False), "not signed")
    assert not card.exists()


def test_bad_key_arguments_are_one_line(signed, tmp_path):
    img = copy_set(signed, tmp_path / "set")
    card = tmp_path / "card.img"
    refused(idlewire("flash", img, card, "--key", signed["key"], check=False), "private key")
    refused(idlewire("flash", img, card, "--key", tmp_path / "nope.pub", check=False), "no such file")
    junk = tmp_path / "junk.pub"
    junk.write_text("hello\x1b[31m world\n")
    refused(idlewire("flash", img, card, "--key", junk, check=False), "not an SSH public key")
    empty = tmp_path / "empty.pub"
    empty.write_text("# nothing\n")
    refused(idlewire("flash", img, card, "--key", empty, check=False), "no public key")
    assert not card.exists()


def test_rotation_old_and_new_keys_both_accepted(signed, tmp_path):
    """During a rotation the flash host trusts both keys: images signed by either one flash."""
    img = copy_set(signed, tmp_path / "set")
    both = tmp_path / "trusted.pub"
    both.write_text(signed["other_pub"].read_text() + "# the current key\n" + signed["pub"].read_text())
    idlewire("flash", img, tmp_path / "a.img", "--key", both)
    idlewire("flash", img, tmp_path / "b.img", "--key", signed["other_pub"], "--key", signed["pub"])
    # after the rotation: only the new key is trusted, an image signed by the old one is refused
    signing.sign_files(signed["other"], [img, img.with_suffix(".bmap")])
    refused(idlewire("flash", img, tmp_path / "c.img", "--key", signed["pub"], check=False), "does not verify")


def test_sign_key_checked_before_building(tmp_path, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    pub = tmp_path / "k.pub"
    pub.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFbhHpj88IfII8eHrFQbFKrHxhyy2ZZpcwNe346XdoAj x\n")
    with pytest.raises(UserError, match="public key"):
        signing.check_private_key(pub)
    with pytest.raises(UserError, match="no such key file"):
        signing.check_private_key(tmp_path / "missing")
    (tmp_path / "text").write_text("hello\n")
    with pytest.raises(UserError, match="not an SSH private key"):
        signing.check_private_key(tmp_path / "text")
