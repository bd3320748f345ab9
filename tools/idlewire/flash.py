"""Flashing: an image written to cards or files, only its mapped blocks, verified from the card.

Order of work for every target (all targets of one run are written concurrently from one
read of the image, each by its own thread):

1. checks, before a byte is written (each refusal is a UserError, exit 2): the target exists
   (nothing is ever created under /dev), is a whole disk or a regular file, is removable (or
   --force-fixed), holds no mounted filesystem, swap or /, is large enough; the bmap is intact and
   belongs to the image; a compressed image matches its .sha256 and its stream is complete; an
   uncompressed image's mapped ranges match the bmap checksums;
2. the first MiB of the target (the old partition table) is zeroed, so an interrupted write never
   looks like a bootable card;
3. the stamped boot partition (when stamping while flashing), then every mapped range outside the
   first and last MiB, then fsync;
4. the partition table regions (first MiB, last MiB: MBR, primary and backup GPT) LAST, fsync;
5. every written range read back from the target and checked: against the very image bytes that
   were written, for an uncompressed image (those bytes were checked against the bmap's sha256 in
   this run, before or while writing: the card matching them byte for byte is the card matching
   the bmap, at a memcmp's cost instead of a second sha256 of every byte; the file's identity,
   size, mtime and ctime must then be the same at the end, or no card is called verified) and
   for a stamped boot partition; against the bmap's sha256 for a compressed image, whose bytes
   are not kept.
   Writes and reads go around the page cache (O_DIRECT), so the read-back of a range starts as
   soon as its write has returned and runs while later ranges are written: a reader thread and a
   checking thread per lane. Where O_DIRECT is refused (tmpfs), the read-back waits for the final
   fsync and drops the cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import itertools
import lzma
import mmap
import os
import queue
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import bmap as bm
from . import rawio
from . import stamp as st
from .errors import UserError
from .units import Unit

MiB = 1 << 20
CHUNK = rawio.CHUNK
PAGE = rawio.PAGE
TABLE = 1 * MiB  # first and last MiB hold MBR / primary GPT / backup GPT: written last
BLKGETSIZE64 = 0x80081272
BLKFLSBUF = 0x1261
COMPRESSED = {".xz": "xz", ".gz": "gz", ".zst": "zst"}


class VerifyError(Exception):
    """The target does not hold what was written (exit 1)."""


# --- source ----------------------------------------------------------------------------------

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


def _signature(path: Path) -> tuple[int, ...]:
    st_ = os.stat(path)
    return st_.st_dev, st_.st_ino, st_.st_size, st_.st_mtime_ns, st_.st_ctime_ns


def _kind(path: Path) -> str:
    return COMPRESSED.get(path.suffix, "raw")


def _sha256_listed(image: Path) -> tuple[Path, str] | None:
    stem, d = st.companions(image)
    for cand in (d / f"{stem}.sha256", d / f"{image.name}.sha256"):
        if cand.exists():
            for line in cand.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1].lstrip("*") == image.name:
                    return cand, parts[0].lower()
    return None


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _uncompressed_size(path: Path, kind: str) -> int | None:
    """The size the stream says it decompresses to; a damaged container is a UserError."""
    if kind == "xz" and shutil.which("xz"):  # without it, the stream is checked as it is read
        res = subprocess.run(["xz", "--robot", "--list", str(path)], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise UserError(f"{path}: corrupt or truncated xz file ({res.stderr.strip().split(': ')[-1]}); "
                            "download or copy it again")
        for line in res.stdout.splitlines():
            f = line.split("\t")
            if f[0] == "totals":
                return int(f[4])
    if kind == "zst":
        res = subprocess.run(["zstd", "-lv", str(path)], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise UserError(f"{path}: corrupt or truncated zstd file ({res.stderr.strip()[-120:]}); "
                            "download or copy it again")
        for line in res.stdout.splitlines():
            if "Decompressed Size" in line and "(" in line:
                return int(line.split("(")[1].split()[0])
    if kind == "gz":
        with path.open("rb") as f:
            f.seek(-4, os.SEEK_END)
            return struct.unpack("<I", f.read(4))[0]  # modulo 4 GiB; compared modulo too
    return None


def open_source(image: Path, bmap_path: Path | None = None, *, preverify: bool = True,
                progress: Callable[[int], None] | None = None) -> Source:
    """Find the bmap, run every check that can refuse before anything is written."""
    if not image.exists():
        raise UserError(f"{image}: no such image")
    if not image.is_file():
        raise UserError(f"{image}: not a regular file")
    kind = _kind(image)
    if kind == "raw" and not image.name.endswith(".img") and image.suffix not in ("", ".raw", ".bin"):
        raise UserError(f"{image}: unknown image type; expected .img, .img.xz, .img.gz or .img.zst")
    if kind == "zst" and not shutil.which("zstd"):
        raise UserError("reading .zst images needs the zstd command (Debian package 'zstd')")
    bmap_path = bmap_path or st.find_bmap(image)
    if bmap_path is None:
        if kind != "raw":
            raise UserError(f"{image}: no .bmap next to it (looked for {st.companions(image)[0]}.bmap); "
                            "give --bmap FILE")
        bmap_obj = bm.create(image)  # an uncompressed image is its own map
    else:
        bmap_obj = bm.parse(bmap_path)
    src = Source(image, bmap_obj, bmap_path, kind, signature=_signature(image))
    if bmap_obj.block_size <= 0 or bmap_obj.block_size % 512:
        raise UserError(f"{bmap_path}: block size {bmap_obj.block_size} is not a multiple of 512")
    for a, b, sha in bmap_obj.ranges:
        if b < a or b >= bmap_obj.blocks or len(sha) != 64:
            raise UserError(f"{bmap_path}: range {a}-{b} lies outside the image or has no sha256 checksum")
    if kind == "raw":
        actual = image.stat().st_size
        if actual != bmap_obj.image_size:
            raise UserError(f"{image}: {actual} bytes, but {bmap_path} describes an image of "
                            f"{bmap_obj.image_size} bytes: the bmap belongs to another image")
    else:
        listed = _sha256_listed(image)
        if listed:
            sums, want = listed
            if _hash_file(image) != want:
                raise UserError(f"{image}: sha256 does not match {sums}: the file is damaged or not the "
                                "one built; download or copy it again")
            src.sha256_checked = True
        expect = _uncompressed_size(image, kind)
        if expect is not None:
            mod = (1 << 32) if kind == "gz" else None
            if (bmap_obj.image_size % mod if mod else bmap_obj.image_size) != expect:
                raise UserError(f"{image}: decompresses to {expect} bytes but {bmap_path} describes "
                                f"{bmap_obj.image_size}: the bmap belongs to another image (or the file is truncated)")
    if preverify:
        check_image(src, progress)
    return src


def check_image(src: Source, progress: Callable[[int], None] | None = None, ways: int = 4) -> None:
    """An uncompressed image's mapped ranges against the bmap's sha256 (compressed images are
    checked as they stream); a mismatch is a UserError."""
    if src.kind != "raw" or src.bmap_path is None:
        return
    bad = _check_ranges(src.path, src.byte_ranges(), progress, ways)
    if bad:
        raise UserError(f"{src.path}: bytes {bad[0]}-{bad[1]} do not match the checksum in {src.bmap_path}: "
                        "the image is damaged or the bmap belongs to another image")


def split_work(items: list, size: Callable, ways: int) -> list[list]:
    """Items dealt into `ways` lists of about equal total size (order kept inside each)."""
    loads = [0] * ways
    out: list[list] = [[] for _ in range(ways)]
    for item in sorted(items, key=size, reverse=True):
        i = loads.index(min(loads))
        out[i].append(item)
        loads[i] += size(item)
    return [sorted(o, key=lambda x: x[0] if isinstance(x, tuple) else x.start) for o in out if o]


def _check_ranges(image: Path, ranges: list[tuple[int, int, str]],
                  progress: Callable[[int], None] | None, ways: int = 4) -> tuple[int, int] | None:
    """The first range whose sha256 differs (hashing on every core: hashlib releases the GIL)."""
    bad: list[tuple[int, int]] = []

    def work(part: list[tuple[int, int, str]]) -> None:
        fd = os.open(image, os.O_RDONLY)
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
        finally:
            view.release()
            os.close(fd)

    parts = split_work(ranges, lambda r: r[1] - r[0], max(1, min(ways, len(os.sched_getaffinity(0)))))
    threads = [threading.Thread(target=work, args=(p,), daemon=True) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return min(bad) if bad else None


def _decompressor(src: Source) -> Iterator[bytes]:
    """The decompressed image, streamed; a damaged stream is a UserError."""
    path, kind = src.path, src.kind
    # xz and zstd decompress in their own process (xz on every core: images are built with
    # --threads=0, so their blocks decompress in parallel), off this process's CPU
    tool = {"zst": ["zstd", "-dc"], "xz": ["xz", "-dc", "-T0"]}.get(kind)
    if tool and shutil.which(tool[0]):
        proc = subprocess.Popen([*tool, "--", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        try:
            while chunk := proc.stdout.read(CHUNK):
                yield chunk
        finally:
            proc.stdout.close()
            rc = proc.wait()
            errtext = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        if rc != 0:
            raise UserError(f"{path}: corrupt {kind} stream ({errtext.split(': ')[-1][-120:]}); "
                            "download or copy it again")
        return
    new = (lambda: lzma.LZMADecompressor()) if kind == "xz" else (lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))
    errors: tuple[type[BaseException], ...] = (lzma.LZMAError, zlib.error, gzip.BadGzipFile, EOFError)
    d = new()
    started = False
    try:
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
                    # bounded output: a few KiB of zeros can expand to gigabytes
                    yield d.decompress(raw, CHUNK)
                    if kind == "xz":
                        while not d.eof and not d.needs_input:
                            yield d.decompress(b"", CHUNK)
                        raw = d.unused_data if d.eof else b""
                    else:
                        while d.unconsumed_tail:
                            yield d.decompress(d.unconsumed_tail, CHUNK)
                        raw = d.unused_data if d.eof else b""
        if not d.eof:
            raise UserError(f"{path}: truncated {kind} stream (it ends before the image does); "
                            "download or copy it again")
    except errors as exc:
        raise UserError(f"{path}: corrupt {kind} stream ({exc}); download or copy it again") from None


def stream_ranges(src: Source, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of a compressed image restricted to byte `ranges` (sorted), in order."""
    pos = 0
    i = 0
    for chunk in _decompressor(src):
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
        if i >= len(ranges):
            # every wanted byte is out: keep reading to check the stream's integrity to its end
            continue
    if pos < src.size:
        raise UserError(f"{src.path}: the stream ends at byte {pos} but the image has {src.size} bytes "
                        "(truncated); download or copy it again")


