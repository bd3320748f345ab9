"""Reading written ranges back from a target, around the page cache, while later ones are written."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable

from .. import rawio
from .plan import Piece

CHUNK = rawio.CHUNK
PAGE = rawio.PAGE
BLKFLSBUF = 0x1261


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


def _same(a: bytearray, a_off: int, b, b_off: int, n: int) -> bool:
    """a[a_off:a_off+n] == b[b_off:b_off+n], by one memcmp that copies neither (b: any buffer,
    e.g. the image's mmap).

    bytearray.startswith takes the prefix through the buffer protocol, and a memoryview's slice is
    a view. Slicing the two buffers into bytes objects, as this did before, copied both sides:
    0.15 s of CPU per GiB against memcmp's 0.05, on the two cores that also hash the image and
    run the loop driver (tests/unit/test_flash.py pins the result, bench/flash.sh the time)."""
    with memoryview(b) as mv, mv[b_off:b_off + n] as part:
        return len(part) == n and a.startswith(part, a_off)  # past the image's end: not the same


class _Lane:
    """One reader and one checking thread of a ReadBack, with their own buffers."""

    def __init__(self, rb: ReadBack):
        self.rb = rb
        self.jobs: queue.Queue = queue.Queue()
        self.ready: queue.Queue = queue.Queue()
        self.free: queue.Queue = queue.Queue()
        self.bufs = [rawio.aligned_buffer(CHUNK + 2 * PAGE) for _ in range(ReadBack.BUFFERS)]
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
        self.bufs.clear()

    def _reader(self) -> None:
        rb = self.rb
        try:
            while (job := self.jobs.get()) is not None:
                piece, off, length = job
                buf, start = self.free.get()
                lo = off % PAGE  # direct reads start and end on page boundaries
                pos, need = off - lo, lo + length
                want = -(-need // PAGE) * PAGE
                got = 0
                if not rb.t_first:
                    rb.t_first = time.monotonic()
                with memoryview(buf) as whole, whole[start:start + want] as mv:
                    while got < need:
                        n = rb._pread(mv[got:want], pos + got)
                        if n <= 0:
                            break  # the target ends early: that piece cannot match
                        got += n
                self.ready.put((piece, off, (buf, start), start + lo, start + min(got, need), length))
        except BaseException as exc:
            rb.error = rb.error or exc
        finally:
            self.ready.put(None)

    def _checker(self) -> None:
        rb = self.rb
        while (item := self.ready.get()) is not None:
            piece, off, (buf, start), lo, hi, length = item
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
                self.free.put((buf, start))
                rb.t_last = max(rb.t_last, time.monotonic())
