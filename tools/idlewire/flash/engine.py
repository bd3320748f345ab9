"""The engine: one read of the image, a writer thread per target, each read back as it goes.

Order of work for every target (all written concurrently, each by its own thread):
1. the old partition table is zeroed: the target's first MiB (MBR, primary GPT) and, on a card,
   its last MiB (where a GPT's backup header lies, which firmware falls back to), so an
   interrupted write or a damaged image never leaves a card that looks bootable;
2. the stamped boot partition (when stamping while flashing), then every mapped range outside
   the first and last MiB, then fsync;
3. the partition table regions (first MiB, last MiB: MBR, primary and backup GPT) LAST, fsync;
4. every written range read back from the target and checked (see readback.ReadBack): against
   the very image bytes that were written for an uncompressed image (those bytes were checked
   against the bmap's sha256 in this run; the file must be unchanged at the end) and for a
   stamped boot partition; against the bmap's sha256 for a compressed image.

A target whose write fails (read-only, full, I/O error) is reported failed with its reason; the
others go on. A failure of the source (a corrupt stream, an uncompressed image failing the check
that runs beside the write) stops every target before its partition table is written: a file
target is left as it was (it is written aside), a card holds nothing bootable.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import hostio, rawio
from ..errors import UserError
from ..units import Unit
from .errors import FlashError
from .plan import TABLE, Overlay, Piece, boot_prefix, make_overlay, split_pieces
from .readback import ReadBack
from .source import RangeSums, Source, check_image, stream_ranges
from .target import Target, open_target, publish

CHUNK = rawio.CHUNK


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
    # a byte may have reached the target: a card was written to (at least its old table zeroed),
    # or a file target was published. Its unit's key then exists outside this process.
    reached: bool = False

    @property
    def ok(self) -> bool:
        return not self.error and self.verified is not False


WRITE_ERRORS = {errno.ENOSPC: "no space left on it", errno.EROFS: "it is read-only",
                errno.EIO: "I/O error (a faulty card or a loose reader)", errno.EDQUOT: "disk quota exceeded",
                errno.EPERM: "not permitted (is it read-only?)"}


def _write_failure(target: Path, exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"{target}: writing failed: {WRITE_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))}"
    return f"{target}: writing failed: {exc}"


class Writer(threading.Thread):
    """One target: takes jobs from a queue, writes them, hands written ranges to its ReadBack.

    Aligned writes bypass the page cache (O_DIRECT) through a second, non-exclusive descriptor
    (the first keeps the O_EXCL claim of a block device and takes unaligned bits). Data whose
    address is page-aligned (an mmap of the source) is written straight from memory; the rest
    (decompressed chunks) is staged through an aligned buffer. After a failure the writer drops
    its jobs: the other targets go on.
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
        while (job := self.q.get()) is not None:
            if job[0] == "sync":
                self._sync(job[1])
            elif not self.failed:
                try:
                    self._data(*job[1:])
                except BaseException as exc:  # reported in the card's report
                    self.failed = exc

    def _data(self, off: int, data, piece: Piece | None, aligned: bool) -> None:
        if self.t.is_block:
            self.report.reached = True
        rawio.write_at(self.fd, self.dfd, data, off, aligned=aligned, stage=self.buf)
        if piece is not None:
            self.report.written_bytes += len(data)
            self.advance(len(data))
            if self.rb is not None:
                self.rb.put(piece, off, len(data))

    def _sync(self, done: threading.Event) -> None:
        try:
            if not self.failed:
                if self.dfd >= 0:
                    os.fsync(self.dfd)
                os.fsync(self.fd)
        except BaseException as exc:
            self.failed = exc
        finally:
            done.set()

    def close(self) -> None:
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1
        if self.buf is not None:
            with contextlib.suppress(BufferError):  # a view still held: the buffer goes with it
                self.buf.close()
            self.buf = None

    def put(self, job) -> None:
        if not self.failed:
            self.q.put(job)

    def sync(self) -> None:
        done = threading.Event()
        self.q.put(("sync", done))
        while not done.wait(0.2):
            if not self.is_alive():
                return


