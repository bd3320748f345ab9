"""Flashing: an image written to cards or files, only its mapped blocks, verified from the card.

Rooms, as bmaptool separates TransRead / BmapCopy / CLI:
- source:   the image (raw or compressed), its bmap and .sha256; every check before writing
- target:   refusals (system disks, mounts, partitions, sizes), opening and publishing targets
- plan:     which ranges go where and in which order; each unit's stamped boot partition
- engine:   writer threads, one read of the image for every target; readback: the read-back
- verify:   --verify-only
- errors:   FlashError, carrying which target and whether anything was written
The CLI (cmd_flash.py) opens and checks the source in one place before any target is opened.
"""

from __future__ import annotations

from .. import bmap as bm
from .engine import CardReport, FlashResult, Writer, flash, send_mapped
from .errors import FlashError, VerifyError, before_writing
from .plan import TABLE, Overlay, Piece, boot_prefix, image_layout, make_overlay, split_pieces
from .readback import ReadBack, _same
from .source import COMPRESSED, Source, check_image, check_whole, open_source, split_work, stream_ranges
from .target import Target, _disk_of, inspect_target, open_target, publish
from .verify import verify_only

__all__ = ["COMPRESSED", "TABLE", "CardReport", "FlashError", "FlashResult", "Overlay", "Piece",
           "ReadBack", "Source", "Target", "VerifyError", "Writer", "_disk_of", "_same", "before_writing", "bm",
           "boot_prefix", "check_image", "check_whole", "flash", "image_layout", "inspect_target", "make_overlay",
           "open_source", "open_target", "publish", "send_mapped", "split_pieces", "split_work",
           "stream_ranges", "verify_only"]
