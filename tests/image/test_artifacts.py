"""What `idlewire build` leaves in OUT: reproducible bits, a bmap bmaptool accepts, checksums, manifest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import IDLEWIRE, ROOT

pytestmark = pytest.mark.image


def test_reassembly_is_bit_identical(build_image, site_file, tmp_path):
    """Same cached rootfs + bake, assembled again into another directory: the same bytes."""
    first = build_image("x86_64")
    res = subprocess.run([*IDLEWIRE, "build", "--target", "x86_64", "--config", str(site_file),
                          "--out", str(tmp_path), "--no-xz", "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    again = json.loads(res.stdout)
    assert again["cached"] == {"rootfs": True, "bake": True}
    a = first.image.with_suffix(".sha256").read_text().split()[0]
    b = (tmp_path / first.image.name).with_suffix(".sha256").read_text().split()[0]
    assert a == b
    subprocess.run(["cmp", str(first.image), str(tmp_path / first.image.name)], check=True)


def test_bmap_checksums_and_manifest(build_image, tmp_path):
    built = build_image("x86_64")
    img = built.image
    # bmaptool (Debian bmap-tools) copies our image with our bmap and checks every range.
    target = tmp_path / "card.img"
    subprocess.run(["bmaptool", "copy", "--bmap", str(img.with_suffix(".bmap")), str(img), str(target)],
                   check=True, capture_output=True)
    subprocess.run(["cmp", str(img), str(target)], check=True)
    subprocess.run(["sha256sum", "-c", img.with_suffix(".sha256").name], cwd=img.parent, check=True,
                   capture_output=True)
    m = built.manifest
    assert m["target"] == "x86_64" and m["architecture"] == "amd64" and m["suite"] == "trixie"
    assert "linux-image-amd64" in m["packages"] and "openssh-server" in m["packages"]
    assert m["inputs"]["rootfs"] and m["inputs"]["bake"]
    assert m["sha256"][img.name] == img.with_suffix(".sha256").read_text().split()[0]
    # The partition table says what the manifest says.
    table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    assert table["partitions"][0]["start"] * 512 == m["layout"]["boot_offset"]
    assert table["partitions"][1]["uuid"].lower() == m["layout"]["ids"]["root_partuuid"]


def test_no_partial_artifacts_left(build_image):
    out = build_image("x86_64").image.parent
    assert not [p for p in out.iterdir() if p.name.startswith(".") or "partial" in p.name]


def test_python_runs_module():
    assert subprocess.run([sys.executable, "-m", "idlewire", "--version"], capture_output=True,
                          text=True, check=True).stdout.startswith("idlewire ")


def test_pi_boot_partition_has_what_the_firmware_loads(build_image):
    """The Pi boot chain cannot be emulated: check what the firmware reads from the FAT partition."""
    import os

    built = build_image("rpi4-arm64")
    img, layout = built.image, built.manifest["layout"]
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}

    def cat(name: str) -> str:
        return subprocess.run(["mtype", "-i", f"{img}@@{layout['boot_offset']}", f"::/{name}"], env=env,
                              capture_output=True, text=True, check=True).stdout

    listing = subprocess.run(["mdir", "-b", "-i", f"{img}@@{layout['boot_offset']}", "::/"], env=env,
                             capture_output=True, text=True, check=True).stdout
    names = {line.rsplit("/", 1)[-1] for line in listing.split()}
    for needed in ("start4.elf", "fixup4.dat", "bootcode.bin", "bcm2711-rpi-4-b.dtb", "bcm2837-rpi-3-b.dtb",
                   "bcm2711-rpi-400.dtb", "bcm2711-rpi-cm4-io.dtb", "config.txt", "cmdline.txt"):
        assert needed in names, f"{needed} missing from the boot partition"
    config = dict(line.replace("=", " ", 1).split(None, 1) for line in cat("config.txt").splitlines()
                  if line.strip() and not line.startswith("#") and " " in line.replace("=", " ", 1))
    assert config["arm_64bit"].strip() == "1"
    assert config["kernel"].strip() in names and config["initramfs"].split()[0] in names
    cmdline = cat("cmdline.txt").split()
    assert f"root=PARTUUID={layout['ids']['root_partuuid']}" in cmdline
    table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "dos" and table["partitions"][0]["type"] == "c"
