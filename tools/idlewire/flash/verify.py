"""--verify-only: compare a target with the image, writing nothing."""

from __future__ import annotations

import os
import time

from .engine import CardReport
from .plan import Piece, image_layout
from .readback import ReadBack
from .source import Source
from .target import Target, open_target


def verify_only(src: Source, target: Target, *, skip_boot: bool = False, progress=None,
                boot: tuple[int, int] | None = None) -> CardReport:
    """Compare the target with the image's bmap (an interrupted or failed write shows here).

    `skip_boot` leaves out the boot partition as the IMAGE's own table places it (`boot`, when
    the caller already read it): never as the target's table says, which a blank or foreign
    card could make say anything."""
    report = CardReport(str(target.path))
    ranges = src.byte_ranges()
    if skip_boot:
        if boot is None:
            layout = image_layout(src)
            boot = (layout.boot_offset, layout.boot_end)
        ranges = [r for r in ranges if r[1] <= boot[0] or r[0] >= boot[1]]
    pieces = [Piece(a, b, sha, "body") for a, b, sha in ranges]
    fd = open_target(target, src.size, write=False)
    rb = None
    try:
        task = progress.add_task(f"verify {target.path}", total=sum(p.end - p.start for p in pieces)) \
            if progress else None
        t1 = time.monotonic()
        rb = ReadBack(fd, target.is_block, (lambda n: progress.advance(task, n)) if progress else (lambda n: None))
        rb.start()
        for p in pieces:
            rb.put_piece(p)
        try:
            report.mismatches = rb.finish()
            report.verified = not report.mismatches
        except OSError as exc:
            report.error, report.verified = f"{target.path}: reading failed: {exc.strerror or exc}", False
        report.verify_seconds = time.monotonic() - t1
    finally:
        if rb is not None:
            rb.close()
        os.close(fd)
    return report
