"""`idlewire flash` on synthetic images, regular files and loop devices: formats, bmaptool both
ways, stamping several cards at once, every refusal, damaged streams, interrupted writes."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from idlewire import flash as fl
from idlewire import stamp as st
from idlewire.errors import UserError
from imagelab import can_loop, idlewire, loop_device, make_image, run, write_sha256

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("mcopy", "sfdisk", "mkfs.vfat", "xz", "zstd")),
                                reason="needs mtools, fdisk, dosfstools, xz-utils, zstd")
needs_loop = pytest.mark.skipif(bool(can_loop()), reason=can_loop() or "")



def refused(res: subprocess.CompletedProcess, words: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert words in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert "nothing written" in res.stderr or "download" in res.stderr or "refusing" in res.stderr


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("golden")
    img = make_image(d / "idlewire-test-1.img")
    run("xz", "-T0", "-3", "-k", img)
    run("zstd", "-q", "-k", img)
    with img.open("rb") as src, gzip.open(d / "idlewire-test-1.img.gz", "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst)
    write_sha256(img, *(d / f"idlewire-test-1.img.{s}" for s in ("xz", "gz", "zst")))
    return img


def blank(path: Path, size: int) -> Path:
    """A sparse file of `size` bytes (a blank card, or a loop device's backing file)."""
    with path.open("wb") as f:
        f.truncate(size)
    return path


def flip(path: Path, offset: int) -> None:
    """One byte of `path` changed in place."""
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def same_as_image(img: Path, target: Path) -> bool:
    size = img.stat().st_size
    with img.open("rb") as a, target.open("rb") as b:
        while size > 0:
            n = min(size, 8 * MiB)
            if a.read(n) != b.read(n):
                return False
            size -= n
    return True


@pytest.mark.parametrize("suffix", ["", ".xz", ".gz", ".zst"])
def test_every_format_to_a_file(golden, tmp_path, suffix):
    src = golden.with_name(golden.name + suffix)
    out = tmp_path / "card.img"
    summary = json.loads(idlewire("flash", src, out, "--json").stdout)
    assert same_as_image(golden, out)
    card = summary["cards"][0]
    assert card["verified"] is True and card["mismatch_count"] == 0
    assert card["written_bytes"] == summary["mapped_bytes"]
    assert summary["sha256_checked"] is bool(suffix)


def test_a_json_flash_that_succeeds_never_imports_rich(golden, tmp_path):
    """Scripts flash with --json: nothing is drawn, so rich (~35 ms of a ~60 ms start) is not
    imported; the progress bars come back when stderr is a terminal or without --json."""
    out = tmp_path / "card.img"
    code = ("import sys; from idlewire.cli import main\n"
            "try:\n    main(sys.argv[1:])\n"
            "finally:\n    print('rich imported:', 'rich' in sys.modules, file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code, "flash", str(golden), str(out), "--json"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["cards"][0]["verified"] is True
    assert res.stderr.strip() == "rich imported: False"
    again = subprocess.run([sys.executable, "-c", code, "flash", str(golden), str(tmp_path / "other.img")],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert again.returncode == 0, again.stderr
    assert "written and verified" in again.stderr and "rich imported: True" in again.stderr


def test_bmap_compatibility_both_ways(golden, tmp_path):
    if not shutil.which("bmaptool"):
        pytest.skip("bmaptool (bmap-tools) missing")
    # ours → bmaptool (raw and xz)
    for src in (golden, golden.with_name(golden.name + ".xz")):
        out = tmp_path / f"bt-{src.suffix}.img"
        run("bmaptool", "copy", "--bmap", golden.with_suffix(".bmap"), src, out)
        assert same_as_image(golden, out)
    # bmaptool's → ours
    theirs = tmp_path / "theirs.bmap"
    run("bmaptool", "create", "-o", theirs, golden)
    out = tmp_path / "ours.img"
    summary = json.loads(idlewire("flash", golden, out, "--bmap", theirs, "--json").stdout)
    assert summary["cards"][0]["verified"] and same_as_image(golden, out)
    out2 = tmp_path / "ours-xz.img"
    idlewire("flash", golden.with_name(golden.name + ".xz"), out2, "--bmap", theirs)
    assert same_as_image(golden, out2)


@needs_loop
def test_loop_devices_stamped_concurrently(golden, tmp_path):
    units = tmp_path / "units.csv"
    units.write_text("unit,hostname,payout_address\nskip-0,,\ncard-1,,addr-0001\ncard-2,,addr-0002\n")
    backs = []
    for i in (1, 2):
        b = blank(tmp_path / f"back{i}.img", golden.stat().st_size + 16 * MiB)
        backs.append(b)
    with loop_device(backs[0]) as d1, loop_device(backs[1]) as d2:
        res = idlewire("flash", golden.with_name(golden.name + ".zst"), d1, d2, "--units", units, "--start", "2",
                       "--record", tmp_path / "rec.csv", "--json")
        cards = json.loads(res.stdout)["cards"]
        assert [c["unit"] for c in cards] == ["card-1", "card-2"]
        assert all(c["verified"] for c in cards)
        assert cards[0]["node_public_key"] != cards[1]["node_public_key"]
        # each card: the stamp of its own unit; outside the boot partition, the image
        layout = st.read_layout(golden)
        for dev, c in zip((d1, d2), cards, strict=True):
            toml = st.read_boot_file(dev, layout.boot_offset, "stamp.toml").decode()
            assert f'unit = "{c["unit"]}"' in toml and c["node_public_key"] in toml
        assert idlewire("flash", golden, d1, "--verify-only", "--skip-boot").returncode == 0
        whole = idlewire("flash", golden, d1, "--verify-only", check=False)
        assert whole.returncode == 1 and "differs" in whole.stderr
    rec = (tmp_path / "rec.csv").read_text()
    assert "card-1" in rec and "card-2" in rec and str(d2) in rec


@needs_loop
def test_refusals_on_devices(golden, tmp_path):
    size = golden.stat().st_size
    # a path under /dev that does not exist: refused, and no file appears there
    ghost = Path("/dev/idlewire-test-no-such-card")
    refused(idlewire("flash", golden, ghost, check=False), "no such device")
    assert not ghost.exists()
    refused(idlewire("flash", golden, "/dev/null", check=False), "not a block device")
    # the image itself, directly or through a loop device
    before = golden.read_bytes()[:MiB]
    refused(idlewire("flash", golden, golden, check=False), "is the image")
    with loop_device(golden) as dev:
        refused(idlewire("flash", golden, dev, check=False), "over the image itself")
    assert golden.read_bytes()[:MiB] == before
    # smaller than the image
    small = blank(tmp_path / "small.img", size - MiB)
    with loop_device(small) as dev:
        refused(idlewire("flash", golden, dev, check=False), "smaller than the image")
    # a partition, a mounted partition, a device held open exclusively
    disk = tmp_path / "disk.img"
    shutil.copyfile(golden, disk)
    dev = run("losetup", "-f", "--show", "-P", disk, text=True).stdout.strip()
    mnt = Path(tempfile.mkdtemp(prefix="idlewire-test-mnt-"))
    try:
        part = Path(f"{dev}p1")
        sys_part = Path("/sys/block") / Path(dev).name / f"{Path(dev).name}p1" / "dev"
        subprocess.run(["partx", "-a", dev], capture_output=True, check=False)  # when -P scanned nothing
        for _ in range(50):
            if part.exists() or sys_part.exists():
                break
            time.sleep(0.1)
        if not part.exists():  # no udev here: make the node ourselves (outside /dev)
            major, minor = map(int, sys_part.read_text().split(":"))
            part = tmp_path / "part1"
            os.mknod(part, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
        refused(idlewire("flash", golden, part, check=False), "is a partition")
        root_part = Path(str(part)[:-1] + "2")
        if not root_part.exists():
            major, minor = map(int, Path(str(sys_part).replace("p1/dev", "p2/dev")).read_text().split(":"))
            os.mknod(root_part, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
        run("mount", "-o", "ro", root_part, mnt)  # the ext4 root (this kernel has no vfat)
        try:
            before = disk.read_bytes()[:MiB]
            refused(idlewire("flash", golden, dev, check=False), "is mounted on")
            assert disk.read_bytes()[:MiB] == before
        finally:
            run("umount", mnt)
        for _ in range(100):  # the mount's claim on the disk goes away shortly after umount
            try:
                fd = os.open(dev, os.O_RDONLY | os.O_EXCL)
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"{dev} stayed busy after umount")
        try:
            res = idlewire("flash", golden, dev, check=False)
            assert res.returncode == 2 and "in use" in res.stderr, res.stderr
        finally:
            os.close(fd)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
        mnt.rmdir()


def test_refuses_the_system_disk_and_fixed_disks():
    """Checked in-process with inspect_target, which never opens anything for writing."""
    root_dev = os.stat("/").st_dev
    disks = fl._disk_of(f"{os.major(root_dev)}:{os.minor(root_dev)}")
    if not disks:
        pytest.skip("/ is not on a block device here")
    for name in disks:
        with pytest.raises(UserError, match="root filesystem"):
            fl.inspect_target(Path(f"/dev/{name}"), 1)
    fixed = [p for p in Path("/sys/block").iterdir()
             if p.name not in disks and (p / "removable").read_text().strip() == "0"
             and not p.name.startswith(("loop", "mmcblk", "ram")) and "/usb" not in str(p.resolve())
             and not any((p / "holders").iterdir()) and Path(f"/dev/{p.name}").exists()]
    if fixed:
        with pytest.raises(UserError, match="fixed"):
            fl.inspect_target(Path(f"/dev/{fixed[0].name}"), 1)


def test_damaged_images_are_refused_before_writing(golden, tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    out = tmp_path / "card.img"
    # .sha256 does not match the .xz
    xz = d / "idlewire-test-1.img.xz"
    shutil.copyfile(golden.with_name(golden.name + ".xz"), xz)
    shutil.copyfile(golden.with_suffix(".bmap"), d / "idlewire-test-1.bmap")
    (d / "idlewire-test-1.sha256").write_text(f"{'0' * 64}  {xz.name}\n")
    refused(idlewire("flash", xz, out, check=False), "sha256 does not match")
    assert not out.exists()
    # a truncated .xz (no .sha256 to catch it): the xz index is missing
    (d / "idlewire-test-1.sha256").unlink()
    data = xz.read_bytes()
    xz.write_bytes(data[: len(data) // 2])
    refused(idlewire("flash", xz, out, check=False), "truncated")
    assert not out.exists()
    # a raw image whose mapped data does not match its bmap
    raw = d / "idlewire-test-1.img"
    shutil.copyfile(golden, raw)
    bmap_ranges = fl.bm.parse(d / "idlewire-test-1.bmap").ranges
    victim = bmap_ranges[len(bmap_ranges) // 2][0] * 4096 + 100
    flip(raw, victim)
    refused(idlewire("flash", raw, out, check=False), "do not match the checksum")
    assert not out.exists()
    # a file target is checked while it is written aside: a damaged image leaves it as it was
    out.write_bytes(b"the card's old content")  # not an image idlewire wrote: only with --force
    refused(idlewire("flash", golden, out, check=False), "not an image idlewire wrote")
    refused(idlewire("flash", raw, out, "--force", check=False), "do not match the checksum")
    assert out.read_bytes() == b"the card's old content"
    assert not (tmp_path / ".card.img.partial").exists()
    out.unlink()
    # a bmap that belongs to another image
    other = make_image(tmp_path / "other.img", size=160 * MiB)
    refused(idlewire("flash", golden, out, "--bmap", other.with_suffix(".bmap"), check=False),
            "belongs to another image")
    assert not out.exists()


@needs_loop
def test_corrupt_stream_leaves_no_partition_table_and_verify_catches_it(golden, tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    xz = d / "idlewire-test-1.img.xz"
    data = bytearray(golden.with_name(golden.name + ".xz").read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)  # damage inside a block: the index still reads fine
    xz.write_bytes(bytes(data))
    shutil.copyfile(golden.with_suffix(".bmap"), d / "idlewire-test-1.bmap")
    back = tmp_path / "back.img"
    shutil.copyfile(golden, back)  # the card held a good image before
    with loop_device(back) as dev:
        res = idlewire("flash", xz, dev, check=False)
        assert res.returncode == 2 and "corrupt" in res.stderr and "Traceback" not in res.stderr, res.stderr
        with open(dev, "rb") as f:
            assert f.read(MiB) == bytes(MiB), "a partition table was left on a half-written card"
        ver = idlewire("flash", golden, dev, "--verify-only", check=False)
        assert ver.returncode == 1 and "differs" in ver.stderr


def _damaged_copy(golden: Path, d: Path) -> Path:
    """A copy of the golden image (with its bmap) with one byte changed in a range half-way through."""
    d.mkdir()
    raw = d / golden.name
    shutil.copyfile(golden, raw)
    shutil.copyfile(golden.with_suffix(".bmap"), d / golden.with_suffix(".bmap").name)
    ranges = [r for r in fl.bm.parse(raw.with_suffix(".bmap")).ranges if r[0] * 4096 >= 2 * MiB]
    victim = ranges[len(ranges) // 2][0] * 4096 + 100
    flip(raw, victim)
    return raw


def _grown_card(golden: Path, path: Path) -> Path:
    """A card that held the golden image and was grown on first boot: 8 MiB larger than the
    image, its backup GPT moved to the card's last sector (where firmware looks for it)."""
    shutil.copyfile(golden, path)
    with path.open("r+b") as f:
        f.truncate(golden.stat().st_size + 8 * MiB)
    run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", "--relocate", "gpt-bak-std", path)
    assert subprocess.run(["sfdisk", "--dump", path], capture_output=True).returncode == 0
    return path


@needs_loop
def test_a_damaged_image_leaves_a_card_with_nothing_bootable(golden, tmp_path):
    """By default the image is checked beside the write: a byte wrong half-way through stops it
    before the new partition table, and the old one (MBR, primary GPT and the backup GPT at the
    card's end) was erased first, so neither partitioning tool nor firmware finds a table."""
    raw = _damaged_copy(golden, tmp_path / "img")
    back = _grown_card(golden, tmp_path / "back.img")
    with loop_device(back) as dev:
        res = idlewire("flash", "--json", raw, dev, check=False)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert "do not match the checksum" in res.stderr and "nothing bootable was written" in res.stderr
        assert "nothing written" not in res.stderr, "a card that was written to must not be called untouched"
        size = back.stat().st_size
        with open(dev, "rb") as f:
            assert f.read(MiB) == bytes(MiB), "the old MBR / primary GPT survived"
            f.seek(size - MiB)
            assert f.read(MiB) == bytes(MiB), "the old backup GPT at the card's end survived"
        dump = subprocess.run(["sfdisk", "--dump", dev], capture_output=True, text=True)
        assert dump.returncode != 0 or "start=" not in dump.stdout, dump.stdout
        ver = idlewire("flash", golden, dev, "--verify-only", check=False)
        assert ver.returncode == 1 and "differs" in ver.stderr
        # the same card then takes a good image, and verifies
        idlewire("flash", golden, dev)
        assert idlewire("flash", golden, dev, "--verify-only").returncode == 0


@needs_loop
@pytest.mark.parametrize("suffix", ["", ".xz"])
def test_check_first_refuses_a_damaged_image_before_writing_a_byte(golden, tmp_path, suffix):
    """--check-first: the whole image is checked before the card is opened for writing; a damaged
    one (uncompressed, or compressed with a stream that decompresses fine) leaves every byte of
    the card as it was, its old partition table included."""
    raw = _damaged_copy(golden, tmp_path / "img")
    image = raw
    if suffix:
        run("xz", "-T0", "-1", "-k", raw)
        image = raw.with_name(raw.name + suffix)
        raw.unlink()  # only the compressed image and its bmap
    back = _grown_card(golden, tmp_path / "back.img")
    before = fl.source.hash_file(back)
    with loop_device(back) as dev:
        res = idlewire("flash", image, dev, "--check-first", check=False)
        refused(res, "do not match the checksum")
        assert "nothing written" in res.stderr
        with open(dev, "rb") as f:  # through the device, as a reader of the card sees it
            h = hashlib.sha256()
            while chunk := f.read(8 * MiB):
                h.update(chunk)
        assert h.hexdigest() == before, "--check-first wrote to the card"
    assert fl.source.hash_file(back) == before
    # a sound image with --check-first is written and verified as usual
    with loop_device(back) as dev:
        idlewire("flash", golden.with_name(golden.name + ".xz"), dev, "--check-first")
        assert idlewire("flash", golden, dev, "--verify-only").returncode == 0


@needs_loop
def test_interrupted_write_is_caught_by_verify_only(golden, tmp_path):
    if not shutil.which("strace"):
        pytest.skip("strace missing")
    back = blank(tmp_path / "back.img", golden.stat().st_size)
    with loop_device(back) as dev:
        # the kernel kills the flash at its 6th write (strace fault injection): a pulled card
        res = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64,copy_file_range",
                              "-e", "inject=pwrite64,copy_file_range:signal=SIGKILL:when=6",
                              sys.executable, "-m", "idlewire", "flash", golden.with_name(golden.name + ".gz"),
                              dev], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode != 0
        ver = idlewire("flash", golden, dev, "--verify-only", "--json", check=False)
        assert ver.returncode == 1 and json.loads(ver.stdout)["cards"][0]["mismatch_count"] > 0
        idlewire("flash", golden, dev)
        assert idlewire("flash", golden, dev, "--verify-only").returncode == 0
        with contextlib.suppress(OSError), open(dev, "rb") as f:
            assert f.read(512)[510:] == b"\x55\xaa"


def _flash_in_process(image: Path, target: Path, units=None) -> fl.FlashResult:
    src = fl.open_source(image)
    return fl.flash(src, [fl.inspect_target(target, src.size)], units)


@pytest.mark.parametrize(("kind", "source", "where"), [
    ("file", "", "body"),  # checked against the image bytes (which the bmap vouched for)
    ("loop", "", "body"),
    ("file", ".xz", "body"),  # compressed: checked against the bmap's sha256
    ("file", "", "boot"),  # stamped while flashing: checked against the stamped boot partition
])
def test_readback_mismatch_while_writing_is_caught_and_named(golden, tmp_path, monkeypatch, kind, source, where):
    """The device returns one wrong byte inside a range read back while later ranges are still
    being written: that range, and only it, is reported — whichever way the range is checked."""
    if kind == "loop" and can_loop():
        pytest.skip(can_loop())
    image = golden.with_name(golden.name + source)
    src = fl.open_source(image)
    units = None
    if where == "boot":
        from idlewire.units import load_unit

        (tmp_path / "unit.yml").write_text("unit: lie-1\npayout_address: addr-lie\n")
        units = [load_unit(tmp_path / "unit.yml")]
        layout = st.read_layout(golden)
        inside = [(a, b) for a, b, _ in src.byte_ranges() if layout.boot_offset <= a < layout.boot_end]
    else:
        inside = [(a, b) for a, b, _ in src.byte_ranges() if a >= MiB and b - a >= 2 * 4096]
    start, end = inside[0]  # read back long before the last range is written
    victim = start + min(4096, (end - start) // 2) + 7
    seen = []
    real = fl.ReadBack._pread

    def lying_device(self, view, off):
        n = real(self, view, off)
        if off <= victim < off + n:
            view[victim - off] ^= 0x55
            seen.append(self.direct)
        return n

    monkeypatch.setattr(fl.ReadBack, "_pread", lying_device)
    if kind == "file":
        res = _flash_in_process(image, tmp_path / "card.img", units)
    else:
        back = blank(tmp_path / "back.img", golden.stat().st_size)
        with loop_device(back) as dev:
            res = _flash_in_process(image, Path(dev), units)
    card = res.cards[0]
    assert seen == [True], "the lie was not read back, or not through O_DIRECT"
    assert card.verify_overlapped and card.verified is False
    bad = card.mismatches
    assert len(bad) == 1 and bad[0][0] <= victim < bad[0][1], (card.mismatches, victim)
    if where == "body":
        assert bad == [(start, end)]
    assert not (tmp_path / "card.img").exists(), "a file that failed its read-back must not be published"


@needs_loop
def test_a_file_target_keeps_its_mode_and_owner_and_is_never_one_a_loop_device_holds(golden, tmp_path):
    """A file target is replaced by a new file (written aside, renamed): the new one keeps the
    old one's mode and owner; a file a loop device is attached to is refused (the device would
    go on showing the old contents), naming the device to flash instead."""
    out = tmp_path / "card.img"
    out.write_bytes(b"old")
    os.chmod(out, 0o600)
    os.chown(out, 4242, 4343)
    assert idlewire("flash", golden, out, "--force").returncode == 0
    st_ = out.stat()
    assert (stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid) == (0o600, 4242, 4343)
    assert same_as_image(golden, out)
    back = blank(tmp_path / "back.img", golden.stat().st_size)
    with loop_device(back) as dev:
        res = idlewire("flash", golden, back, check=False)
        refused(res, f"is attached to {dev}")
        assert f"losetup -d {dev}" in res.stderr
    assert back.stat().st_blocks == 0, "the refused file was written"
    assert idlewire("flash", golden, back).returncode == 0  # detached: fine


@needs_loop
def test_an_image_changed_while_it_is_written_is_not_called_verified(golden, tmp_path, monkeypatch):
    """An uncompressed image is read back against its own bytes (checked against the bmap first):
    if the file changes between the check and the read-back, the card is not reported verified."""
    image = tmp_path / golden.name
    shutil.copyfile(golden, image)
    shutil.copyfile(golden.with_suffix(".bmap"), image.with_suffix(".bmap"))
    src = fl.open_source(image)  # checked against the bmap here
    real = fl.send_mapped
    done = []

    def meddle(writers, view, pieces, **kw):
        if not done:  # someone writes to the image after the check, before its bytes are sent
            start = pieces[0].start
            with image.open("r+b") as f:
                f.seek(start)
                b = f.read(1)
                f.seek(start)
                f.write(bytes([b[0] ^ 1]))
            done.append(start)
        return real(writers, view, pieces, **kw)

    monkeypatch.setattr(fl.engine, "send_mapped", meddle)
    back = blank(tmp_path / "back.img", golden.stat().st_size)
    with loop_device(back) as dev:
        card = fl.flash(src, [fl.inspect_target(dev, src.size)]).cards[0]
    assert done and card.verified is False
    assert "changed while it was being written" in card.error


@needs_loop
def test_corruption_after_the_write_is_caught_by_verify_only(golden, tmp_path):
    src = fl.open_source(golden)
    start, end, _ = max(src.byte_ranges(), key=lambda r: r[1] - r[0])
    victim = (start + end) // 2
    back = blank(tmp_path / "back.img", golden.stat().st_size)
    file_target = tmp_path / "card.img"
    idlewire("flash", golden, file_target)
    with loop_device(back) as dev:
        idlewire("flash", golden, dev)
        assert idlewire("flash", golden, dev, file_target, "--verify-only").returncode == 0
        for where in (back, file_target):  # one byte flipped behind the flasher's back
            with where.open("r+b") as f:
                f.seek(victim)
                byte = f.read(1)
                f.seek(victim)
                f.write(bytes([byte[0] ^ 1]))
        res = idlewire("flash", golden, dev, file_target, "--verify-only", "--json", check=False)
    assert res.returncode == 1
    cards = json.loads(res.stdout)["cards"]
    assert [c["mismatches"] for c in cards] == [[[start, end]]] * 2
    assert f"first at bytes {start}-{end}" in res.stderr


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, (256 << 10) + 1, 3 * (8 << 20) // 2 + 123])
def test_the_read_back_comparison_sees_one_byte_anywhere_and_nothing_outside(n):
    """The read-back compares what it read from the card (a bytearray) with the image (an mmap)
    by fl._same: a byte off at either end, in the middle or at a page boundary is a difference;
    bytes just outside the compared range are not."""
    import mmap

    data = os.urandom(n + 3 * 4096)
    a, b = bytearray(len(data)), mmap.mmap(-1, len(data))
    a_off, b_off = 4096 + 100, 4096  # different offsets into the two buffers
    a[a_off:a_off + n] = data[:n]
    b[b_off:b_off + n] = data[:n]
    assert fl._same(a, a_off, b, b_off, n)
    for pos in sorted({0, n // 2, 4095, 4096, n - 1} & set(range(n))):
        a[a_off + pos] ^= 0x01
        assert not fl._same(a, a_off, b, b_off, n), pos
        a[a_off + pos] ^= 0x01
        b[b_off + pos] ^= 0x80
        assert not fl._same(a, a_off, b, b_off, n), pos
        b[b_off + pos] ^= 0x80
    a[a_off - 1] ^= 0xFF
    a[a_off + n] ^= 0xFF
    b[b_off + n] ^= 0xFF
    assert fl._same(a, a_off, b, b_off, n)
    # a range running past the end of the image is not the same, though the bytes there match
    short = mmap.mmap(-1, b_off + n)
    short[:] = b[:b_off + n]
    assert fl._same(a, a_off, short, b_off, n) and not fl._same(a, a_off, short, b_off, n + 1)
