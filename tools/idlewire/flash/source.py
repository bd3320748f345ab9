"""The source of a flash: the image (raw or compressed), its bmap and its .sha256.

`open_source` runs every check that can refuse before a byte is written; the decompressed
stream is read by `stream_ranges`, which fails (one line) on a damaged or truncated stream.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import bmap as bm
from .. import bootpart, hostio, inputs, rawio
from ..errors import UserError

MiB = 1 << 20
CHUNK = rawio.CHUNK
COMPRESSED = {".xz": "xz", ".gz": "gz", ".zst": "zst"}
MAGIC = {"xz": b"\xfd7zXZ\x00", "gz": b"\x1f\x8b", "zst": b"\x28\xb5\x2f\xfd"}
TOOL = {"zst": ["zstd", "-dc"], "xz": ["xz", "-dc", "-T0"]}  # off this process's CPU
HEX64 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass
class Source:
    path: Path
    bmap: bm.BlockMap
    bmap_path: Path | None
    kind: str  # raw | xz | gz | zst
    sha256_checked: bool = False
    # the file as it was when opened: an uncompressed image is read back against its own bytes,
    # so it must be the same file, unchanged, from the check to the end of the read-back
    signature: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return self.bmap.image_size

    def byte_ranges(self) -> list[tuple[int, int, str]]:
        bs, size = self.bmap.block_size, self.bmap.image_size
        return [(a * bs, min((b + 1) * bs, size), sha) for a, b, sha in self.bmap.ranges]

    def changed(self) -> bool:
        return bool(self.kind == "raw" and self.signature and signature(self.path) != self.signature)


def signature(path: Path) -> tuple[int, ...]:
    st_ = os.stat(path)
    return st_.st_dev, st_.st_ino, st_.st_size, st_.st_mtime_ns, st_.st_ctime_ns


def kind_of(path: Path) -> str:
    return COMPRESSED.get(path.suffix, "raw")


def sha256_listed(image: Path) -> tuple[Path, str] | None:
    """(the .sha256 file, the digest it lists for `image`), or None when no list names it."""
    stem, d = bootpart.companions(image)
    for cand in (d / f"{stem}.sha256", d / f"{image.name}.sha256"):
        if not cand.exists():
            continue
        inputs.regular_file(cand, "the image's .sha256")
        try:
            text = cand.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{cand}: not a sha256 list (not UTF-8 text); remove it or download it again") from None
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == image.name:
                if not HEX64.fullmatch(parts[0]):
                    raise UserError(f"{cand}: the line for {image.name} holds no sha256 (64 hex digits); "
                                    "the list is damaged, download it again")
                return cand, parts[0].lower()
    return None


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _damaged(path: Path, kind: str, why: str) -> UserError:
    return UserError(f"{path}: corrupt or truncated {kind} file ({why}); download or copy it again")


def check_magic(path: Path, kind: str) -> None:
    with path.open("rb") as f:
        head = f.read(8)
    if not head.startswith(MAGIC[kind]):
        raise _damaged(path, kind, "it does not start like one" if head else "it is empty")


def uncompressed_size(path: Path, kind: str) -> int | None:
    """The size the stream says it decompresses to (gzip: modulo 4 GiB); a damaged container is
    a UserError; None when the container does not say."""
    if kind == "xz" and hostio.have("xz"):  # without it, the stream is checked as it is read
        res = hostio.run(["xz", "--robot", "--list", str(path)])
        if res.returncode != 0:
            raise _damaged(path, kind, hostio.last_line(res).split(": ")[-1])
        for line in res.stdout.splitlines():
            f = line.split("\t")
            if f[0] == "totals" and len(f) > 4 and f[4].isdigit():
                return int(f[4])
    if kind == "zst":
        res = hostio.run(["zstd", "-lv", str(path)])
        if res.returncode != 0:
            raise _damaged(path, kind, hostio.last_line(res, 120))
        for line in res.stdout.splitlines():
            if "Decompressed Size" in line and "(" in line:
                n = line.split("(")[1].split()[0]
                return int(n) if n.isdigit() else None
    if kind == "gz":
        with path.open("rb") as f:
            if f.seek(0, os.SEEK_END) < 18:  # a header and a trailer at least
                raise _damaged(path, kind, "too short")
            f.seek(-4, os.SEEK_END)
            return struct.unpack("<I", f.read(4))[0]
    return None


def load_bmap(image: Path, bmap_path: Path | None, kind: str) -> tuple[bm.BlockMap, Path | None]:
    bmap_path = bmap_path or bootpart.find_bmap(image)
    if bmap_path is None:
        if kind != "raw":
            raise UserError(f"{image}: no .bmap next to it (looked for {bootpart.companions(image)[0]}.bmap); "
                            "give --bmap FILE")
        return bm.create(image), None  # an uncompressed image is its own map
    inputs.regular_file(bmap_path, "the bmap")
    return bm.parse(bmap_path), bmap_path


def check_bmap(bmap_obj: bm.BlockMap, bmap_path: Path | None) -> None:
    if bmap_obj.image_size <= 0:
        raise UserError(f"{bmap_path}: image size {bmap_obj.image_size} is not a size; the bmap is damaged")
    if bmap_obj.block_size <= 0 or bmap_obj.block_size % 512:
        raise UserError(f"{bmap_path}: block size {bmap_obj.block_size} is not a multiple of 512")
    last = -1
    for a, b, sha in bmap_obj.ranges:
        if b < a or a < 0 or b >= bmap_obj.blocks or not HEX64.fullmatch(sha):
            raise UserError(f"{bmap_path}: range {a}-{b} lies outside the image or has no sha256 checksum")
        if a <= last:
            raise UserError(f"{bmap_path}: range {a}-{b} overlaps or precedes the one before it; the bmap is damaged")
        last = b


def check_container(src: Source) -> None:
    """A compressed image: its .sha256 (when listed) and the size its container announces."""
    image, kind, bmap_obj = src.path, src.kind, src.bmap
    check_magic(image, kind)
    listed = sha256_listed(image)
    if listed:
        sums, want = listed
        if hash_file(image) != want:
            raise UserError(f"{image}: sha256 does not match {sums}: the file is damaged or not the "
                            "one built; download or copy it again")
        src.sha256_checked = True
    expect = uncompressed_size(image, kind)
    if expect is not None:
        mod = (1 << 32) if kind == "gz" else None
        if (bmap_obj.image_size % mod if mod else bmap_obj.image_size) != expect:
            raise UserError(f"{image}: decompresses to {expect} bytes but {src.bmap_path} describes "
                            f"{bmap_obj.image_size}: the bmap belongs to another image (or the file is truncated)")


def open_source(image: Path, bmap_path: Path | None = None, *, preverify: bool = True,
                progress: Callable[[int], None] | None = None) -> Source:
    """Find the bmap, run every check that can refuse before anything is written."""
    if not image.exists() and not image.is_symlink():
        raise UserError(f"{image}: no such image")
    inputs.regular_file(image, "the image")
    kind = kind_of(image)
    if kind == "raw" and not image.name.endswith(".img") and image.suffix not in ("", ".raw", ".bin"):
        raise UserError(f"{image}: unknown image type; expected .img, .img.xz, .img.gz or .img.zst")
    if kind == "zst" and not hostio.have("zstd"):
        raise UserError("reading .zst images needs the zstd command (Debian package 'zstd')")
    bmap_obj, bmap_path = load_bmap(image, bmap_path, kind)
    check_bmap(bmap_obj, bmap_path)
    src = Source(image, bmap_obj, bmap_path, kind, signature=signature(image))
    if kind == "raw":
        actual = image.stat().st_size
        if actual != bmap_obj.image_size:
            raise UserError(f"{image}: {actual} bytes, but {bmap_path} describes an image of "
                            f"{bmap_obj.image_size} bytes: the bmap belongs to another image")
    else:
        check_container(src)
    if preverify:
        check_image(src, progress)
    return src


def check_image(src: Source, progress: Callable[[int], None] | None = None, ways: int = 4,
                view: memoryview | None = None) -> None:
    """An uncompressed image's mapped ranges against the bmap's sha256 (compressed images are
    checked as they stream); a mismatch is a UserError. `view`: the image mapped (the writer's
    mapping, hashed in place), else it is read."""
    if src.kind != "raw" or src.bmap_path is None:
        return
    bad = check_ranges(src.path, src.byte_ranges(), progress, ways, view)
    if bad:
        raise UserError(f"{src.path}: bytes {bad[0]}-{bad[1]} do not match the checksum in {src.bmap_path}: "
                        "the image is damaged or the bmap belongs to another image")


class RangeSums:
    """The bmap range checksums of a decompressed stream, checked as its bytes pass (fed in
    order, only the mapped ranges); a mismatch is a UserError naming the range."""

    def __init__(self, src: Source):
        self.src, self.ranges, self.i, self.h = src, src.byte_ranges(), 0, hashlib.sha256()

    def feed(self, off: int, data) -> None:
        ranges = self.ranges
        while ranges[self.i][1] <= off:
            self.i += 1
        self.h.update(data)
        if off + len(data) == ranges[self.i][1]:
            if self.h.hexdigest() != ranges[self.i][2]:
                raise UserError(f"{self.src.path}: bytes {ranges[self.i][0]}-{ranges[self.i][1]} do not match the "
                                f"checksum in {self.src.bmap_path}: the image is damaged or the bmap belongs to "
                                "another image")
            self.h = hashlib.sha256()
            self.i += 1


def check_whole(src: Source, progress: Callable[[int], None] | None = None) -> None:
    """Every mapped range of the image against the bmap's sha256, before anything is written
    (`flash --check-first`): an uncompressed image is read, a compressed one decompressed once
    for this check alone (and again for the write)."""
    if src.kind == "raw":
        check_image(src, progress)
        return
    sums = RangeSums(src)
    for off, data in stream_ranges(src, [(a, b) for a, b, _ in sums.ranges]):
        sums.feed(off, data)
        if progress:
            progress(len(data))


def split_work(items: list, size: Callable, ways: int) -> list[list]:
    """Items dealt into `ways` lists of about equal total size (order kept inside each)."""
    loads = [0] * ways
    out: list[list] = [[] for _ in range(ways)]
    for item in sorted(items, key=size, reverse=True):
        i = loads.index(min(loads))
        out[i].append(item)
        loads[i] += size(item)
    return [sorted(o, key=lambda x: x[0] if isinstance(x, tuple) else x.start) for o in out if o]


def _hash_mapped(view: memoryview, part: list[tuple[int, int, str]], progress, bad: list) -> None:
    """_hash_part on the image's mapping: hashed where it lies, without read()'s copy into a
    buffer (0.15 s of CPU per GiB, on the cores the write and the read-back need)."""
    for start, end, sha in part:
        h = hashlib.sha256()
        for pos in range(start, end, 2 * MiB):
            n = min(2 * MiB, end - pos)
            with view[pos:pos + n] as piece:
                h.update(piece)
            if progress:
                progress(n)
        if h.hexdigest() != sha:
            bad.append((start, end))
            return


def _hash_part(image: Path, part: list[tuple[int, int, str]], progress, bad: list) -> None:
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    buf = bytearray(2 * MiB)  # reused: a fresh 8 MiB bytes object per read costs page faults
    view = memoryview(buf)
    try:
        for start, end, sha in part:
            h = hashlib.sha256()
            pos = start
            while pos < end:
                n = os.preadv(fd, [view[:min(len(buf), end - pos)]], pos)
                if n <= 0:
                    break
                h.update(view[:n])
                pos += n
                if progress:
                    progress(n)
            if h.hexdigest() != sha:
                bad.append((start, end))
                return
    except OSError as exc:
        bad.append((start, end, exc.strerror))
    finally:
        view.release()
        os.close(fd)


def check_ranges(image: Path, ranges: list[tuple[int, int, str]], progress: Callable[[int], None] | None,
                 ways: int = 4, view: memoryview | None = None) -> tuple[int, int] | None:
    """The first range whose sha256 differs (hashing on every core: hashlib releases the GIL)."""
    bad: list[tuple] = []
    parts = split_work(ranges, lambda r: r[1] - r[0], max(1, min(ways, len(os.sched_getaffinity(0)))))
    hash_part, where = (_hash_part, image) if view is None else (_hash_mapped, view)
    threads = [threading.Thread(target=hash_part, args=(where, p, progress, bad), daemon=True) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return min(bad)[:2] if bad else None


def _python_decompress(path: Path, kind: str) -> Iterator[bytes]:
    """xz or gzip decompressed in this process (when the xz command is missing, or for gzip),
    bounded output per call (a few KiB of zeros can expand to gigabytes)."""
    new = (lambda: lzma.LZMADecompressor()) if kind == "xz" else (lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))
    d = new()
    started = False
    with path.open("rb") as f:
        while raw := f.read(1 * MiB):
            while raw:
                if d.eof or not started:
                    if d.eof:
                        raw = raw.lstrip(b"\0") if kind == "xz" else raw  # xz stream padding
                        if not raw:
                            break
                        d = new()  # the next stream (xz) or member (gzip)
                    started = True
                yield d.decompress(raw, CHUNK)
                if kind == "xz":
                    while not d.eof and not d.needs_input:
                        yield d.decompress(b"", CHUNK)
                else:
                    while d.unconsumed_tail:
                        yield d.decompress(d.unconsumed_tail, CHUNK)
                raw = d.unused_data if d.eof else b""
    if not d.eof:
        raise UserError(f"{path}: truncated {kind} stream (it ends before the image does); "
                        "download or copy it again")


def decompressed(src: Source) -> Iterator[bytes]:
    """The decompressed image, streamed; a damaged stream is a UserError."""
    path, kind = src.path, src.kind
    tool = TOOL.get(kind)
    try:
        if tool and hostio.have(tool[0]):
            yield from hostio.stream([*tool, "--", str(path)], CHUNK)
        else:
            yield from _python_decompress(path, kind)
    except hostio.StreamFailed as exc:
        raise UserError(f"{path}: corrupt {kind} stream ({exc.reason}); download or copy it again") from None
    except (lzma.LZMAError, zlib.error, gzip.BadGzipFile, EOFError) as exc:
        raise UserError(f"{path}: corrupt {kind} stream ({exc}); download or copy it again") from None


def stream_ranges(src: Source, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of a compressed image restricted to byte `ranges` (sorted), in order.
    The stream is read to its end (its integrity checked) even after the last wanted byte."""
    pos = 0
    i = 0
    for chunk in decompressed(src):
        cstart, cend = pos, pos + len(chunk)
        pos = cend
        while i < len(ranges) and ranges[i][1] <= cstart:
            i += 1
        j = i
        while j < len(ranges) and ranges[j][0] < cend:
            a, b = max(ranges[j][0], cstart), min(ranges[j][1], cend)
            if a < b:
                yield a, chunk[a - cstart:b - cstart]
            j += 1
    if pos < src.size:
        raise UserError(f"{src.path}: the stream ends at byte {pos} but the image has {src.size} bytes "
                        "(truncated); download or copy it again")