# --- targets ---------------------------------------------------------------------------------

@dataclass
class Target:
    path: Path
    is_block: bool
    size: int  # bytes available (block device) or 0 for a file to be sized
    name: str = ""  # kernel name of the disk (sdb, loop3, mmcblk0)
    fd: int = -1
    note: str = ""
    partial: Path | None = None  # a file target is written here, then renamed over `path`
    owner: tuple[int, int, int] | None = None  # an existing file target's mode, uid, gid: kept


def _mount_devs() -> tuple[dict[str, str], str]:
    """{'maj:min': mountpoint} of every mounted filesystem, and the maj:min of /."""
    devs: dict[str, str] = {}
    root = ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            devs.setdefault(parts[2], parts[4])
            if parts[4] == "/":
                root = parts[2]
    return devs, root


def _loops_over(path: Path) -> list[str]:
    """Loop devices whose backing file is `path`."""
    found = []
    for back in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        with contextlib.suppress(OSError):
            held = back.read_text().strip()
            if held and os.path.exists(held) and os.path.samefile(held, path):
                found.append(f"/dev/{back.parent.parent.name}")
    return found


def _sys_block(devnum: str) -> Path | None:
    p = Path("/sys/dev/block") / devnum
    return p.resolve() if p.exists() else None


def _disk_of(devnum: str, seen: set[str] | None = None) -> set[str]:
    """Kernel names of the whole disks under a device (through partitions, dm, md slaves)."""
    seen = set() if seen is None else seen
    sysp = _sys_block(devnum)
    if sysp is None:
        return set()
    disks: set[str] = set()
    if (sysp / "partition").exists():
        disks.add(sysp.parent.name)
    else:
        disks.add(sysp.name)
    slaves = sysp / "slaves"
    if slaves.is_dir():
        for s in slaves.iterdir():
            dev = (s / "dev").read_text().strip()
            if dev not in seen:
                seen.add(dev)
                disks |= _disk_of(dev, seen)
    return disks


