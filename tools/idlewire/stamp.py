"""Stamping: one unit's identity and settings written into a copy of the golden image.

Only the FAT boot partition changes, and it is never mounted: the files go in with mtools at the
partition's byte offset (`mcopy -i IMAGE@@OFFSET`), the offset read from the partition table with
`sfdisk -J`. What lands on the boot partition (consumed and erased by the unit's first boot, see
`idlewire-agent consume-stamp`, agent/idlewire_agent/consume.py)::

    idlewire/stamp.toml   unit id, hostname, SSH keys, Wi-Fi (hashed PSK), payout address, hub URL
                          (marketplace), region, caps
    idlewire/node.key     the node's ed25519 private key (base64 of its 32 bytes: the agent's format)

The output image is a sparse copy of the golden one (a reflink when the filesystem can, else
copy_file_range of the mapped ranges only), and its .bmap is the golden one with the boot
partition's ranges recomputed.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import itertools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from idlewire_agent import schema

from . import bmap, hostio, rawio, record
from .bootpart import (  # noqa: F401
    FICLONE,
    STAMP_DIR,
    Layout,
    boot_listing,
    companions,
    copy_range,
    find_bmap,
    read_boot_file,
    read_layout,
    sparse_copy,
    write_stamp_files,
)
from .errors import UserError
from .inputs import regular_file
from .nodekey import load_node_key
from .units import Unit

STAMP_FORMAT = schema.STAMP_FORMAT
STAMP_CHUNK = 32 << 20  # direct writes of a stamped copy, from a mapping of the golden image
RECORD_COLUMNS = record.COLUMNS


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
    values.update(unit.settings)  # payout_address, marketplace, region (units.PLAIN), when given
    if unit.wifi:
        w = unit.wifi
        values["wifi"] = {"country": w.country, "ssid": w.ssid, "psk_hash": w.psk_hash, "hidden": w.hidden}
        if w.wpa3:  # SAE needs the passphrase itself (erased from the card at first boot like the rest)
            values["wifi"]["sae_password"] = w.psk
    if unit.pppoe:  # erased from the card at first boot with the rest of the stamp (consume.py)
        values["pppoe"] = dict(unit.pppoe)
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


# --- the boot partition (shared with flash: bootpart.py) -------------------------------------

def stamp_boot(prefix: Path, scratch: Path, layout: Layout, unit: Unit, present: list[str] | None = None) -> str:
    """`scratch`: a sparse copy of `prefix` (an image's golden boot partition) stamped with
    `unit`; returns the unit's node public key. Shared by `stamp` and stamping while flashing."""
    sparse_copy(prefix, scratch)
    pem, pub = node_key(unit)
    write_stamp_files(scratch, layout.boot_offset, {"stamp.toml": stamp_toml(unit, pub), "node.key": pem},
                      present=present)
    return pub


# --- one unit --------------------------------------------------------------------------------

@dataclass
class Stamped:
    unit: Unit
    image: Path
    bmap: Path | None
    node_public_key: str
    copy: str
    seconds: float


def check_golden(image: Path) -> tuple[Layout, bmap.BlockMap | None, list[str]]:
    """The golden image's layout, its .bmap (None when there is none) and its ::/idlewire listing."""
    if not image.exists():
        raise UserError(f"{image}: no such image")
    regular_file(image, "the golden image")
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
        self.count = itertools.count(1)
        self.map, self.view = None, memoryview(b"")
        self.fd, self.work = -1, None
        try:
            with hostio.signals_deferred():  # both are undone by close(), however __init__ ends
                self.fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
                self.work = hostio.secret_dir("idlewire-stamp-")  # 0700 on tmpfs: node keys pass here
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
                    copy_range(self.fd, pfd, x * self.bs, min((y + 1) * self.bs, self.size))
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
        if self.work is not None:
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
            pub = stamp_boot(self.prefix, scratch, self.layout, unit, present=self.listing)
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


def append_record(path: Path, rows: list[dict[str, str]]) -> record.Outcome:
    """Add rows to the vendor's record of stamped units (see record.py: locked, never lost)."""
    return record.append(path, rows)
