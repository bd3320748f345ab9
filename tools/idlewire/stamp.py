"""Stamping: one unit's identity and settings written into a copy of the golden image.

Only the FAT boot partition changes, and it is never mounted: the files go in with mtools at the
partition's byte offset (`mcopy -i IMAGE@@OFFSET`), the offset read from the partition table with
`sfdisk -J`. What lands on the boot partition (consumed and erased by the unit's first boot, see
`idlewire-agent consume-stamp`, agent/idlewire_agent/consume.py)::

    idlewire/stamp.toml   unit id, hostname, SSH keys, Wi-Fi (hashed PSK), payout address, caps
    idlewire/node.key     the node's ed25519 private key (base64 of its 32 bytes: the agent's format)

The output image is a sparse copy of the golden one (a reflink when the filesystem can, else
copy_file_range of the mapped ranges only), and its .bmap is the golden one with the boot
partition's ranges recomputed.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import hashlib
import io
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from idlewire_agent import schema

from . import bmap, rawio
from .errors import UserError
from .nodekey import load_node_key
from .units import Unit

STAMP_DIR = "idlewire"
STAMP_FORMAT = schema.STAMP_FORMAT
FICLONE = 0x40049409
STAMP_CHUNK = 32 << 20  # direct writes of a stamped copy, from a mapping of the golden image
RECORD_COLUMNS = ("unit", "hostname", "node_public_key", "image", "target", "stamped_at")


# --- keys -----------------------------------------------------------------------------------

def node_key(unit: Unit) -> tuple[bytes, str]:
    """(the private key as the agent reads it: base64 of 32 raw bytes + newline, base64 of the
    raw public key); generated when the unit gives none."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = load_node_key(unit.node_key_pem) if unit.node_key_pem else Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(priv) + b"\n", base64.b64encode(pub).decode()


# --- stamp content --------------------------------------------------------------------------

