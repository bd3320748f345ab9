"""The image's partition layout and its FAT boot partition, shared by `stamp` and `flash`.

The boot partition is never mounted: files go in and out with mtools at the partition's byte
offset (`mcopy -i IMAGE@@OFFSET`), the offset read from the partition table with `sfdisk -J`.
Copies are sparse: a reflink when the filesystem can, else copy_file_range of mapped ranges.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import bmap, hostio
from .errors import UserError

STAMP_DIR = "idlewire"
FICLONE = 0x40049409
FAT_TYPES = frozenset(t.upper() for t in ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                                          "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", "c", "b", "e", "ef"))


@dataclass(frozen=True)
class Layout:
    table: str  # gpt | dos
    size: int
    boot_offset: int
    boot_size: int

    @property
    def boot_end(self) -> int:
        return self.boot_offset + self.boot_size


def parse_sfdisk(text: str, size: int, where: str) -> Layout:
    """Partition 1 (the FAT boot partition) from `sfdisk -J` output; `where` names the image."""
    try:
        pt = json.loads(text)["partitiontable"]
        parts = pt.get("partitions") or []
        sector = int(pt.get("sectorsize", 512))
        if not parts:
            raise UserError(f"{where}: the partition table is empty; is this an idlewire image?")
        p = parts[0]
        if str(p.get("type", "")).upper() not in FAT_TYPES:
            raise UserError(f"{where}: partition 1 has type {p.get('type')}, not a FAT boot partition")
        return Layout(str(pt["label"]), size, int(p["start"]) * sector, int(p["size"]) * sector)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{where}: unreadable partition table; is this an idlewire image?") from None


def read_layout(image: Path, *, size: int | None = None) -> Layout:
    """The layout of an image file (or of an open descriptor as /proc/self/fd/N, with `size`)."""
    res = hostio.run(["sfdisk", "-J", str(image)])
    if res.returncode != 0:
        raise UserError(f"{image}: no partition table found ({hostio.last_line(res)}); is this an idlewire image?")
    return parse_sfdisk(res.stdout, image.stat().st_size if size is None else size, str(image))


def mtools(args: list[str], image: Path, offset: int, check: bool = True, text: bool = True):
    """An mtools command on the FAT at `offset` of `image`; a failure is a UserError when `check`."""
    env = {"MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0", "TZ": "UTC"}
    res = hostio.run([args[0], "-i", f"{image}@@{offset}", *args[1:]], env=env, text=text)
    if check and res.returncode != 0:
        raise UserError(f"{image}: {args[0]} on the boot partition failed: {hostio.last_line(res)}")
    return res


def boot_listing(image: Path, offset: int, path: str = f"::/{STAMP_DIR}") -> list[str]:
    """File names in a directory of the boot partition ([] when it does not exist)."""
    res = mtools(["mdir", "-b", path], image, offset, check=False)
    if res.returncode != 0:
        return []
    return sorted(line.rsplit("/", 1)[-1] for line in res.stdout.split() if line.strip())


def read_boot_file(image: Path, offset: int, name: str) -> bytes:
    res = mtools(["mtype", f"::/{STAMP_DIR}/{name}"], image, offset, check=False, text=False)
    if res.returncode != 0:
        raise UserError(f"{image}: no {STAMP_DIR}/{name} on the boot partition")
    return res.stdout


def write_stamp_files(image: Path, offset: int, files: dict[str, bytes], present: list[str] | None = None) -> None:
    """Write files into ::/idlewire/ of the FAT at `offset`; refuses a partition already stamped.
    `present`: the directory's listing when already known (a copy of a checked golden image).
    The files pass through a private directory on tmpfs (they hold the node's private key)."""
    present = boot_listing(image, offset) if present is None else present
    if "stamp.toml" in present or "stamp.done" in present:
        raise UserError(f"{image}: already stamped (boot partition has {STAMP_DIR}/stamp.toml or "
                        "stamp.done); stamp a copy of the golden image instead")
    if not present:
        mtools(["mmd", "-D", "s", f"::/{STAMP_DIR}"], image, offset, check=False)
    with hostio.private_dir("idlewire-stamp-", sum(map(len, files.values())) + (1 << 20)) as tmp:
        paths = []
        for name, data in files.items():
            hostio.write_private(tmp / name, data)
            paths.append(str(tmp / name))
        mtools(["mcopy", "-o", "-Q", *paths, f"::/{STAMP_DIR}/"], image, offset)


def copy_range(sfd: int, dfd: int, off: int, end: int) -> None:
    """Bytes [off, end) of one file into the same place of another: in the kernel where it can
    (copy_file_range), else through a buffer (across filesystems: the disk to a tmpfs)."""
    while off < end:
        try:
            n = os.copy_file_range(sfd, dfd, end - off, off, off)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            break
        if n == 0:
            return
        off += n
    while off < end:
        data = os.pread(sfd, min(end - off, 8 << 20), off)
        if not data:
            return
        os.pwrite(dfd, data, off)
        off += len(data)


def sparse_copy(src: Path, dst: Path, ranges: list[tuple[int, int]] | None = None,
                block: int = bmap.BLOCK) -> str:
    """Copy `src` into a new `dst` (0600: copies of boot partitions hold keys once stamped): a
    reflink when possible, else only the mapped ranges.

    Returns how it was done ("reflink" or "ranges"). `ranges` are inclusive block ranges; when
    absent they are found with SEEK_DATA.
    """
    size = src.stat().st_size
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
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
                copy_range(sfd, dfd, first * block, min((last + 1) * block, size))
            return "ranges"
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


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
