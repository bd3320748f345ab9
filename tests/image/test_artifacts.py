"""What `idlewire build` leaves in OUT: reproducible bits, a bmap bmaptool accepts, checksums, manifest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_sbom_of_the_built_image(build_image):
    """The SBOM beside the image: valid CycloneDX, every package of the manifest, real licences."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    built = build_image("x86_64")
    path = built.image.with_suffix(".cdx.json")
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(path.read_text(), all_errors=True)
    assert errors is None, [str(e) for e in errors][:5]
    doc = json.loads(path.read_text())
    debs = {c["name"]: c for c in doc["components"] if c["bom-ref"].startswith("deb:")}
    assert {n: c["version"] for n, c in debs.items()} == built.manifest["packages"]
    assert {"idlewire-agent", "idlewire-roles"} <= {c["name"] for c in doc["components"]}
    src = {p["name"]: p["value"] for p in debs["libc6"]["properties"]}
    assert src["idlewire:debian:source"] == "glibc"
    named = [n for n, c in debs.items() if c["licenses"] != [{"license": {"name": "NOASSERTION"}}]]
    assert len(named) > len(debs) / 2, "most Debian packages have machine-readable copyright files"
    assert built.manifest["built"] == doc["metadata"]["timestamp"]


def test_signed_build_is_refused_after_one_byte_changes(build_image, site_file, test_key, tmp_path):
    """`build --sign` (cached stages, so seconds), then `flash --key` on a changed copy: refused."""
    build_image("x86_64")
    res = subprocess.run([*IDLEWIRE, "build", "--target", "x86_64", "--config", str(site_file),
                          "--out", str(tmp_path), "--no-compress", "--sign", str(test_key), "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    img = Path(json.loads(res.stdout)["image"])
    for suffix in (".img", ".bmap", ".sha256", ".manifest.json", ".cdx.json"):
        assert img.with_name(img.name.removesuffix(".img") + suffix + ".sig").exists(), suffix
    pub = test_key.with_suffix(".pub")
    from idlewire import signing

    signing.verify_files([img, img.with_suffix(".manifest.json"), img.with_suffix(".cdx.json")], [pub])
    with img.open("r+b") as f:  # one byte inside the root filesystem
        f.seek(img.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    card = tmp_path / "card.img"
    bad = subprocess.run([*IDLEWIRE, "flash", str(img), str(card), "--key", str(pub)],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "does not verify" in bad.stderr and not card.exists(), bad.stderr


def test_from_manifest_replays_the_package_set(build_image, site_file, tmp_path):
    """`build --from MANIFEST`: the kept .debs become the only repository; same package versions."""
    built = build_image("x86_64")
    manifest = built.image.with_suffix(".manifest.json")
    res = subprocess.run([*IDLEWIRE, "build", "--target", "x86_64", "--config", str(site_file),
                          "--out", str(tmp_path), "--no-compress", "--from", str(manifest), "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    again = json.loads((tmp_path / manifest.name).read_text())
    assert again["packages"] == built.manifest["packages"]
    assert again["inputs"]["rootfs"] != built.manifest["inputs"]["rootfs"]  # its own, pinned rootfs


def test_a_rebake_after_one_variable_gives_the_bytes_of_a_cold_bake(build_image, site_file, tmp_path):
    """One agent variable changed: the re-bake applies the agent role alone, onto the layer the
    other roles left in the cache; a cold bake of the same site file (a cache of its own holding
    the same rootfs tarball and nothing else) gives the same image bytes."""
    from idlewire.paths import cache_dir

    first = build_image("x86_64")
    site_b = tmp_path / "site-b.yml"
    site_b.write_text(site_file.read_text().replace("agent_region: DE", "agent_region: FR"))
    assert site_b.read_text() != site_file.read_text()

    def build(out: Path, env: dict) -> dict:
        res = subprocess.run([*IDLEWIRE, "build", "--target", "x86_64", "--config", str(site_b), "--out", str(out),
                              "--no-xz", "--json"], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, **env})
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout)

    again = build(tmp_path / "re", {})
    log = (tmp_path / "re/logs" / f"{first.image.stem}.log").read_text()
    assert again["cached"] == {"rootfs": True, "bake": False}
    assert "roles base, firewall cached" in log and log.count("PLAY RECAP") == 1, "more than the agent re-applied"
    tar = cache_dir() / "rootfs" / first.manifest["inputs"]["rootfs"]
    fresh = tmp_path / "cache"
    (fresh / "rootfs").mkdir(parents=True)
    shutil.copy2(tar, fresh / "rootfs" / tar.name)  # its mtime too: the build's epoch without SOURCE_DATE_EPOCH
    cold = build(tmp_path / "cold", {"IDLEWIRE_CACHE": str(fresh)})
    assert cold["cached"] == {"rootfs": True, "bake": False}
    assert (tmp_path / "cold/logs" / f"{first.image.stem}.log").read_text().count("PLAY RECAP") == 3
    subprocess.run(["cmp", again["image"], cold["image"]], check=True)
    assert Path(again["image"]).with_suffix(".sha256").read_text().split()[0] != \
        first.image.with_suffix(".sha256").read_text().split()[0], "the changed variable changed nothing"
