"""Writing image ranges around the page cache, shared by `flash` and `stamp`.

Direct I/O (O_DIRECT) moves data from memory to the device without a copy into the page cache:
no dirty pages pile up (a buffered copy of hundreds of MiB stalls in writeback throttling), and
a range can be read back from the device as soon as its write has returned. It needs offsets,
lengths and memory addresses aligned to the device's logical block size; PAGE covers every
size met in practice. Unaligned bits go through the ordinary descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os

PAGE = 4096
CHUNK = 8 << 20


def open_direct(fd: int, flags: int) -> int:
    """A second descriptor of the same open file with O_DIRECT, or -1 where it is refused (tmpfs)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1


def aligned_buffer(size: int) -> tuple[bytearray, int]:
    """A bytearray holding a page-aligned window of `size` bytes, and where that window starts in
    it: a buffer for O_DIRECT reads. A bytearray rather than an mmap because its startswith()
    compares a range of it with any other buffer by one memcmp, copying neither (readback._same).
    ctypes only tells the array's address; the array never moves, as it is never resized."""
    import ctypes

    buf = bytearray(size + PAGE)
    return buf, -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % PAGE


def map_file(fd: int) -> tuple[mmap.mmap | None, memoryview]:
    """A read-only mapping of a whole file (page-aligned: a slice at offset k has an address ≡ k
    modulo PAGE, so it can be written with O_DIRECT without staging)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None, memoryview(b"")
    m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    with contextlib.suppress(AttributeError, OSError):
        m.madvise(mmap.MADV_SEQUENTIAL)
    return m, memoryview(m)


def unmap(m: mmap.mmap | None, view: memoryview) -> None:
    view.release()
    if m is not None:
        with contextlib.suppress(BufferError):
            m.close()


def write_at(fd: int, dfd: int, data, off: int, *, aligned: bool, stage: mmap.mmap | None = None) -> None:
    """Write `data` at `off`: page-aligned parts through `dfd` (O_DIRECT, -1 for none), the rest
    through `fd`. `aligned`: the data's address ≡ off (mod PAGE), as slices of map_file() are;
    other data is copied through `stage` (an mmap of at least CHUNK bytes) for direct writes."""
    mv = memoryview(data)
    while mv:
        n = len(mv)
        if dfd >= 0 and off % PAGE == 0 and n >= PAGE and (aligned or stage is not None):
            n -= n % PAGE
            if aligned:
                n = os.pwrite(dfd, mv[:n], off)
            else:
                n = min(n, len(stage))  # type: ignore[arg-type]
                with memoryview(stage)[:n] as staged:  # type: ignore[index]
                    staged[:] = mv[:n]
                    n = os.pwrite(dfd, staged, off)
        else:
            if dfd >= 0 and off % PAGE:
                n = min(n, PAGE - off % PAGE)  # up to the next page boundary; the rest goes direct
            n = os.pwrite(fd, mv[:n], off)
        if n <= 0:
            raise OSError(errno.EIO, f"short write at byte {off}")
        mv, off = mv[n:], off + n
