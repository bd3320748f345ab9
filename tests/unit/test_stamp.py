"""`idlewire stamp` on small synthetic images: round trip through mtools, only the boot
partition changes, the .bmap follows (and bmaptool can use it), many units are fast."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import shutil
import time
import tomllib
from pathlib import Path

import pytest
from idlewire import bmap
from idlewire import stamp as st
from idlewire.units import wpa_psk
from imagelab import idlewire, make_image, run

ROOT = Path(__file__).resolve().parents[2]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICCwTJHb49C0zwb8vi6tjbdXa2mX9kiOu2khkhPP5LMu vendor@desk"

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("mcopy", "sfdisk", "mkfs.vfat")),
                                reason="needs mtools, fdisk, dosfstools")



@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    return make_image(tmp_path_factory.mktemp("golden-gpt") / "idlewire-test-1.img", table="gpt")


@pytest.fixture(scope="module")
def golden_dos(tmp_path_factory) -> Path:
    """An MBR image, as the Raspberry Pi target has."""
    return make_image(tmp_path_factory.mktemp("golden-dos") / "idlewire-test-1.img", table="dos")


def _pub(node_key: bytes) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(node_key.strip(), validate=True))
    return base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)).decode()


def _differs_outside(a: Path, b: Path, lo: int, hi: int) -> list[int]:
    """Offsets (MiB granularity) where two files differ outside [lo, hi)."""
    bad = []
    with a.open("rb") as fa, b.open("rb") as fb:
        pos = 0
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if not x and not y:
                return bad
            if x != y and not (lo <= pos and pos + len(x) <= hi):
                # look closer: only bytes outside the boot partition count
                for i in range(0, len(x), 4096):
                    off = pos + i
                    if (off < lo or off >= hi) and x[i:i + 4096] != y[i:i + 4096]:
                        bad.append(off)
            pos += len(x)


@pytest.mark.parametrize("table", ["gpt", "dos"])
def test_round_trip_and_only_the_boot_partition_changes(table, golden, golden_dos, tmp_path):
    golden = golden if table == "gpt" else golden_dos
    unit = tmp_path / "unit.yml"
    unit.write_text(f"unit: shop-1\nhostname: iw-1\nssh_authorized_keys: ['{KEY}']\n"
                    "wifi: {country: DE, ssid: Cafe, psk: 'correct horse'}\npayout_address: addr-0001\n"
                    "caps: {monthly_gb: 300}\n")
    out = tmp_path / "one.img"
    res = idlewire("stamp", golden, "--unit", unit, "--out", out)
    unit_id, pub, path = res.stdout.strip().split("\t")
    assert (unit_id, path) == ("shop-1", str(out))
    layout = st.read_layout(out)
    # read back with mtools, as the unit's first boot will (through the kernel's vfat)
    toml = tomllib.loads(st.read_boot_file(out, layout.boot_offset, "stamp.toml").decode())
    pem = st.read_boot_file(out, layout.boot_offset, "node.key")
    assert _pub(pem) == pub == toml["node_public_key"]
    # the agent reads the key in this format from /etc/idlewire/node.key
    from idlewire_agent import keys

    agent_key = tmp_path / "agent-node.key"
    agent_key.write_bytes(pem)
    assert keys.ed25519_public_b64(keys.ed25519_private(str(agent_key))) == pub
    assert toml["unit"] == "shop-1" and toml["hostname"] == "iw-1" and toml["ssh_authorized_keys"] == [KEY]
    assert toml["wifi"] == {"country": "DE", "ssid": "Cafe", "hidden": False,
                            "psk_hash": wpa_psk("Cafe", "correct horse")}
    assert "correct horse" not in st.read_boot_file(out, layout.boot_offset, "stamp.toml").decode()
    assert toml["payout_address"] == "addr-0001" and toml["caps"] == {"monthly_gb": 300}
    # the golden image is untouched, the copy differs only inside the boot partition
    assert st.boot_listing(golden, layout.boot_offset) == []
    assert _differs_outside(golden, out, layout.boot_offset, layout.boot_end) == []
    # the record CSV for the vendor
    rows = list(csv.DictReader((tmp_path / "stamped-units.csv").open()))
    assert rows[0]["unit"] == "shop-1" and rows[0]["node_public_key"] == pub
    # the new .bmap describes the stamped image: every range's checksum holds
    new = bmap.parse(tmp_path / "one.bmap")
    with out.open("rb") as f:
        for a, b, sha in new.ranges:
            f.seek(a * new.block_size)
            assert hashlib.sha256(f.read((b - a + 1) * new.block_size)).hexdigest() == sha
    assert new.image_size == golden.stat().st_size
    assert set(new.ranges) != set(bmap.parse(golden.with_suffix(".bmap")).ranges)


def test_bmaptool_flashes_a_stamped_image(golden, tmp_path):
    if not shutil.which("bmaptool"):
        pytest.skip("bmaptool (bmap-tools) missing")
    unit = tmp_path / "u.yml"
    unit.write_text("unit: bt-1\n")
    out = tmp_path / "bt.img"
    idlewire("stamp", golden, "--unit", unit, "--out", out)
    card = tmp_path / "card.img"
    run("bmaptool", "copy", "--bmap", tmp_path / "bt.bmap", out, card)
    assert card.read_bytes() == out.read_bytes()


def test_many_units_distinct_keys_and_fast(golden, tmp_path):
    units = tmp_path / "units.csv"
    units.write_text("unit,payout_address\n" + "".join(f"u{i:03},addr-{i:04}\n" for i in range(12)))
    t0 = time.monotonic()
    res = idlewire("stamp", golden, "--units", units, "--out", tmp_path / "out", "--json")
    elapsed = time.monotonic() - t0
    made = json.loads(res.stdout)["units"]
    assert len(made) == 12 and len({u["node_public_key"] for u in made}) == 12
    assert all(u["seconds"] < 1.0 for u in made), [u["seconds"] for u in made]
    assert elapsed < 12, elapsed
    rows = list(csv.DictReader((tmp_path / "out/stamped-units.csv").open()))
    assert [r["unit"] for r in rows] == [f"u{i:03}" for i in range(12)]


def test_refusals(golden, tmp_path):
    unit = tmp_path / "u.yml"
    unit.write_text("unit: r1\n")
    out = tmp_path / "r1.img"
    idlewire("stamp", golden, "--unit", unit, "--out", out)
    again = idlewire("stamp", golden, "--unit", unit, "--out", out, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    restamp = idlewire("stamp", out, "--unit", unit, "--out", tmp_path / "r2.img", check=False)
    assert restamp.returncode == 2 and "already stamped" in restamp.stderr
    assert not (tmp_path / "r2.img").exists()
    xz = idlewire("stamp", tmp_path / "x.img.xz", "--unit", unit, check=False)
    assert xz.returncode == 2 and "no such image" in xz.stderr
    both = idlewire("stamp", golden, check=False)
    assert both.returncode == 2 and "--unit" in both.stderr
    nodir = idlewire("stamp", golden, "--units", tmp_path / "none.csv", "--out", tmp_path / "o", check=False)
    assert nodir.returncode == 2 and "no such file" in nodir.stderr
    assert "Traceback" not in again.stderr + restamp.stderr + xz.stderr + both.stderr + nodir.stderr


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_assembled_copy_is_the_golden_image_outside_the_boot_partition(golden, tmp_path, monkeypatch, mode):
    """Each unit's copy is assembled from the golden image and a stamped scratch copy of its
    boot partition, with O_DIRECT or, where the filesystem refuses it, buffered writes."""
    from idlewire import rawio
    from idlewire.units import load_unit

    if mode == "buffered":
        monkeypatch.setattr(rawio, "open_direct", lambda fd, flags: -1)
    unit = tmp_path / "u.yml"
    unit.write_text("unit: asm-1\npayout_address: addr-0042\n")
    with st.Golden(golden) as g:
        made = [g.stamp(load_unit(unit), tmp_path / f"asm-{i}.img") for i in range(2)]
        work = g.work
    assert not work.exists(), "the scratch directory (node keys) outlives the run"
    layout = st.read_layout(golden)
    for s in made:
        assert s.copy == mode
        assert _differs_outside(golden, s.image, layout.boot_offset, layout.boot_end) == []
        toml = tomllib.loads(st.read_boot_file(s.image, layout.boot_offset, "stamp.toml").decode())
        assert toml["payout_address"] == "addr-0042" and toml["node_public_key"] == s.node_public_key
        new = bmap.parse(s.bmap)
        with s.image.open("rb") as f:
            for a, b, sha in new.ranges:
                f.seek(a * new.block_size)
                assert hashlib.sha256(f.read((b - a + 1) * new.block_size)).hexdigest() == sha
        # sparse like the golden image: nothing mapped beyond what the bmap lists
        fd = os.open(s.image, os.O_RDONLY)
        try:
            assert bmap.data_ranges(fd, new.image_size) == [(a, b) for a, b, _ in _merged(new.ranges)]
        finally:
            os.close(fd)
    assert made[0].node_public_key != made[1].node_public_key


def _merged(ranges):
    out = []
    for a, b, sha in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(b, out[-1][1]), "")
        else:
            out.append((a, b, sha))
    return out