def stamp_values(unit: Unit, public_key: str) -> dict:
    """What goes into stamp.toml, keyed as schema.STAMP names it."""
    values: dict = {"format": STAMP_FORMAT, "unit": unit.unit, "hostname": unit.hostname,
                    "node_public_key": public_key,
                    "stamped_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "ssh_authorized_keys": list(unit.ssh_authorized_keys)}
    if unit.payout_address:
        values["payout_address"] = unit.payout_address
    if unit.wifi:
        w = unit.wifi
        values["wifi"] = {"country": w.country, "ssid": w.ssid, "psk_hash": w.psk_hash, "hidden": w.hidden}
    if unit.caps:
        values["caps"] = dict(sorted(unit.caps.items()))
    return values


def stamp_toml(unit: Unit, public_key: str) -> bytes:
    """stamp.toml for one unit, checked against the schema the node reads it with: a value the
    node would refuse is refused here, in one line naming the unit and the field."""
    values = stamp_values(unit, public_key)
    _, problems = schema.check_stamp(values)
    if problems:
        name, _, why = problems[0].partition(": ")
        raise UserError(f"{unit.source or unit.unit}: unit {unit.unit!r}: field '{name}': {why}")
    return schema.dump_toml(values, "idlewire unit stamp: read once at first boot into /etc/idlewire, "
                            "then erased.").encode()


# --- the image ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    table: str  # gpt | dos
    size: int
    boot_offset: int
    boot_size: int

    @property
    def boot_end(self) -> int:
        return self.boot_offset + self.boot_size


def read_layout(image: Path) -> Layout:
    """Partition 1 (the FAT boot partition) of an image, from `sfdisk -J`."""
    try:
        out = subprocess.run(["sfdisk", "-J", str(image)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise UserError("sfdisk is not installed (Debian package 'fdisk')") from None
    if out.returncode != 0:
        raise UserError(f"{image}: no partition table found ({out.stderr.strip().splitlines()[-1:]}); "
                        "is this an idlewire image?")
    pt = json.loads(out.stdout)["partitiontable"]
    parts = pt.get("partitions") or []
    sector = int(pt.get("sectorsize", 512))
    if not parts:
        raise UserError(f"{image}: the partition table is empty; is this an idlewire image?")
    p = parts[0]
    vfat = {"C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", "c", "b", "e", "ef"}
    if str(p.get("type", "")).upper() not in {t.upper() for t in vfat}:
        raise UserError(f"{image}: partition 1 has type {p.get('type')}, not a FAT boot partition")
    return Layout(pt["label"], image.stat().st_size, p["start"] * sector, p["size"] * sector)


def _mtools(args: list[str], image: Path, offset: int, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0", "TZ": "UTC"}
    try:
        res = subprocess.run([args[0], "-i", f"{image}@@{offset}", *args[1:]], capture_output=True,
                             text=True, env=env, check=False)
    except FileNotFoundError:
        raise UserError(f"{args[0]} is not installed (Debian package 'mtools')") from None
    if check and res.returncode != 0:
        raise UserError(f"{image}: {args[0]} on the boot partition failed: "
                        f"{(res.stderr or res.stdout).strip().splitlines()[-1:] or res.returncode}")
    return res


def boot_listing(image: Path, offset: int, path: str = f"::/{STAMP_DIR}") -> list[str]:
    """File names in a directory of the boot partition ([] when it does not exist)."""
    res = _mtools(["mdir", "-b", path], image, offset, check=False)
    if res.returncode != 0:
        return []
    return sorted(line.rsplit("/", 1)[-1] for line in res.stdout.split() if line.strip())


def read_boot_file(image: Path, offset: int, name: str) -> bytes:
    res = subprocess.run(["mtype", "-i", f"{image}@@{offset}", f"::/{STAMP_DIR}/{name}"], capture_output=True,
                         env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}, check=False)
    if res.returncode != 0:
        raise UserError(f"{image}: no {STAMP_DIR}/{name} on the boot partition")
    return res.stdout


def write_stamp_files(image: Path, offset: int, files: dict[str, bytes], present: list[str] | None = None) -> None:
    """Write files into ::/idlewire/ of the FAT at `offset`; refuses a partition already stamped.
    `present`: the directory's listing when already known (a copy of a checked golden image)."""
    present = boot_listing(image, offset) if present is None else present
    if "stamp.toml" in present or "stamp.done" in present:
        raise UserError(f"{image}: already stamped (boot partition has {STAMP_DIR}/stamp.toml or "
                        "stamp.done); stamp a copy of the golden image instead")
    if not present:
        _mtools(["mmd", "-D", "s", f"::/{STAMP_DIR}"], image, offset, check=False)
    with tempfile.TemporaryDirectory(prefix="idlewire-stamp-") as tmp:
        paths = []
        for name, data in files.items():
            p = Path(tmp) / name
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(str(p))
        _mtools(["mcopy", "-o", "-Q", *paths, f"::/{STAMP_DIR}/"], image, offset)


# --- copies and block maps -------------------------------------------------------------------

def sparse_copy(src: Path, dst: Path, ranges: list[tuple[int, int]] | None = None,
                block: int = bmap.BLOCK) -> str:
    """Copy `src` into a new `dst`: a reflink when possible, else only the mapped ranges.

    Returns how it was done ("reflink" or "ranges"). `ranges` are inclusive block ranges; when
    absent they are found with SEEK_DATA.
    """
    size = src.stat().st_size
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                fcntl.ioctl(dfd, FICLONE, sfd)
                return "reflink"
            except OSError:
                pass
            os.ftruncate(dfd, size)
            if ranges is None:
                ranges = bmap.data_ranges(sfd, size, block)
            for first, last in ranges:
                off, end = first * block, min((last + 1) * block, size)
                while off < end:
                    n = os.copy_file_range(sfd, dfd, end - off, off, off)
                    if n == 0:
                        break
                    off += n
            return "ranges"
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


# --- one unit --------------------------------------------------------------------------------

@dataclass
class Stamped:
    unit: Unit
    image: Path
    bmap: Path | None
    node_public_key: str
    copy: str
    seconds: float


def companions(image: Path) -> tuple[str, Path]:
    """(stem, directory) of an artifact set: idlewire-x86_64-0.1.0.img → idlewire-x86_64-0.1.0."""
    name = image.name
    for suffix in (".img.xz", ".img.gz", ".img.zst", ".img"):
        if name.endswith(suffix):
            return name[: -len(suffix)], image.parent
    return image.stem, image.parent


def find_bmap(image: Path) -> Path | None:
    stem, d = companions(image)
    for cand in (d / f"{stem}.bmap", d / f"{stem}.img.bmap", d / f"{image.name}.bmap"):
        if cand.exists():
            return cand
    return None


def check_golden(image: Path) -> tuple[Layout, bmap.BlockMap | None, list[str]]:
    """The golden image's layout, its .bmap (None when there is none) and its ::/idlewire listing."""
    if not image.exists():
        raise UserError(f"{image}: no such image")
    if not image.name.endswith(".img"):
        raise UserError(f"{image}: stamping needs the uncompressed .img (it writes a copy with one "
                        "partition changed); decompress it first, or stamp while flashing with "
                        "`idlewire flash IMAGE DEV --unit unit.yml`")
    layout = read_layout(image)
    bpath = find_bmap(image)
    golden = bmap.parse(bpath) if bpath else None
    if golden and golden.image_size != layout.size:
        raise UserError(f"{bpath}: describes an image of {golden.image_size} bytes but {image} has "
                        f"{layout.size}: the bmap belongs to another image")
    present = boot_listing(image, layout.boot_offset)
    if "stamp.toml" in present or "stamp.done" in present:
        raise UserError(f"{image}: already stamped ({STAMP_DIR}/ on the boot partition); stamp the "
                        "golden image instead")
    return layout, golden, present


class Golden:
    """A golden image made ready, once, for stamping any number of units.

    Each unit's copy is assembled rather than copied and edited: the blocks around the boot
    partition come from a small per-unit scratch file (a sparse copy of the golden boot
    partition, stamped with mtools), every other mapped block straight from the golden image.
    The output is written with O_DIRECT from a mapping of the golden image (no page-cache copy,
    no writeback stalls), or is a reflink of it where the filesystem can. Its .bmap is the
    golden one with the boot partition's ranges recomputed from the scratch file.
    """

    def __init__(self, image: Path):
        self.image = image
        self.layout, self.bmap, self.listing = check_golden(image)
        self.size = self.layout.size
        self.bs = self.bmap.block_size if self.bmap else bmap.BLOCK
        self.first_in = self.layout.boot_offset // self.bs  # blocks touching the boot partition
        self.last_in = (self.layout.boot_end - 1) // self.bs
        self.fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        self.work = Path(tempfile.mkdtemp(prefix="idlewire-stamp-"))  # 0700: node keys pass here
        self.count = itertools.count(1)
        self.map, self.view = None, memoryview(b"")
        try:
            self.map, self.view = rawio.map_file(self.fd)  # once: unmapping a big mapping is not free
            blocks = ([(a, b) for a, b, _ in self.bmap.ranges] if self.bmap
                      else bmap.data_ranges(self.fd, self.size, self.bs))
            # golden ranges outside the boot blocks (with checksums when there is a bmap) …
            self.outside: list[tuple[int, int, str]] = []
            for i, (a, b) in enumerate(blocks):
                whole = self.bmap.ranges[i][2] if self.bmap else ""
                if b < self.first_in or a > self.last_in:
                    self.outside.append((a, b, whole))
                    continue
                for x, y in ((a, min(b, self.first_in - 1)), (max(a, self.last_in + 1), b)):
                    if x <= y:
                        self.outside.append((x, y, bmap._range_sha(self.fd, x, y, self.size, self.bs)
                                             if self.bmap else ""))
            # … and the boot blocks' data in a sparse prefix file, copied per unit
            self.prefix = self.work / "golden-boot.img"
            pfd = os.open(self.prefix, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(pfd, self.size)
                for a, b in blocks:
                    x, y = max(a, self.first_in), min(b, self.last_in)
                    off, end = x * self.bs, min((y + 1) * self.bs, self.size)
                    while off < end:
                        n = os.copy_file_range(self.fd, pfd, end - off, off, off)
                        if n == 0:
                            break
                        off += n
            finally:
                os.close(pfd)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        rawio.unmap(self.map, self.view)
        self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> Golden:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stamp(self, unit: Unit, out: Path) -> Stamped:
        """One unit's stamped copy at `out` (+ its .bmap when the golden image has one)."""
        t0 = time.monotonic()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial")
        tmp_bmap = None
        scratch = self.work / f"boot-{next(self.count)}.img"
        try:
            sparse_copy(self.prefix, scratch)
            pem, pub = node_key(unit)
            write_stamp_files(scratch, self.layout.boot_offset,
                              {"stamp.toml": stamp_toml(unit, pub), "node.key": pem}, present=self.listing)
            sfd = os.open(scratch, os.O_RDONLY | os.O_CLOEXEC)
            smap, sview = rawio.map_file(sfd)
            try:
                inside = []
                for a, b in bmap.data_ranges(sfd, self.size, self.bs):
                    a, b = max(a, self.first_in), min(b, self.last_in)
                    if a <= b:
                        piece = sview[a * self.bs:min((b + 1) * self.bs, self.size)]
                        inside.append((a, b, hashlib.sha256(piece).hexdigest() if self.bmap else ""))
                        piece.release()
                how = self._assemble(tmp, sview, inside)
            finally:
                rawio.unmap(smap, sview)
                os.close(sfd)
            bpath = None
            if self.bmap:
                new = bmap.BlockMap(self.size, self.bs, tuple(sorted(self.outside + inside)))
                stem, _ = companions(out)
                bpath = out.with_name(f"{stem}.bmap")
                tmp_bmap = bpath.with_name(f".{bpath.name}.partial")
                tmp_bmap.write_text(bmap.to_xml(new))
                tmp_bmap.rename(bpath)
            tmp.rename(out)
            return Stamped(unit, out, bpath, pub, how, time.monotonic() - t0)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if tmp_bmap:
                tmp_bmap.unlink(missing_ok=True)
            raise
        finally:
            scratch.unlink(missing_ok=True)

    def _assemble(self, tmp: Path, sview: memoryview, inside: list[tuple[int, int, str]]) -> str:
        """Write the unit's image to `tmp`: golden blocks outside the boot partition, the stamped
        scratch blocks (`sview` maps the scratch file) inside it. Returns how: reflink | direct |
        buffered."""
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        dfd = -1
        try:
            try:
                fcntl.ioctl(fd, FICLONE, self.fd)  # shares the golden blocks: only the boot ones differ
                how, todo = "reflink", [(sview, inside)]
            except OSError:
                os.ftruncate(fd, self.size)
                dfd = rawio.open_direct(fd, os.O_WRONLY)
                how, todo = ("direct" if dfd >= 0 else "buffered"), [(self.view, self.outside), (sview, inside)]
            for view, ranges in todo:
                for a, b, _ in ranges:
                    off, end = a * self.bs, min((b + 1) * self.bs, self.size)
                    for pos in range(off, end, STAMP_CHUNK):
                        rawio.write_at(fd, dfd, view[pos:min(pos + STAMP_CHUNK, end)], pos, aligned=True)
            return how
        finally:
            if dfd >= 0:
                os.close(dfd)
            os.close(fd)


def append_record(path: Path, rows: list[dict[str, str]]) -> None:
    """Add rows to the vendor's CSV of stamped units (public keys), written whole then renamed."""
    existing = ""
    if path.exists():
        existing = path.read_text()
        first = existing.splitlines()[0] if existing else ""
        if first and first.split(",") != list(RECORD_COLUMNS):
            raise UserError(f"{path}: not an idlewire record (its header is not {','.join(RECORD_COLUMNS)}); "
                            "give another --record file")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RECORD_COLUMNS, lineterminator="\n")
    if not existing:
        w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in RECORD_COLUMNS})
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(existing + buf.getvalue())
    tmp.rename(path)
