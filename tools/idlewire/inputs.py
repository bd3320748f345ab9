"""What a command may read and what it may overwrite, checked before anything is written.

- Every file a command reads (image, bmap, unit.yml, units.csv, record) is a regular file: a
  FIFO would hang the command, a directory or a device would fail half-way; each is one line.
- One file named two ways (a symlink, a hard link, ./x and x) is one file: identity is the
  (device, inode) pair of what the name leads to.
- A regular file as a target is overwritten only when it is one idlewire wrote (marked with the
  `user.idlewire` extended attribute when it was published), holds no data at all (empty or
  all holes: a blank card file), or `--force` is given; one of the command's own inputs (a
  forgotten `--units` makes units.csv the target) is never overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from .errors import UserError

XATTR = "user.idlewire"
XATTR_VALUE = b"image"


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: Path, what: str) -> os.stat_result:
    """`path` exists and is a regular file (after symlinks); else a one-line UserError."""
    try:
        st_ = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file ({what})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({what}): {exc.strerror}") from None
    if not stat.S_ISREG(st_.st_mode):
        raise UserError(f"{path}: is {kind_of(st_.st_mode)}, not a regular file ({what})")
    return st_


def identity(path: Path) -> tuple[int, int] | str:
    """What a name leads to: (device, inode) when it exists, else its absolute real path."""
    try:
        st_ = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    if stat.S_ISBLK(st_.st_mode):
        return (-1, st_.st_rdev)  # /dev/sdb and /dev/disk/by-id/… are one card
    return (st_.st_dev, st_.st_ino)


def distinct(paths: list[Path]) -> None:
    """No two of `paths` are the same file (or device)."""
    seen: dict[object, Path] = {}
    for p in paths:
        key = identity(p)
        if key in seen:
            raise UserError(f"{p}: the same file as {seen[key]}; give each target once")
        seen[key] = p


def is_ours(path: Path) -> bool:
    """An existing regular file idlewire may replace without --force: one it wrote, or one that
    holds no data (empty, or a sparse file of holes only)."""
    try:
        if os.getxattr(path, XATTR) == XATTR_VALUE:
            return True
    except OSError:
        pass
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return True
        try:
            os.lseek(fd, 0, os.SEEK_DATA)
        except OSError as exc:
            return exc.errno == errno.ENXIO  # no data anywhere
        return False
    finally:
        os.close(fd)


def mark_ours(fd: int) -> None:
    """Mark a file idlewire wrote (where the filesystem keeps user xattrs)."""
    with contextlib.suppress(OSError):
        os.setxattr(fd, XATTR, XATTR_VALUE)


def overwritable(target: Path, inputs: dict[str, Path], *, force: bool) -> None:
    """Refuse to replace an input of this command, or (without --force) a file idlewire did not
    write. `inputs`: {what: path} of every file the command reads."""
    if not os.path.lexists(target):
        return
    key = identity(target)
    for what, p in inputs.items():
        if p is not None and identity(p) == key:
            raise UserError(f"{target}: is {what} of this command, not a target (a forgotten option?)")
    try:
        st_ = os.stat(target)
    except OSError:
        return
    if stat.S_ISREG(st_.st_mode) and not force and not is_ours(target):
        raise UserError(f"{target}: an existing file that is not an image idlewire wrote; "
                        "add --force to overwrite it, or give another target")
