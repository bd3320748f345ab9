"""`idlewire-agent consume-stamp`: the first-boot consumer, run for real into temporary directories.

The stamp is made by the host's own code (units.py → stamp.stamp_toml + node_key), applied by the
agent's, and the result read back with the agent's config loader: what a unit's first boot does,
without the boot (tests/image/test_stamp_firstboot.py does it in QEMU).
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from idlewire import stamp as st
from idlewire.units import load_unit
from idlewire_agent import config
from idlewire_agent.consume import consume

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICCwTJHb49C0zwb8vi6tjbdXa2mX9kiOu2khkhPP5LMu vendor@desk"
ADMIN = "root"  # an account every test machine has; its home is taken inside the temporary root


def make_card(tmp: Path, unit_yml: str) -> tuple[Path, Path, st.Unit, str]:
    """(boot dir, root dir, the unit, its public key): a stamp as `idlewire stamp` writes it."""
    src = tmp / "unit.yml"
    src.write_text(unit_yml)
    unit = load_unit(src)
    pem, pub = st.node_key(unit)
    boot, root = tmp / "boot", tmp / "root"
    (boot / "idlewire").mkdir(parents=True)
    (boot / "idlewire" / "stamp.toml").write_bytes(st.stamp_toml(unit, pub))
    (boot / "idlewire" / "node.key").write_bytes(pem)
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tidlewire\n")
    return boot, root, unit, pub


def run(boot: Path, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "idlewire_agent", "consume-stamp", "--boot", str(boot),
                           "--root", str(root), "--admin", ADMIN], capture_output=True, text=True)


def test_a_good_stamp_is_applied_and_its_secrets_erased(tmp_path):
    boot, root, _, pub = make_card(tmp_path, f"""unit: Shop_0001
hostname: IW-0001
ssh_authorized_keys: ["{KEY}"]
wifi: {{country: de, ssid: "Café Luna", psk: "correct horse"}}
payout_address: bc1qexample
caps: {{up_mbit: 2.5, monthly_gb: 0, max_sessions: 4}}
""")
    r = run(boot, root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == (
        f"idlewire-stamp: unit Shop_0001 (iw-0001) applied; secrets erased from {boot}/idlewire")
    etc = root / "etc" / "idlewire"
    assert stat.S_IMODE(etc.stat().st_mode) == 0o700
    assert stat.S_IMODE((etc / "node.key").stat().st_mode) == 0o600
    u, problems = config.parse_unit(tomllib.loads((etc / "unit.toml").read_text()))
    assert problems == []
    assert (u.unit, u.hostname, u.node_public_key, u.payout_address) == ("Shop_0001", "iw-0001", pub, "bc1qexample")
    assert u.caps == {"up_mbit": 2.5, "monthly_gb": 0, "max_sessions": 4}  # monthly_gb 0: no quota, both sides
    assert (root / "etc" / "hostname").read_text() == "iw-0001\n"
    assert "127.0.1.1\tiw-0001" in (root / "etc" / "hosts").read_text().splitlines()
    home = Path(os.path.expanduser(f"~{ADMIN}")).relative_to("/")
    ak = root / home / ".ssh" / "authorized_keys"
    assert ak.read_text() == KEY + "\n" and stat.S_IMODE(ak.stat().st_mode) == 0o600
    wpa = root / "etc" / "wpa_supplicant" / "wpa_supplicant-wlan0.conf"
    assert f"ssid={'Café Luna'.encode().hex()}" in wpa.read_text() and "country=DE" in wpa.read_text()
    assert stat.S_IMODE(wpa.stat().st_mode) == 0o600
    assert sorted(p.name for p in (boot / "idlewire").iterdir()) == ["stamp.done"]
    assert pub in (boot / "idlewire" / "stamp.done").read_text()
    # the node key on the node is the one whose public key the vendor recorded
    from idlewire_agent import keys

    assert keys.ed25519_public_b64(keys.ed25519_private(str(etc / "node.key"))) == pub
    # a second boot: nothing left to do
    r = run(boot, root)
    assert r.returncode == 0 and r.stdout == ""


@pytest.mark.parametrize(("edit", "why"), [
    (lambda t: t.replace('hostname = "iw-7"', 'hostname = "iw\\u00857"'), "hostname: expected a host name"),
    (lambda t: t.replace('hostname = "iw-7"', 'hostname = "iw\\u2028-7"'), "hostname: expected a host name"),
    (lambda t: t.replace("max_sessions = 4", "max_sessions = 4000"), "caps.max_sessions: expected"),
    (lambda t: t.replace("max_sessions = 4", "max_sessions = nan"), "caps.max_sessions: expected"),
    (lambda t: t.replace("format = 1", "format = 2"), "format: expected format 1"),
    (lambda t: t.replace('psk_hash = "', 'psk_hash = "zz'),
     "wifi.psk_hash: expected 64 hex digits, got a value not shown"),
    (lambda t: t + "\n[extra]\n", "extra: unknown key"),
    (lambda t: t.replace("[caps", "[caps"), None),  # control: unchanged is applied
])
def test_a_bad_stamp_is_refused_whole_in_one_line_and_its_secrets_erased(tmp_path, edit, why):
    boot, root, _, _ = make_card(tmp_path, """unit: u7