def send_mapped(writers: list[Writer], view: memoryview, pieces: list[Piece],
                stop: Callable[[], bool] | None = None) -> None:
    """Hand `pieces` of a mapped file (`view` maps it from offset 0) to every writer, in chunks;
    `stop()` true ends it early (the image failed its check: what is left is not worth writing)."""
    for p in pieces:
        for off in range(p.start, p.end, CHUNK):
            if stop is not None and stop():
                return
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


class _Flash:
    """The state of one flash: what was opened and started, so that every exit closes it."""

    def __init__(self, src: Source, targets: list[Target], units: list[Unit] | None, verify: bool,
                 progress, reports: list[CardReport]):
        self.src, self.targets, self.units, self.verify, self.progress = src, targets, units, verify, progress
        self.t0 = time.monotonic()
        self.reports = reports
        reports.extend(CardReport(str(t.path)) for t in targets)
        self.work: Path | None = None
        self.overlays: list[Overlay] = []
        self.fds: list[int] = []
        self.writers: list[Writer] = []
        self.readbacks: list[ReadBack] = []
        self.maps: list[tuple[mmap.mmap | None, memoryview]] = []
        self.pieces: list[Piece] = []
        self.deferred: list[tuple[Piece, bytes | None]] = []  # table regions (None: from the raw image)
        self.src_map: mmap.mmap | None = None
        self.src_view = memoryview(b"")
        self.checker: threading.Thread | None = None
        self.checked: list[BaseException | None] = []

    # --- before any byte is written ---

    def stamp_overlays(self) -> None:
        """Each unit's stamped boot partition, in a private directory on tmpfs (it holds keys)."""
        skip = None
        if self.units:
            with hostio.signals_deferred():  # removed by close(), whenever a signal comes
                self.work = hostio.secret_dir("idlewire-flash-")
            prefix, layout = boot_prefix(self.src, self.work)
            hostio.ensure_room(self.work, len(self.units) * prefix.stat().st_blocks * 512 + (8 << 20),
                               "the units' stamped boot partitions")
            skip = (layout.boot_offset, layout.boot_end)
            for r, u in zip(self.reports, self.units, strict=True):
                ov = make_overlay(prefix, layout, u, self.work, self.src.bmap.block_size)
                self.overlays.append(ov)
                r.unit, r.hostname, r.node_public_key = u.unit, u.hostname, ov.node_public_key
            prefix.unlink()
        self.pieces = split_pieces(self.src.byte_ranges(), self.src.size, skip)

    def open_targets(self) -> None:
        """Open every target (O_EXCL for block devices) only now that every check has passed."""
        for t in self.targets:
            self.fds.append(open_target(t, self.src.size, write=True))

    def _task(self, label: str, total: int) -> Callable[[int], None]:
        if not self.progress:
            return lambda n: None
        task = self.progress.add_task(label, total=total)
        return lambda n: self.progress.advance(task, n)

    def start_writers(self) -> None:
        for i, t in enumerate(self.targets):
            mine = self.pieces + (self.overlays[i].pieces if self.overlays else [])
            total = sum(p.end - p.start for p in mine)
            rb = None
            if self.verify:
                rb = ReadBack(self.fds[i], t.is_block, self._task(f"verify {t.path}", total))
                self.readbacks.append(rb)
                self.reports[i].verify_overlapped = rb.direct
                if rb.direct:
                    rb.start()
            w = Writer(t, self.fds[i], self.reports[i], self._task(f"write  {t.path}", total), rb)
            w.start()
            self.writers.append(w)

    def start_check(self, check_progress: Callable[[int], None] | None) -> None:
        """The uncompressed image checked against its bmap while it is being written."""
        view = self._map_source() if self.src.kind == "raw" else None

        def run_check() -> None:
            try:
                check_image(self.src, check_progress, ways=2, view=view)
                self.checked.append(None)
            except BaseException as exc:
                self.checked.append(exc)
        self.checker = threading.Thread(target=run_check, daemon=True)
        self.checker.start()

    # --- writing ---

    def write_body(self) -> None:
        zero = bytes(min(TABLE, self.src.size))
        for w, t in zip(self.writers, self.targets, strict=True):
            # the old partition table goes first: a half-written card never boots
            w.put(("data", 0, zero, None, False))
            if t.is_block and t.size - TABLE >= len(zero):  # an old backup GPT at the card's end
                w.put(("data", t.size - TABLE, bytes(TABLE), None, False))
        for w, ov in zip(self.writers, self.overlays, strict=False):
            ovmap, view = m = rawio.map_file(ov.fd)
            self.maps.append(m)
            for p in ov.pieces:
                p.ref = ovmap
            send_mapped([w], view, ov.pieces)
        if self.src.kind == "raw":
            self._map_source()
            srcmap = self.src_map
            for p in self.pieces:
                p.ref = srcmap
            send_mapped(self.writers, self.src_view, [p for p in self.pieces if p.where == "body"],
                        stop=self._check_failed)
            self.deferred = [(p, None) for p in self.pieces if p.where != "body"]
        else:
            self.deferred = stream_compressed(self.src, self.writers, self.pieces)
        self._sync()

    def _map_source(self) -> memoryview:
        """The uncompressed image mapped once, for the writers and the check beside them."""
        if self.src_map is None:
            self.maps.append(m := rawio.map_file(self._src_fd()))
            self.src_map, self.src_view = m
        return self.src_view

    def _src_fd(self) -> int:
        fd = os.open(self.src.path, os.O_RDONLY | os.O_CLOEXEC)
        self.fds.append(fd)  # closed with the targets' descriptors
        return fd

    def _sync(self) -> None:
        for w in self.writers:
            w.sync()

    def _check_failed(self) -> bool:
        return bool(self.checked) and self.checked[0] is not None

    def wait_check(self) -> None:
        """The image must be sound before its partition table is written."""
        if self.checker is None:
            return
        self.checker.join()
        exc = self.checked[0]
        if isinstance(exc, UserError):
            cards = [str(t.path) for t in self.targets if t.partial is None]
            if not cards:  # every target is a file, written aside: none was touched
                raise FlashError(str(exc), written=False) from None
            raise FlashError(f"{exc}; nothing bootable was written to {', '.join(cards)} (the old partition "
                             "table was erased first, the new one is written only after the check)",
                             written=True) from None
        if exc is not None:
            raise exc

    def write_tables(self) -> None:
        for p, data in self.deferred:  # partition table regions: last
            if data is None:
                send_mapped(self.writers, self.src_view, [p])
            else:
                for w in self.writers:
                    w.put(("data", p.start, data, p, False))
        self._sync()
        for w, r in zip(self.writers, self.reports, strict=True):
            r.write_seconds = time.monotonic() - self.t0
            w.q.put(None)
        for w in self.writers:
            w.join()
        for w, r, t in zip(self.writers, self.reports, self.targets, strict=True):
            if w.failed is not None:
                r.error, r.verified = _write_failure(t.path, w.failed), False

    def finish(self) -> None:
        if self.verify:
            finish_readbacks(self.readbacks, self.reports, self.t0)
        if self.src.changed():
            for r in self.reports:  # what was checked is not what was written and read back
                r.verified, r.error = False, (f"{self.src.path} changed while it was being written (it was "
                                              "modified or replaced): flash again from an image nobody writes to")
        for t, r in zip(self.targets, self.reports, strict=True):
            publish(t, ok=r.ok)
            if t.partial is not None and r.ok:
                r.reached = True

    # --- every exit ---

    def abort(self, exc: BaseException) -> None:
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or type(exc).__name__
        for r in self.reports:  # a card cut off mid-write is a failed card, never a unit
            if not r.error:
                r.error, r.verified = f"stopped before it was complete: {why}", False
        for w in self.writers:
            w.failed = w.failed or exc
            with contextlib.suppress(Exception):  # a failed writer skips its queued jobs: room soon
                w.q.put(None, timeout=10)
        for t in self.targets:  # also one whose partial file exists but whose descriptor was not kept yet
            with contextlib.suppress(OSError):
                publish(t, ok=False)

    def close(self) -> None:
        for w in self.writers:
            # A writer may still be inside a write from its staging buffer: closing the buffer (or
            # the descriptor) under it would fail or, worse, write to a reused descriptor.
            w.join(timeout=30)
            if not w.is_alive():
                with contextlib.suppress(OSError):
                    w.close()
        for rb in self.readbacks:
            with contextlib.suppress(OSError):
                rb.close()
        for m, view in self.maps:
            rawio.unmap(m, view)
        for fd in self.fds + [ov.fd for ov in self.overlays if ov.fd >= 0]:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.work:
            shutil.rmtree(self.work, ignore_errors=True)

    def result(self) -> FlashResult:
        src = self.src
        return FlashResult(str(src.path), str(src.bmap_path) if src.bmap_path else None, src.sha256_checked,
                           src.bmap.mapped_blocks * src.bmap.block_size, time.monotonic() - self.t0, self.reports)


