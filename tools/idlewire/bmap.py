"""bmaptool's block-map format (version 2.0): which blocks of an image hold data, with checksums.

Created from a sparse image with SEEK_DATA/SEEK_HOLE, read back with ElementTree. Shared by
`idlewire build` (writes the .bmap) and `idlewire flash` (writes and verifies only those ranges).
"""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

BLOCK = 4096


@dataclass(frozen=True)
class BlockMap:
    image_size: int
    block_size: int
    ranges: tuple[tuple[int, int, str], ...]  # (first block, last block inclusive, sha256 hex)

    @property
    def mapped_blocks(self) -> int:
        return sum(last - first + 1 for first, last, _ in self.ranges)

    @property
    def blocks(self) -> int:
        return (self.image_size + self.block_size - 1) // self.block_size


def data_ranges(fd: int, size: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """Mapped block ranges (first, last inclusive) of a sparse file, merged when adjacent."""
    ranges: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        first, last = start // block, (end - 1) // block
        if ranges and first <= ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], max(last, ranges[-1][1]))
        else:
            ranges.append((first, last))
        pos = end
    return ranges


def _range_sha(fd: int, first: int, last: int, size: int, block: int) -> str:
    h = hashlib.sha256()
    pos, end = first * block, min((last + 1) * block, size)
    while pos < end:
        chunk = os.pread(fd, min(8 << 20, end - pos), pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def create(image: Path, block: int = BLOCK) -> BlockMap:
    size = image.stat().st_size
    fd = os.open(image, os.O_RDONLY)
    try:
        ranges = tuple((f, last, _range_sha(fd, f, last, size, block))
                       for f, last in data_ranges(fd, size, block))
    finally:
        os.close(fd)
    return BlockMap(size, block, ranges)


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "bytes" else f"{int(n)} bytes"
        n /= 1024
    raise AssertionError


def to_xml(bmap: BlockMap) -> str:
    """The XML text, with <BmapFileChecksum> computed as bmaptool does (over the text with zeros)."""
    mapped = bmap.mapped_blocks
    pct = 100.0 * mapped / bmap.blocks if bmap.blocks else 0.0
    lines = [
        '<?xml version="1.0" ?>',
        "<!-- Block map of an idlewire image: the blocks that hold data, with their sha256. -->",
        '<bmap version="2.0">',
        f"    <!-- Image size in bytes: {_human(bmap.image_size)} -->",
        f"    <ImageSize> {bmap.image_size} </ImageSize>",
        f"    <BlockSize> {bmap.block_size} </BlockSize>",
        f"    <BlocksCount> {bmap.blocks} </BlocksCount>",
        f"    <!-- Count of mapped blocks: {_human(mapped * bmap.block_size)} or {pct:.1f}% -->",
        f"    <MappedBlocksCount> {mapped} </MappedBlocksCount>",
        "    <ChecksumType> sha256 </ChecksumType>",
        "    <BmapFileChecksum> " + "0" * 64 + " </BmapFileChecksum>",
        "    <BlockMap>",
    ]
    for first, last, sha in bmap.ranges:
        span = f"{first}-{last}" if first != last else f"{first}"
        lines.append(f'        <Range chksum="{sha}"> {span} </Range>')
    lines += ["    </BlockMap>", "</bmap>", ""]
    text = "\n".join(lines)
    return text.replace("0" * 64, hashlib.sha256(text.encode()).hexdigest(), 1)


def parse(path: Path) -> BlockMap:
    """Read a .bmap (ours or bmaptool's); a damaged file is a one-line UserError."""
    try:
        text = path.read_bytes().decode("utf-8")
        root = ET.fromstring(text)  # noqa: S314 (local file the user chose; no entities expanded)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a bmap file (not UTF-8 text, byte {exc.start})") from None
    except (ET.ParseError, ValueError) as exc:
        raise UserError(f"{path}: not a bmap file: {str(exc)[:120]}") from None
    if root.tag != "bmap":
        raise UserError(f"{path}: not a bmap file (its XML root is <{str(root.tag)[:40]}>, not <bmap>)")
    major = root.get("version", "0").split(".")[0]
    if major not in ("1", "2"):
        raise UserError(f"{path}: unsupported bmap version {root.get('version')!r}; expected 1.x or 2.x")
    try:
        ctype = (root.findtext("ChecksumType") or "sha1").strip()
        stored = (root.findtext("BmapFileChecksum") or "").strip()
        if stored:
            zeroed = text.replace(stored, "0" * len(stored), 1)
            if hashlib.new(ctype, zeroed.encode()).hexdigest() != stored:
                raise UserError(f"{path}: the bmap file's own checksum does not match: it is damaged")
        if ctype != "sha256":
            raise UserError(f"{path}: checksum type {ctype!r} is not supported; expected sha256")
        ranges = []
        for r in root.iter("Range"):
            span = (r.text or "").strip()
            first, _, last = span.partition("-")
            ranges.append((int(first), int(last or first), r.get("chksum", "")))
        return BlockMap(int(root.findtext("ImageSize", "0")), int(root.findtext("BlockSize", "0")),
                        tuple(ranges))
    except (ValueError, TypeError, OverflowError) as exc:
        raise UserError(f"{path}: malformed bmap: {str(exc)[:120]}") from None