hostname: iw-7
wifi: {country: DE, ssid: net, psk: "12345678"}
caps: {max_sessions: 4}
""")
    path = boot / "idlewire" / "stamp.toml"
    text = path.read_text()
    psk_hash = next(ln.split('"')[1] for ln in text.splitlines() if ln.startswith("psk_hash"))
    path.write_text(edit(text))
    r = run(boot, root)
    if why is None:
        assert r.returncode == 0, r.stdout
        return
    assert r.returncode == 2 and r.stderr == "", r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "refused, nothing applied, its secrets erased" in lines[0] and why in lines[0], lines
    assert not (root / "etc" / "idlewire").exists() and not (root / "etc" / "hostname").exists()
    assert sorted(p.name for p in (boot / "idlewire").iterdir()) == ["stamp.refused"]
    refused = (boot / "idlewire" / "stamp.refused").read_text()
    assert psk_hash not in refused and psk_hash[:20] not in r.stdout
    assert run(boot, root).returncode == 0  # refused once: the next boot has nothing to do


@pytest.mark.parametrize(("name", "data", "why"), [
    ("stamp.toml", b'format = 1\nunit = "\xff"\n', "stamp.toml: not UTF-8 text (byte 0xff"),
    ("stamp.toml", b"\xef\xbb\xbfformat = 1\n", "stamp.toml: not valid TOML"),
    ("stamp.toml", b"format = \n", "stamp.toml: not valid TOML"),
    ("node.key", b"not a key\n", "node.key: expected base64 of a 32-byte ed25519 private key"),
    ("node.key", base64.b64encode(b"k" * 32) + b"\n", "node_public_key: expected the public key of node.key"),
])
def test_unreadable_stamps_and_wrong_keys_are_refused(tmp_path, name, data, why):
    boot, root, _, _ = make_card(tmp_path, "unit: u8\n")
    (boot / "idlewire" / name).write_bytes(data)
    r = run(boot, root)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and why in r.stdout, r.stdout
    assert sorted(p.name for p in (boot / "idlewire").iterdir()) == ["stamp.refused"]


def test_a_node_key_without_its_stamp_is_erased(tmp_path):
    boot, root, _, _ = make_card(tmp_path, "unit: u9\n")
    (boot / "idlewire" / "stamp.toml").unlink()
    assert consume(str(boot), str(root), ADMIN) == 2
    assert list((boot / "idlewire").iterdir()) == []


def test_no_stamp_nothing_to_do(tmp_path):
    (tmp_path / "idlewire").mkdir()
    assert consume(str(tmp_path), str(tmp_path / "root"), ADMIN) == 0
    assert not (tmp_path / "root").exists()