def flash(src: Source, targets: list[Target], units: list[Unit] | None = None, *, verify: bool = True,
          progress=None, check: bool = False, check_progress: Callable[[int], None] | None = None,
          reports: list[CardReport] | None = None) -> FlashResult:
    """Write `src` to every target concurrently (each stamped with its unit, if given); each
    target's written ranges are read back and checked while the later ones are being written.

    `check`: the (uncompressed) image's ranges are checked against the bmap while it is being
    written, not before; a damaged image stops the write before any partition table: a file
    target (written beside it, renamed at the end) is left untouched, a card has nothing bootable.
    `reports`: a list the cards' reports are put in as soon as they exist, so that a caller
    still has every unit's key when this raises (or is interrupted).
    """
    if units is not None and len(units) != len(targets):
        raise FlashError(f"{len(units)} unit(s) for {len(targets)} target(s): give one unit per target")
    run = _Flash(src, targets, units, verify, progress, [] if reports is None else reports)
    try:
        run.stamp_overlays()
        run.open_targets()
        run.start_writers()
        if check:
            run.start_check(check_progress)
        run.write_body()
        run.wait_check()
        run.write_tables()
        run.finish()
    except BaseException as exc:
        with hostio.signals_deferred():  # a second Ctrl-C must not cut the clean-up short
            run.abort(exc)
        raise
    finally:
        with hostio.signals_deferred():
            run.close()
    return run.result()


