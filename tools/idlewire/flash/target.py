"""Targets of a flash: refusals before a byte is written, then opening and publishing.

A target is a whole disk (removable, or --force-fixed; never the one holding /, a mounted
filesystem or swap) or a regular file. Nothing is ever created under /dev. A file target is
written beside it (.NAME.partial) and renamed over it once written and read back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .. import inputs
from .errors import FlashError

BLKGETSIZE64 = 0x80081272
SYSTEM = ("/dev/", "/proc/", "/sys/")


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


def _swaps() -> set[str]:
    out = set()
    with contextlib.suppress(OSError), open("/proc/swaps") as f:
        for line in f.readlines()[1:]:
            with contextlib.suppress(OSError):
                r = os.stat(line.split()[0]).st_rdev
                out.add(f"{os.major(r)}:{os.minor(r)}")
    return out


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
    disks = {sysp.parent.name if (sysp / "partition").exists() else sysp.name}
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


def _new_file(path: Path, write: bool) -> Target:
    absolute = Path(os.path.abspath(path))
    if str(absolute).startswith(SYSTEM) or not write:
        raise FlashError(f"{path}: no such device (check the name with `lsblk`)", target=path,
                         written=False if write else None)
    if not absolute.parent.is_dir():
        raise FlashError(f"{path}: directory {absolute.parent} does not exist", target=path)
    return Target(path, False, 0, note="new file", partial=absolute.parent / f".{absolute.name}.partial")


def _file(path: Path, st_: os.stat_result, write: bool) -> Target:
    real = path.resolve()
    if str(real).startswith(SYSTEM):
        raise FlashError(f"{path}: a regular file under /dev, /proc or /sys is not a target", target=path)
    if write and (loops := _loops_over(real)):
        # the file is replaced, not rewritten in place: the loop device would keep the old one
        raise FlashError(f"{path}: is attached to {loops[0]} (losetup), which would go on showing the old "
                         f"contents; flash {loops[0]} instead, or detach it first (`losetup -d {loops[0]}`)",
                         target=path)
    return Target(path, False, 0, note="file", partial=real.parent / f".{real.name}.partial",
                  owner=(stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid))


def _removable_kind(name: str, sysp: Path) -> str:
    if name.startswith("loop"):
        return "loop device"
    if name.startswith("mmcblk"):
        return "SD/MMC card"
    if "/usb" in str(sysp):
        return "USB disk"
    removable = sysp / "removable"
    return "removable" if removable.exists() and removable.read_text().strip() == "1" else ""


def _check_in_use(text: str, name: str) -> None:
    mounts, _ = _mount_devs()
    swaps = _swaps()
    for dev in _users_of_disk(name):
        if dev in mounts:
            raise FlashError(f"{text}: a partition of it is mounted on {mounts[dev]}; unmount it first "
                             f"(`umount {mounts[dev]}`)", target=text)
        if dev in swaps:
            raise FlashError(f"{text}: a partition of it is in use as swap; `swapoff` it first", target=text)


def _block_size(path: Path, sysp: Path) -> int:
    size = int((sysp / "size").read_text()) * 512
    if size == 0:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
            finally:
                os.close(fd)
    return size


def _block(path: Path, st_: os.stat_result, image_size: int, force_fixed: bool, write: bool,
           sources: tuple[Path, ...]) -> Target:
    text = str(path)
    nothing = False if write else None
    devnum = f"{os.major(st_.st_rdev)}:{os.minor(st_.st_rdev)}"
    sysp = _sys_block(devnum)
    if sysp is None:
        raise FlashError(f"{text}: block device {devnum} is unknown to the kernel (/sys/dev/block)",
                         target=text, written=nothing)
    if (sysp / "partition").exists():
        raise FlashError(f"{text}: is a partition of /dev/{sysp.parent.name}; give the whole disk "
                         f"(/dev/{sysp.parent.name})", target=text, written=nothing)
    name = sysp.name
    backing = sysp / "loop" / "backing_file"
    if backing.exists():
        held = backing.read_text().strip()
        for src in sources:
            if held and os.path.exists(held) and os.path.samefile(held, src):
                raise FlashError(f"{text}: is a loop device over the image itself ({held})", target=text,
                                 written=nothing)
    if name in _disk_of(_mount_devs()[1]):
        raise FlashError(f"{text}: holds the running system's root filesystem (/); refusing", target=text,
                         written=nothing)
    if write:
        _check_in_use(text, name)
        ro = sysp / "ro"
        if ro.exists() and ro.read_text().strip() == "1":
            raise FlashError(f"{text}: is read-only (a card's lock switch, or `losetup -r`); unlock it first",
                             target=text)
        if not _removable_kind(name, sysp) and not force_fixed:
            raise FlashError(f"{text}: is a fixed (non-removable) disk; if you really mean to overwrite it, "
                             "add --force-fixed", target=text)
    size = _block_size(path, sysp)
    if size < image_size:
        raise FlashError(f"{text}: {size} bytes ({size / (1 << 30):.2f} GiB) is smaller than the image "
                         f"({image_size} bytes, {image_size / (1 << 30):.2f} GiB); use a larger card",
                         target=text, written=nothing)
    return Target(path, True, size, name, note="")


def inspect_target(path: Path, image_size: int, *, force_fixed: bool = False,
                   write: bool = True, sources: tuple[Path, ...] = ()) -> Target:
    """Every refusal that needs only the target; nothing is opened for writing here."""
    nothing = False if write else None
    for src in sources:
        if path.exists() and src.exists() and os.path.samefile(path, src):
            raise FlashError(f"{path}: is the image (or its bmap) itself", target=path, written=nothing)
    if not path.exists():
        return _new_file(path, write)
    st_ = os.stat(path)
    if stat.S_ISREG(st_.st_mode):
        return _file(path, st_, write)
    if not stat.S_ISBLK(st_.st_mode):
        raise FlashError(f"{path}: is {inputs.kind_of(st_.st_mode)}: not a block device or a regular file",
                         target=path, written=nothing)
    return _block(path, st_, image_size, force_fixed, write, sources)


def _open_block(t: Target, write: bool) -> int:
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_EXCL | os.O_CLOEXEC
    try:
        return os.open(t.path, flags)
    except OSError as exc:
        nothing = False if write else None
        if exc.errno == errno.EBUSY:
            raise FlashError(f"{t.path}: in use (mounted, or opened by another program)", target=t.path,
                             written=nothing) from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and write:
            raise FlashError(f"{t.path}: read-only (a card's lock switch, or no permission): {exc.strerror}",
                             target=t.path) from None
        raise FlashError(f"{t.path}: cannot open: {exc.strerror}", target=t.path, written=nothing) from None


def open_target(t: Target, image_size: int, write: bool) -> int:
    if t.is_block:
        return _open_block(t, write)
    if not write:
        try:
            return os.open(t.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise FlashError(f"{t.path}: cannot open: {exc.strerror}", target=t.path, written=None) from None
    # a new file beside the target, renamed over it once written and read back: until then the
    # target is untouched (an interrupted or refused write leaves it as it was)
    where = t.partial or t.path
    try:
        fd = os.open(where, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise FlashError(f"{where}: cannot create: {exc.strerror}", target=t.path) from None
    try:
        if t.owner:  # the file it replaces keeps its mode and, where allowed, its owner
            mode, uid, gid = t.owner
            with contextlib.suppress(PermissionError):
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        os.ftruncate(fd, image_size)  # holes read as zeros: the file equals the image byte for byte
        inputs.mark_ours(fd)
    except OSError as exc:
        os.close(fd)
        Path(where).unlink(missing_ok=True)
        raise FlashError(f"{where}: cannot size it to {image_size} bytes: {exc.strerror}", target=t.path) from None
    return fd


def publish(t: Target, ok: bool) -> None:
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