def _users_of_disk(name: str) -> list[str]:
    """maj:min of the disk, its partitions, and everything stacked on them (holders)."""
    base = Path("/sys/block") / name
    out: list[str] = []
    todo = [base] + [p for p in base.iterdir() if (p / "partition").exists()]
    seen = set()
    while todo:
        node = todo.pop()
        if node in seen or not (node / "dev").exists():
            continue
        seen.add(node)
        out.append((node / "dev").read_text().strip())
        holders = node / "holders"
        if holders.is_dir():
            todo += [h.resolve() for h in holders.iterdir()]
    return out


def inspect_target(path: Path, image_size: int, *, force_fixed: bool = False,
                   write: bool = True, sources: tuple[Path, ...] = ()) -> Target:
    """Every refusal that needs only the target; nothing is opened for writing here."""
    text = str(path)
    for src in sources:
        if path.exists() and src.exists() and os.path.samefile(path, src):
            raise UserError(f"{text}: is the image (or its bmap) itself; nothing written")
    absolute = Path(os.path.abspath(path))
    if not path.exists():
        if str(absolute).startswith(("/dev/", "/proc/", "/sys/")) or not write:
            raise UserError(f"{path}: no such device (check the name with `lsblk`); nothing written")
        if not absolute.parent.is_dir():
            raise UserError(f"{path}: directory {absolute.parent} does not exist; nothing written")
        return Target(path, False, 0, note="new file", partial=absolute.parent / f".{absolute.name}.partial")
    st_ = os.stat(path)
    mode = st_.st_mode
    if stat.S_ISREG(mode):
        real = path.resolve()
        if str(real).startswith(("/dev/", "/proc/", "/sys/")):
            raise UserError(f"{path}: a regular file under /dev, /proc or /sys is not a target; nothing written")
        if write and (loops := _loops_over(real)):
            # the file is replaced, not rewritten in place: the loop device would keep the old one
            raise UserError(f"{path}: is attached to {loops[0]} (losetup), which would go on showing the old "
                            f"contents; flash {loops[0]} instead, or detach it first (`losetup -d {loops[0]}`); "
                            "nothing written")
        return Target(path, False, 0, note="file", partial=real.parent / f".{real.name}.partial",
                      owner=(stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid))
    if not stat.S_ISBLK(mode):
        raise UserError(f"{text}: not a block device or a regular file; nothing written")
    rdev = st_.st_rdev
    devnum = f"{os.major(rdev)}:{os.minor(rdev)}"
    sysp = _sys_block(devnum)
    if sysp is None:
        raise UserError(f"{text}: block device {devnum} is unknown to the kernel (/sys/dev/block); nothing written")
    if (sysp / "partition").exists():
        raise UserError(f"{text}: is a partition of /dev/{sysp.parent.name}; give the whole disk "
                        f"(/dev/{sysp.parent.name}); nothing written")
    name = sysp.name
    backing = sysp / "loop" / "backing_file"
    if backing.exists():
        held = backing.read_text().strip()
        for src in sources:
            if held and os.path.exists(held) and os.path.samefile(held, src):
                raise UserError(f"{text}: is a loop device over the image itself ({held}); nothing written")
    mounts, root = _mount_devs()
    if name in _disk_of(root):
        raise UserError(f"{text}: holds the running system's root filesystem (/); refusing; nothing written")
    if write:
        swaps = set()
        with contextlib.suppress(OSError), open("/proc/swaps") as f:
            for line in f.readlines()[1:]:
                with contextlib.suppress(OSError):
                    r = os.stat(line.split()[0]).st_rdev
                    swaps.add(f"{os.major(r)}:{os.minor(r)}")
        for dev in _users_of_disk(name):
            if dev in mounts:
                raise UserError(f"{text}: a partition of it is mounted on {mounts[dev]}; unmount it first "
                                f"(`umount {mounts[dev]}`); nothing written")
            if dev in swaps:
                raise UserError(f"{text}: a partition of it is in use as swap; `swapoff` it first; nothing written")
        removable = (sysp / "removable").read_text().strip() == "1" if (sysp / "removable").exists() else False
        kind = "removable" if removable else ""
        if name.startswith("loop"):
            kind = "loop device"
        elif name.startswith("mmcblk"):
            kind = "SD/MMC card"
        elif "/usb" in str(sysp):
            kind = "USB disk"
        if not kind and not force_fixed:
            raise UserError(f"{text}: is a fixed (non-removable) disk; if you really mean to overwrite it, "
                            "add --force-fixed; nothing written")
    size = int((sysp / "size").read_text()) * 512
    if size == 0:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
            finally:
                os.close(fd)
    if size < image_size:
        raise UserError(f"{text}: {size} bytes ({size / (1 << 30):.2f} GiB) is smaller than the image "
                        f"({image_size} bytes, {image_size / (1 << 30):.2f} GiB); use a larger card; nothing written")
    return Target(path, True, size, name, note="")