def finish_readbacks(readbacks: list[ReadBack], reports: list[CardReport], t0: float) -> None:
    """Wait for every target's read-back (concurrently: each has its own threads)."""
    for rb in readbacks:
        rb.start()  # those that could not read while writing start now
    for rb, r in zip(readbacks, reports, strict=True):
        try:
            r.mismatches = rb.finish()
            r.verified = r.verified is not False and not r.mismatches
        except OSError as exc:
            r.error = r.error or f"reading back failed: {exc.strerror or exc}"
            r.verified = False
        r.verify_seconds = max(rb.t_last - rb.t_first, 0.0)
        r.verify_extra_seconds = max(rb.t_last - t0 - r.write_seconds, 0.0)


def stream_compressed(src: Source, writers: list[Writer], pieces: list[Piece]) -> list[tuple[Piece, bytes]]:
    """Decompress once; check every bmap range's sha256; hand body pieces to the writers.
    Returns the table pieces with their bytes (written last)."""
    sums = RangeSums(src)
    hashers = {id(p): hashlib.sha256() for p in pieces if p.sha is None}
    buffers: dict[int, bytearray] = {}
    pi = 0
    try:
        for off, data in stream_ranges(src, [(a, b) for a, b, _ in sums.ranges]):
            end = off + len(data)
            sums.feed(off, data)
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
    except FlashError:
        raise
    except UserError as exc:  # a damaged stream, found mid-way: the tables are not written
        raise FlashError(f"{exc}; the targets got no partition table", written=True) from None
    return [(p, bytes(buffers[id(p)])) for p in pieces if id(p) in buffers]
