"""`idlewire flash`: sparse, verified, refusing writes of an image to cards (several at once)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from . import signing
from .clikit import App, Arg, Opt
from .errors import UserError

err = Console(stderr=True)


def register(app: App) -> None:
    app.command()(flash)


def _nothing_written(exc: UserError, verify_only: bool) -> UserError:
    if "nothing written" in str(exc) or verify_only:
        return exc
    return UserError(f"{exc}; nothing written")


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err, disable=not enabled,
                    transient=False)


def flash(
    image: Annotated[Path, Arg(help="Image: .img, .img.xz, .img.gz or .img.zst (with its .bmap).")],
    targets: Annotated[list[Path], Arg(metavar="TARGET", help="Card(s) (/dev/sdX, /dev/mmcblkN, /dev/loopN) or "
                                       "image file(s) to write.")],
    bmap_file: Annotated[Path | None, Opt("--bmap", help="The block map (default: IMAGE's .bmap "
                                          "next to it).")] = None,
    unit: Annotated[Path | None, Opt("--unit", "-u", help="Stamp the card with this unit.yml "
                                     "while writing (one target).")] = None,
    units: Annotated[Path | None, Opt("--units", help="Stamp each card with its own row of "
                                      "units.csv (rows taken in order from --start).")] = None,
    start: Annotated[int, Opt("--start", help="With --units: the first data row to use "
                              "(1 = the row after the header).", min=1)] = 1,
    record: Annotated[Path | None, Opt("--record", help="With --unit/--units: CSV the cards' "
                                       "public keys are appended to (default: ./stamped-units.csv).")] = None,
    force_fixed: Annotated[bool, Opt("--force-fixed", help="Allow a non-removable disk "
                                     "(never the one holding / or anything mounted).")] = False,
    no_verify: Annotated[bool, Opt("--no-verify", help="Skip reading the card back.")] = False,
    verify_only: Annotated[bool, Opt("--verify-only", help="Write nothing: compare the card "
                                     "with IMAGE (finds interrupted or failed writes).")] = False,
    skip_boot: Annotated[bool, Opt("--skip-boot", help="With --verify-only: leave out the boot "
                                   "partition (cards stamped while flashing differ there).")] = False,
    as_json: Annotated[bool, Opt("--json", help="Print a JSON summary on stdout.")] = False,
    keys: Annotated[list[Path] | None, Opt("--key", metavar="PUB", help="Flash only if IMAGE (and its "
                                           ".bmap) carry a signature by this SSH public key (IMAGE.sig "
                                           "from `idlewire build --sign`); repeat for several keys.")] = None,
):
    """Write IMAGE to one or more cards (or image files): sparse, verified, refusing unsafe targets.

    Only the blocks IMAGE's .bmap maps are written, the partition table last, then every written
    range is read back from the card and checked: byte for byte against the image
    bytes that were checked against the bmap's sha256 in this same run (uncompressed images, and
    the boot partition stamped while flashing), or against the bmap's sha256 (compressed images).

    Refuses, with nothing written (exit 2): a target that does not exist (nothing is ever created
    under /dev); a partition instead of a whole disk; the disk holding / or any mounted
    partition or swap; a non-removable disk unless --force-fixed (SD/MMC, USB, removable disks
    and loop devices count as removable); a target smaller than the image; a bmap that is
    damaged or does not match the image; a compressed image that does not match its .sha256 or
    whose stream is truncated (an uncompressed .img is checked range by range against the
    bmap's sha256 before writing, rather than hashing its holes for the .sha256). A stream
    corrupted mid-way stops the write before the partition table, so the card never boots
    half-written. Verification failure exits 1.

    Several cards: `idlewire flash IMAGE /dev/sdb /dev/sdc --units units.csv` writes them at
    the same time from one read of IMAGE, each stamped with its own unit, and reports per card.
    A regular file as TARGET is written beside it (.TARGET.partial) and renamed over it once
    written and read back, so a refused, failed or interrupted write leaves it as it was; the new
    file keeps the old one's mode and owner. A file a loop device is attached to is refused: flash
    the loop device instead.

    Speed: writes and reads bypass the page cache (O_DIRECT); each range is read back while the
    later ones are being written; an image written to files only is checked against its bmap
    during the write rather than before it. --json reports write_seconds, verify_seconds (the
    read-back's own time) and verify_extra_seconds (what it added after the write) per card.
    """
    from . import flash as fl
    from . import stamp as st
    from .units import load_unit, load_units

    if unit and units:
        raise UserError("give --unit or --units, not both")
    if len(set(map(str, targets))) != len(targets):
        raise UserError("the same target is named twice")
    chosen = None
    if unit:
        if len(targets) != 1:
            raise UserError(f"--unit stamps one card but {len(targets)} targets were given; use --units units.csv")
        chosen = [load_unit(unit)]
    elif units:
        rows = load_units(units)
        chosen = rows[start - 1:start - 1 + len(targets)]
        if len(chosen) < len(targets):
            raise UserError(f"{units}: {len(rows)} unit row(s); rows {start}-{start + len(targets) - 1} are "
                            f"needed for {len(targets)} target(s); add rows or lower --start")
    if verify_only and chosen:
        raise UserError("--verify-only compares with IMAGE; to check a card stamped while flashing add "
                        "--skip-boot instead of --unit/--units")
    show = not as_json or sys.stderr.isatty()
    t0 = time.monotonic()
    try:  # the refusals come before any progress bar: an error stays one line
        if keys:
            signing.verify_for_flash(image, bmap_file, keys)
        src = fl.open_source(image, bmap_file, preverify=False)
        mine = tuple(p for p in (image, src.bmap_path) if p)
        infos = [fl.inspect_target(t, src.size, force_fixed=force_fixed, write=not verify_only, sources=mine)
                 for t in targets]
    except UserError as exc:
        raise _nothing_written(exc, verify_only) from None
    # a card is only written once the whole image has been checked; files are written aside and
    # renamed at the end, so their check runs alongside the write. Compressed images are checked
    # as they stream.
    check_aside = all(i.partial is not None for i in infos) and not verify_only
    precheck = not verify_only and src.kind == "raw" and src.bmap_path is not None
    with _progress(show) as progress:
        pre = progress.add_task("check  image", total=src.bmap.mapped_blocks * src.bmap.block_size) \
            if precheck else None
        check_pre = lambda n: pre is not None and progress.advance(pre, n)  # noqa: E731
        if precheck and not check_aside:
            try:
                fl.check_image(src, check_pre)
            except UserError as exc:
                raise _nothing_written(exc, verify_only) from None
        if verify_only:
            reports = [fl.verify_only(src, info, skip_boot=skip_boot, progress=progress) for info in infos]
            result = fl.FlashResult(str(image), str(src.bmap_path), src.sha256_checked,
                                    src.bmap.mapped_blocks * src.bmap.block_size, time.monotonic() - t0, reports)
        else:
            result = fl.flash(src, infos, chosen, verify=not no_verify, progress=progress, check=check_aside,
                              check_progress=check_pre)
    if chosen:
        rec = record or Path("stamped-units.csv")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        st.append_record(rec, [{"unit": c.unit, "hostname": c.hostname, "node_public_key": c.node_public_key,
                                "image": str(image), "target": c.target, "stamped_at": now}
                               for c in result.cards if c.unit])
    failed = [c for c in result.cards if c.error or c.verified is False]
    if as_json:
        print(json.dumps({
            "image": result.image, "bmap": result.bmap, "sha256_checked": result.sha256_checked,
            "mapped_bytes": result.mapped_bytes, "seconds": round(result.seconds, 3),
            "mode": "verify-only" if verify_only else "write",
            "cards": [{"target": c.target, "unit": c.unit, "hostname": c.hostname,
                       "node_public_key": c.node_public_key, "written_bytes": c.written_bytes,
                       "write_seconds": round(c.write_seconds, 3), "verify_seconds": round(c.verify_seconds, 3),
                       "verify_extra_seconds": round(c.verify_extra_seconds, 3),
                       "verify_overlapped": c.verify_overlapped,
                       "verified": c.verified, "error": c.error,
                       "mismatches": [list(m) for m in c.mismatches[:20]],
                       "mismatch_count": len(c.mismatches)} for c in result.cards],
        }, indent=1))
    for c in result.cards:
        who = f" ({c.unit}, node key {c.node_public_key})" if c.unit else ""
        if c.error:
            err.print(f"[red]failed[/red] {c.target}{who}: {c.error}", highlight=False)
        elif c.verified is False:
            first = c.mismatches[0] if c.mismatches else None
            err.print(f"[red]differs[/red] {c.target}: {len(c.mismatches)} range(s) do not match the image"
                      + (f", first at bytes {first[0]}-{first[1]}" if first else "")
                      + ": the write was interrupted or the card is faulty; flash it again", highlight=False)
        elif not as_json:
            rate = c.written_bytes / c.write_seconds / (1 << 20) if c.write_seconds else 0
            what = "verified" if verify_only else ("written and verified" if c.verified else "written (not verified)")
            extra = "" if verify_only else f", {c.written_bytes >> 20} MiB in {c.write_seconds:.1f}s ({rate:.0f} MiB/s)"
            err.print(f"[green]ok[/green] {c.target}{who}: {what}{extra}", highlight=False)
            if c.unit:
                print(f"{c.unit}\t{c.node_public_key}\t{c.target}")
    if failed:
        raise SystemExit(1)
