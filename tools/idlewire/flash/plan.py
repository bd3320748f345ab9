"""The write plan: which byte ranges go to every target, in which order, checked how.

Ranges are cut at the partition-table regions (first and last MiB: written last) and around the
boot partition when each target gets its own stamped one (an Overlay, built here).
"""

from __future__ import annotations

import itertools
import mmap
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import bmap as bm
from .. import bootpart, stamp
from ..units import Unit
from .source import Source, stream_ranges

MiB = 1 << 20
TABLE = 1 * MiB  # first and last MiB hold MBR / primary GPT / backup GPT: written last


@dataclass
class Piece:
    start: int
    end: int
    sha: str | None  # expected sha256 of target bytes [start, end)
    where: str  # head | body | tail | boot (stamped boot partition)
    # what the target must hold: a mapping of the written file indexed by image offset (the
    # checked raw image, or a stamped overlay); None: compare with `sha` instead
    ref: mmap.mmap | None = None


def split_pieces(ranges: list[tuple[int, int, str]], size: int, skip: tuple[int, int] | None) -> list[Piece]:
    """Pieces to write: ranges cut at the table regions and around `skip` (sha None where cut)."""
    head_end, tail_start = min(TABLE, size), max(size - TABLE, TABLE)
    cuts = sorted({head_end, tail_start, *(skip or ())})
    pieces: list[Piece] = []
    for start, end, sha in ranges:
        bounds = [start] + [c for c in cuts if start < c < end] + [end]
        for a, b in itertools.pairwise(bounds):
            if skip and skip[0] <= a and b <= skip[1]:
                continue
            where = "head" if b <= head_end else "tail" if a >= tail_start else "body"
            pieces.append(Piece(a, b, sha if (a, b) == (start, end) else None, where))
    return pieces


# --- the image's own layout, and stamping while flashing ---------------------------------------

def _sparse(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size)
    return fd


def _fill_raw(src: Source, fd: int, prefix: Path, upto_boot: bool) -> bootpart.Layout:
    """Copy the table (and, `upto_boot`, the boot partition) of a raw image into `fd`."""
    ranges = src.byte_ranges()
    sfd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for a, b, _ in ranges:  # the table first, to learn where the boot partition ends
            if a < TABLE:
                bootpart.copy_range(sfd, fd, a, min(b, TABLE))
        os.fsync(fd)
        layout = bootpart.read_layout(prefix, size=src.size)
        if upto_boot:
            for a, b, _ in ranges:
                bootpart.copy_range(sfd, fd, max(a, layout.boot_offset), min(b, layout.boot_end))
        return layout
    finally:
        os.close(sfd)


def _fill_stream(src: Source, fd: int, prefix: Path, upto_boot: bool) -> bootpart.Layout:
    """The same from a compressed image's stream (read only as far as needed)."""
    layout = None
    gen = stream_ranges(src, [(a, b) for a, b, _ in src.byte_ranges()])
    try:
        for off, data in gen:
            os.pwrite(fd, data, off)
            if layout is None and off + len(data) >= TABLE:
                os.fsync(fd)
                layout = bootpart.read_layout(prefix, size=src.size)
                if not upto_boot:
                    break
            if layout is not None and off + len(data) >= layout.boot_end:
                break
    finally:
        gen.close()
    return layout or bootpart.read_layout(prefix, size=src.size)


def boot_prefix(src: Source, workdir: Path, *, upto_boot: bool = True) -> tuple[Path, bootpart.Layout]:
    """A sparse file holding the image's table and (`upto_boot`) boot partition, and the layout."""
    prefix = workdir / "golden-prefix.img"
    fd = _sparse(prefix, src.size)
    try:
        fill = _fill_raw if src.kind == "raw" else _fill_stream
        return prefix, fill(src, fd, prefix, upto_boot)
    finally:
        os.close(fd)


def image_layout(src: Source) -> bootpart.Layout:
    """The image's own partition layout (from its table, never from a target's)."""
    if src.kind == "raw":
        return bootpart.read_layout(src.path)
    with tempfile.TemporaryDirectory(prefix="idlewire-layout-") as tmp:
        return boot_prefix(src, Path(tmp), upto_boot=False)[1]


@dataclass
class Overlay:
    """A unit's stamped boot partition: a sparse temporary file the size of the image."""

    unit: Unit
    path: Path
    pieces: list[Piece]
    node_public_key: str
    fd: int = -1


def make_overlay(prefix: Path, layout: bootpart.Layout, unit: Unit, workdir: Path, block: int) -> Overlay:
    path = workdir / f"boot-{len(list(workdir.glob('boot-*')))}.img"
    pub = stamp.stamp_boot(prefix, path, layout, unit)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pieces = [Piece(s, e, None, "boot") for s, e in _inside(fd, path.stat().st_size, block, layout)]
    except BaseException:
        os.close(fd)
        raise
    return Overlay(unit, path, pieces, pub, fd)


def _inside(fd: int, size: int, block: int, layout: bootpart.Layout) -> Iterator[tuple[int, int]]:
    """The overlay's mapped byte ranges inside the boot partition (read back against the overlay
    itself, Piece.ref, not a checksum)."""
    for a, b in bm.data_ranges(fd, size, block):
        start, end = max(a * block, layout.boot_offset), min((b + 1) * block, layout.boot_end)
        if start < end:
            yield start, end