def _open_target(t: Target, image_size: int, write: bool) -> int:
    if t.is_block:
        flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_EXCL | os.O_CLOEXEC
        try:
            return os.open(t.path, flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise UserError(f"{t.path}: in use (mounted, or opened by another program); nothing written") from None
            raise UserError(f"{t.path}: cannot open: {exc.strerror}") from None
    if not write:
        try:
            return os.open(t.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise UserError(f"{t.path}: cannot open: {exc.strerror}") from None
    # a new file beside the target, renamed over it once written and read back: until then the
    # target is untouched (an interrupted or refused write leaves it as it was)
    try:
        fd = os.open(t.partial or t.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UserError(f"{t.partial or t.path}: cannot create: {exc.strerror}; nothing written") from None
    if t.owner:  # the file it replaces keeps its mode and, where allowed, its owner
        mode, uid, gid = t.owner
        with contextlib.suppress(PermissionError):
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    os.ftruncate(fd, image_size)  # holes read as zeros: the file equals the image byte for byte
    return fd


def _publish(t: Target, ok: bool) -> None:
    """A file target's partial file renamed over the target (ok), or removed."""
    if t.partial is None:
        return
    if not ok:
        t.partial.unlink(missing_ok=True)
        return
    final = t.path.resolve() if t.path.exists() else Path(os.path.abspath(t.path))
    os.replace(t.partial, final)
    dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# --- plan --------------------------------------------------------------------------------------

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


# --- stamping while flashing ------------------------------------------------------------------

@dataclass
class Overlay:
    """A unit's stamped boot partition: a sparse temporary file the size of the image."""

    unit: Unit
    path: Path
    pieces: list[Piece]
    node_public_key: str
    fd: int = -1


def boot_prefix(src: Source, workdir: Path) -> tuple[Path, st.Layout]:
    """A sparse file holding the image's table and boot partition (for stamping copies of it)."""
    prefix = workdir / "golden-prefix.img"
    ranges = src.byte_ranges()
    with prefix.open("wb") as f:
        f.truncate(src.size)
    fd = os.open(prefix, os.O_WRONLY)
    try:
        if src.kind == "raw":
            sfd = os.open(src.path, os.O_RDONLY)
            try:
                # the table first, to learn where the boot partition ends
                for a, b, _ in ranges:
                    if a < TABLE:
                        os.pwrite(fd, os.pread(sfd, min(b, TABLE) - a, a), a)
                os.fsync(fd)
                layout = st.read_layout(prefix)
                for a, b, _ in ranges:
                    a, b = max(a, layout.boot_offset), min(b, layout.boot_end)
                    off = a
                    while off < b:
                        n = os.copy_file_range(sfd, fd, b - off, off, off)
                        if n == 0:
                            break
                        off += n
            finally:
                os.close(sfd)
        else:
            layout = None
            for off, data in stream_prefix(src, ranges):
                os.pwrite(fd, data, off)
                if layout is None and off + len(data) >= TABLE:
                    os.fsync(fd)
                    layout = st.read_layout(prefix)
                if layout is not None and off + len(data) >= layout.boot_end:
                    break
            if layout is None:
                layout = st.read_layout(prefix)
    finally:
        os.close(fd)
    return prefix, layout


def stream_prefix(src: Source, ranges: list[tuple[int, int, str]]) -> Iterator[tuple[int, bytes]]:
    gen = stream_ranges(src, [(a, b) for a, b, _ in ranges])
    try:
        yield from gen
    finally:
        gen.close()


def make_overlay(prefix: Path, layout: st.Layout, unit: Unit, workdir: Path, block: int) -> Overlay:
    path = workdir / f"boot-{unit.unit}.img"
    st.sparse_copy(prefix, path)
    pem, pub = st.node_key(unit)
    st.write_stamp_files(path, layout.boot_offset, {"stamp.toml": st.stamp_toml(unit, pub), "node.key": pem})
    fd = os.open(path, os.O_RDONLY)
    pieces = []
    try:
        size = path.stat().st_size
        for a, b in bm.data_ranges(fd, size, block):
            start, end = max(a * block, layout.boot_offset), min((b + 1) * block, layout.boot_end)
            if start < end:  # read back against the overlay itself (Piece.ref), not a checksum
                pieces.append(Piece(start, end, None, "boot"))
    except BaseException:
        os.close(fd)
        raise
    return Overlay(unit, path, pieces, pub, fd)


# --- writing -----------------------------------------------------------------------------------

@dataclass
class CardReport:
    target: str
    unit: str | None = None
    hostname: str | None = None
    node_public_key: str | None = None
    written_bytes: int = 0
    write_seconds: float = 0.0  # start → every byte written and flushed (fsync)
    verify_seconds: float = 0.0  # the read-back's own wall time (it overlaps the write when it can)
    verify_extra_seconds: float = 0.0  # what the read-back added after the write had finished
    verify_overlapped: bool = False  # read back while writing (O_DIRECT) or only after the final flush
    verified: bool | None = None
    error: str | None = None
    mismatches: list[tuple[int, int]] = field(default_factory=list)


class ReadBack:
    """Reads written ranges back from the target and checks each piece's sha256.

    Fed (piece, offset, length) in write order. Reads go around the page cache: O_DIRECT
    (a direct read of a range first makes the kernel write back anything still dirty in it, so
    what is compared is what the device returns). Where O_DIRECT is refused (tmpfs …) the
    read-back waits for `start()` after the final fsync, with the cache dropped.

    A piece with a `ref` is compared byte for byte with it (memcmp); one without is hashed and
    compared with its `sha`. Pieces are dealt to `lanes` (one per CPU, at most LANES), each a
    reader thread filling a few aligned buffers and a checking thread (hashlib releases the GIL):
    the device and every core stay busy while the writer goes on. A piece's chunks stay in one
    lane, checked in order.
    """

    BUFFERS = 3  # per lane
    LANES = 2

    def __init__(self, fd: int, is_block: bool, advance: Callable[[int], None], lanes: int | None = None):
        self.fd, self.is_block, self.advance = fd, is_block, advance
        self.rfd = rawio.open_direct(fd, os.O_RDONLY)
        self.direct = self.rfd >= 0
        n = max(1, min(lanes or self.LANES, len(os.sched_getaffinity(0))))
        self.lanes = [_Lane(self) for _ in range(n)]
        self.lane_of: dict[int, _Lane] = {}
        self.mismatches: list[tuple[int, int]] = []
        self.error: BaseException | None = None
        self.t_first = self.t_last = 0.0
        self.started = False

    def start(self) -> None:
        """Begin reading (at once when O_DIRECT works; else after the writer's final fsync)."""
        if self.started:
            return
        if not self.direct:  # drop what the page cache holds of the target, then read normally
            os.fsync(self.fd)
            if self.is_block:
                with contextlib.suppress(OSError):
                    fcntl.ioctl(self.fd, BLKFLSBUF)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self.rfd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        self.started = True
        for lane in self.lanes:
            lane.start()

    def put(self, piece: Piece, off: int, length: int) -> None:
        lane = self.lane_of.get(id(piece))
        if lane is None:  # the next lane in turn takes the whole piece
            lane = self.lane_of[id(piece)] = self.lanes[len(self.lane_of) % len(self.lanes)]
        lane.jobs.put((piece, off, length))

    def put_piece(self, piece: Piece) -> None:
        for off in range(piece.start, piece.end, CHUNK):
            self.put(piece, off, min(CHUNK, piece.end - off))

    def finish(self) -> list[tuple[int, int]]:
        """Wait for every range fed so far; the mismatching pieces (start, end), sorted."""
        self.start()
        for lane in self.lanes:
            lane.jobs.put(None)
        for lane in self.lanes:
            lane.join()
        if self.error:
            raise self.error
        return sorted(self.mismatches)

    def close(self) -> None:
        if self.rfd >= 0:
            os.close(self.rfd)
            self.rfd = -1
        for lane in self.lanes:
            lane.close()

    def _pread(self, view: memoryview, off: int) -> int:
        return os.preadv(self.rfd, [view], off)


SAME_STEP = 256 << 10


def _same(a, a_off: int, b, b_off: int, n: int) -> bool:
    """a[a_off:a_off+n] == b[b_off:b_off+n] for two mmaps, compared a slice at a time.

    Two bytes objects compare by memcmp (memoryviews go byte by byte), and slicing an mmap makes
    one. The slices are kept small: 256 KiB ones are reused by malloc and stay in the CPU cache,
    while a read-back chunk's 8 MiB ones are fresh memory every time — measured here, 1 GiB
    compared in 8 MiB slices took 0.97 s of CPU and 534,000 page faults, in 256 KiB slices
    0.054 s and 96 (tests/unit/test_flash.py pins the result, bench/flash.sh the time)."""
    for i in range(0, n, SAME_STEP):
        j = min(i + SAME_STEP, n)
        if a[a_off + i:a_off + j] != b[b_off + i:b_off + j]:
            return False
    return True


class _Lane:
    """One reader and one checking thread of a ReadBack, with their own buffers."""

    def __init__(self, rb: ReadBack):
        self.rb = rb
        self.jobs: queue.Queue = queue.Queue()
        self.ready: queue.Queue = queue.Queue()
        self.free: queue.Queue = queue.Queue()
        self.bufs = [mmap.mmap(-1, CHUNK + 2 * PAGE) for _ in range(ReadBack.BUFFERS)]
        for b in self.bufs:
            self.free.put(b)
        self.state: dict[int, tuple] = {}  # id(piece) → (sha256 so far or None, bytes fed, all read and equal)
        self.threads = [threading.Thread(target=self._reader, daemon=True),
                        threading.Thread(target=self._checker, daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def close(self) -> None:
        for b in self.bufs:
            with contextlib.suppress(BufferError):
                b.close()

    def _reader(self) -> None:
        rb = self.rb
        try:
            while (job := self.jobs.get()) is not None:
                piece, off, length = job
                buf = self.free.get()
                lo = off % PAGE  # direct reads start and end on page boundaries
                pos, need = off - lo, lo + length
                want = -(-need // PAGE) * PAGE
                got = 0
                if not rb.t_first:
                    rb.t_first = time.monotonic()
                with memoryview(buf) as mv:
                    while got < need:
                        n = rb._pread(mv[got:want], pos + got)
                        if n <= 0:
                            break  # the target ends early: that piece cannot match
                        got += n
                self.ready.put((piece, off, buf, lo, min(got, need), length))
        except BaseException as exc:
            rb.error = rb.error or exc
        finally:
            self.ready.put(None)

    def _checker(self) -> None:
        rb = self.rb
        while (item := self.ready.get()) is not None:
            piece, off, buf, lo, hi, length = item
            try:
                ref = piece.ref
                h, done, whole = self.state.get(id(piece)) or (hashlib.sha256() if ref is None else None, 0, True)
                if hi > lo:
                    if ref is None:
                        with memoryview(buf) as mv:
                            h.update(mv[lo:hi])
                    elif whole:
                        whole = _same(buf, lo, ref, off, hi - lo)
                    rb.advance(hi - lo)
                done += length
                whole = whole and hi - lo == length
                if done < piece.end - piece.start:
                    self.state[id(piece)] = (h, done, whole)
                else:
                    self.state.pop(id(piece), None)
                    if not whole or (h is not None and h.hexdigest() != piece.sha):
                        rb.mismatches.append((piece.start, piece.end))
            except BaseException as exc:
                rb.error = rb.error or exc
            finally:
                self.free.put(buf)
                rb.t_last = max(rb.t_last, time.monotonic())


class Writer(threading.Thread):
    """One target: takes jobs from a queue, writes them, hands written ranges to its ReadBack.

    Aligned writes bypass the page cache (O_DIRECT) through a second, non-exclusive descriptor
    (the first keeps the O_EXCL claim of a block device and takes unaligned bits). Data whose
    address is page-aligned (an mmap of the source) is written straight from memory; the rest
    (decompressed chunks) is staged through an aligned buffer.
    """

    def __init__(self, target: Target, fd: int, report: CardReport, advance: Callable[[int], None],
                 readback: ReadBack | None):
        super().__init__(daemon=True)
        self.t, self.fd, self.report, self.advance, self.rb = target, fd, report, advance, readback
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.failed: BaseException | None = None
        self.dfd = rawio.open_direct(fd, os.O_WRONLY)
        self.buf = mmap.mmap(-1, CHUNK) if self.dfd >= 0 else None

    def run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            if self.failed:
                continue
            try:
                self._do(job)
            except BaseException as exc:  # reported by the main thread
                self.failed = exc

    def close(self) -> None:
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        if self.buf is not None:
            with contextlib.suppress(BufferError):  # a view still held: the buffer goes with it
                self.buf.close()
            self.buf = None

    def _do(self, job) -> None:
        op = job[0]
        if op == "data":
            _, off, data, piece, aligned = job
            rawio.write_at(self.fd, self.dfd, data, off, aligned=aligned, stage=self.buf)
            if piece is not None:
                self.report.written_bytes += len(data)
                self.advance(len(data))
                if self.rb is not None:
                    self.rb.put(piece, off, len(data))
        elif op == "sync":
            if self.dfd >= 0:
                os.fsync(self.dfd)
            os.fsync(self.fd)
            job[1].set()

    def put(self, job) -> None:
        if self.failed:
            raise self.failed
        self.q.put(job)

    def sync(self) -> None:
        done = threading.Event()
        self.put(("sync", done))
        while not done.wait(0.2):
            if self.failed:
                raise self.failed
        if self.failed:
            raise self.failed


def send_mapped(writers: list[Writer], view: memoryview, pieces: list[Piece]) -> None:
    """Hand `pieces` of a mapped file (`view` maps it from offset 0) to every writer, in chunks."""
    for p in pieces:
        for off in range(p.start, p.end, CHUNK):
            chunk = view[off:min(off + CHUNK, p.end)]
            for w in writers:
                w.put(("data", off, chunk, p, True))


@dataclass
class FlashResult:
    image: str
    bmap: str | None
    sha256_checked: bool
    mapped_bytes: int
    seconds: float
    cards: list[CardReport]


def flash(src: Source, targets: list[Target], units: list[Unit] | None = None, *, verify: bool = True,
          progress=None, check: bool = False, check_progress: Callable[[int], None] | None = None) -> FlashResult:
    """Write `src` to every target concurrently (each stamped with its unit, if given); each
    target's written ranges are read back and checked while the later ones are being written.

    `check`: the (uncompressed) image's ranges are checked against the bmap while it is being
    written, not before: only for targets that are files, written beside the target and renamed
    at the end, so a damaged image still leaves every target untouched.
    """
    t0 = time.monotonic()
    if check and any(t.partial is None for t in targets):
        raise ValueError("check while writing needs file targets (written aside, renamed at the end)")
    ranges = src.byte_ranges()
    reports = [CardReport(str(t.path)) for t in targets]
    if units is not None and len(units) != len(targets):
        raise UserError(f"{len(units)} unit(s) for {len(targets)} target(s): give one unit per target")
    work = Path(tempfile.mkdtemp(prefix="idlewire-flash-")) if units else None
    overlays: list[Overlay] = []
    fds: list[int] = []
    writers: list[Writer] = []
    readbacks: list[ReadBack] = []
    maps: list[tuple[mmap.mmap | None, memoryview]] = []
    sfd = os.open(src.path, os.O_RDONLY) if src.kind == "raw" else -1
    try:
        skip = None
        if units:
            assert work is not None
            prefix, layout = boot_prefix(src, work)
            skip = (layout.boot_offset, layout.boot_end)
            for i, u in enumerate(units):
                ov = make_overlay(prefix, layout, u, work, src.bmap.block_size)
                overlays.append(ov)
                reports[i].unit, reports[i].hostname, reports[i].node_public_key = u.unit, u.hostname, \
                    ov.node_public_key
            prefix.unlink()
        pieces = split_pieces(ranges, src.size, skip)
        # open every target (O_EXCL for block devices) only now that every check has passed
        for t in targets:
            fds.append(_open_target(t, src.size, write=True))
        for i, t in enumerate(targets):
            mine = pieces + (overlays[i].pieces if overlays else [])
            total = sum(p.end - p.start for p in mine)
            task = progress.add_task(f"write  {t.path}", total=total) if progress else None
            adv = (lambda n, task=task: progress.advance(task, n)) if progress else (lambda n: None)
            rb = None
            if verify:
                vtask = progress.add_task(f"verify {t.path}", total=total) if progress else None
                rb = ReadBack(fds[i], t.is_block, (lambda n, k=vtask: progress.advance(k, n)) if progress
                              else (lambda n: None))
                readbacks.append(rb)
                reports[i].verify_overlapped = rb.direct
                if rb.direct:
                    rb.start()
            w = Writer(t, fds[i], reports[i], adv, rb)
            w.start()
            writers.append(w)
        checked: list[BaseException | None] = []
        checker = None
        if check:
            def run_check() -> None:
                try:
                    check_image(src, check_progress, ways=2)
                    checked.append(None)
                except BaseException as exc:
                    checked.append(exc)
            checker = threading.Thread(target=run_check, daemon=True)
            checker.start()
        zero = bytes(min(TABLE, src.size))
        for w in writers:  # the old partition table goes first: a half-written card never boots
            w.put(("data", 0, zero, None, False))
        for w, ov in zip(writers, overlays, strict=False):
            ovmap, view = m = rawio.map_file(ov.fd)
            maps.append(m)
            for p in ov.pieces:
                p.ref = ovmap
            send_mapped([w], view, ov.pieces)
        deferred: list[tuple[Piece, bytes | None]] = []  # partition table regions (None: from the raw image)
        src_view = memoryview(b"")
        if src.kind == "raw":
            srcmap, src_view = m = rawio.map_file(sfd)
            maps.append(m)
            for p in pieces:
                p.ref = srcmap
            send_mapped(writers, src_view, [p for p in pieces if p.where == "body"])
            deferred = [(p, None) for p in pieces if p.where != "body"]
        else:
            _stream_compressed(src, writers, pieces, deferred)
        for w in writers:
            w.sync()
        if checker is not None:  # the image must be sound before its partition table is written
            checker.join()
            if checked[0] is not None:
                if isinstance(checked[0], UserError):
                    raise UserError(f"{checked[0]}; nothing written") from None
                raise checked[0]
        for p, data in deferred:  # partition table regions: last
            if data is None:
                send_mapped(writers, src_view, [p])
            else:
                for w in writers:
                    w.put(("data", p.start, data, p, False))
        for w in writers:
            w.sync()
        for w, r in zip(writers, reports, strict=True):
            r.write_seconds = time.monotonic() - t0
            w.put(None)
        for w in writers:
            w.join()
        if verify:
            _finish_readbacks(readbacks, reports, t0)
        if src.kind == "raw" and src.signature and _signature(src.path) != src.signature:
            for r in reports:  # what was checked is not what was written and read back
                r.verified, r.error = False, (f"{src.path} changed while it was being written (it was "
                                              "modified or replaced): flash again from an image nobody writes to")
        for t, r in zip(targets, reports, strict=True):
            _publish(t, ok=not r.error and r.verified is not False)
    except BaseException as exc:
        for w in writers:
            w.failed = w.failed or exc
            with contextlib.suppress(Exception):  # a failed writer skips its queued jobs: room soon
                w.q.put(None, timeout=10)
        for t in targets[:len(fds)]:
            with contextlib.suppress(OSError):
                _publish(t, ok=False)
        raise
    finally:
        for w in writers:
            # A writer may still be inside a write from its staging buffer: closing the buffer (or
            # the descriptor) under it would fail or, worse, write to a reused descriptor.
            w.join(timeout=30)
            if not w.is_alive():
                with contextlib.suppress(OSError):
                    w.close()
        for rb in readbacks:
            with contextlib.suppress(OSError):
                rb.close()
        for m, view in maps:
            rawio.unmap(m, view)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if sfd >= 0:
            os.close(sfd)
        for ov in overlays:
            if ov.fd >= 0:
                os.close(ov.fd)
        if work:
            shutil.rmtree(work, ignore_errors=True)
    return FlashResult(str(src.path), str(src.bmap_path) if src.bmap_path else None, src.sha256_checked,
                       src.bmap.mapped_blocks * src.bmap.block_size, time.monotonic() - t0, reports)


def _finish_readbacks(readbacks: list[ReadBack], reports: list[CardReport], t0: float) -> None:
    """Wait for every target's read-back (concurrently: each has its own threads)."""
    for rb in readbacks:
        rb.start()  # those that could not read while writing start now
    for rb, r in zip(readbacks, reports, strict=True):
        try:
            r.mismatches = rb.finish()
            r.verified = not r.mismatches
        except OSError as exc:
            r.error = f"reading back failed: {exc}"
            r.verified = False
        r.verify_seconds = max(rb.t_last - rb.t_first, 0.0)
        r.verify_extra_seconds = max(rb.t_last - t0 - r.write_seconds, 0.0)


def _stream_compressed(src: Source, writers: list[Writer], pieces: list[Piece], deferred: list) -> None:
    """Decompress once; check every bmap range's sha256; hand pieces to the writers."""
    ranges = src.byte_ranges()
    hashers = {id(p): hashlib.sha256() for p in pieces if p.sha is None}
    buffers: dict[int, bytearray] = {}
    ri, pi = 0, 0
    rh = hashlib.sha256()
    for off, data in stream_ranges(src, [(a, b) for a, b, _ in ranges]):
        end = off + len(data)
        while ranges[ri][1] <= off:
            ri += 1
        rh.update(data)
        if end == ranges[ri][1]:
            if rh.hexdigest() != ranges[ri][2]:
                raise UserError(f"{src.path}: bytes {ranges[ri][0]}-{ranges[ri][1]} do not match the checksum "
                                f"in {src.bmap_path}: the image is damaged or the bmap belongs to another "
                                "image; the targets got no partition table")
            rh = hashlib.sha256()
            ri += 1
        while pi < len(pieces) and pieces[pi].end <= off:
            pi += 1
        j = pi
        while j < len(pieces) and pieces[j].start < end:
            p = pieces[j]
            a, b = max(p.start, off), min(p.end, end)
            if a < b:
                part = data[a - off:b - off] if (a, b) != (off, end) else data
                if id(p) in hashers:
                    hashers[id(p)].update(part)
                    if b == p.end:  # known before its last bytes reach the read-back
                        p.sha = hashers.pop(id(p)).hexdigest()
                if p.where != "body":
                    buffers.setdefault(id(p), bytearray()).extend(part)
                else:
                    for w in writers:
                        w.put(("data", a, part, p, False))
            j += 1
    for p in pieces:
        if id(p) in buffers:
            deferred.append((p, bytes(buffers[id(p)])))


def verify_only(src: Source, target: Target, *, skip_boot: bool = False, progress=None) -> CardReport:
    """Compare the target with the image's bmap (an interrupted or failed write shows here)."""
    report = CardReport(str(target.path))
    fd = _open_target(target, src.size, write=False)
    rb = None
    try:
        ranges = src.byte_ranges()
        if skip_boot:
            layout = _layout_of_target(fd)
            ranges = [r for r in ranges if r[1] <= layout[0] or r[0] >= layout[1]]
        pieces = [Piece(a, b, sha, "body") for a, b, sha in ranges]
        task = progress.add_task(f"verify {target.path}", total=sum(p.end - p.start for p in pieces)) \
            if progress else None
        t1 = time.monotonic()
        rb = ReadBack(fd, target.is_block, (lambda n: progress.advance(task, n)) if progress else (lambda n: None))
        rb.start()
        for p in pieces:
            rb.put_piece(p)
        report.mismatches = rb.finish()
        report.verify_seconds = time.monotonic() - t1
        report.verified = not report.mismatches
    finally:
        if rb is not None:
            rb.close()
        os.close(fd)
    return report


def _layout_of_target(fd: int) -> tuple[int, int]:
    res = subprocess.run(["sfdisk", "-J", f"/proc/self/fd/{fd}"], capture_output=True, text=True,
                         check=False, pass_fds=(fd,))
    if res.returncode != 0:
        raise UserError("the target has no partition table: it was not written completely; flash it again")
    import json

    pt = json.loads(res.stdout)["partitiontable"]
    p = pt["partitions"][0]
    sector = int(pt.get("sectorsize", 512))
    return p["start"] * sector, (p["start"] + p["size"]) * sector
