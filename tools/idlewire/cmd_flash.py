"""`idlewire flash`: sparse, verified, refusing writes of an image to cards (several at once)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated

from .clikit import App, Arg, LazyConsole, Opt
from .errors import UserError

err = LazyConsole(stderr=True, soft_wrap=True)  # an error stays one line, however long its paths


def register(app: App) -> None:
    app.command()(flash)


def _progress(enabled: bool):
    """rich's bars with rate and ETA on stderr, or None (and rich not even imported) when nobody
    watches: --json with stderr not a terminal."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err.rich(), transient=False)


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
    force: Annotated[bool, Opt("--force", help="Overwrite a TARGET file that exists and is not an "
                               "image idlewire wrote (never one of this command's inputs).")] = False,
    force_fixed: Annotated[bool, Opt("--force-fixed", help="Allow a non-removable disk "
                                     "(never the one holding / or anything mounted).")] = False,
    no_verify: Annotated[bool, Opt("--no-verify", help="Skip reading the card back.")] = False,
    check_first: Annotated[bool, Opt("--check-first", help="Check all of IMAGE against its bmap before "
                                     "writing a byte, so that a damaged image leaves the card untouched "
                                     "(one more pass over IMAGE; a compressed one is decompressed twice). "
                                     "Default: checked beside the write; a damaged image stops it before "
                                     "the new partition table, and the card holds nothing bootable.")] = False,
    verify_only: Annotated[bool, Opt("--verify-only", help="Write nothing: compare the card "
                                     "with IMAGE (finds interrupted or failed writes).")] = False,
    skip_boot: Annotated[bool, Opt("--skip-boot", help="With --verify-only: leave out the boot "
                                   "partition as IMAGE's own table places it (cards stamped while flashing "
                                   "differ there; the card's table is never trusted).")] = False,
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
    whose stream is truncated. The image's bytes are checked against the bmap's sha256 beside
    the write (an uncompressed .img range by range, a compressed one as it streams): a damaged
    image stops every target before its partition table, which is written last, after the old
    one was erased first: a card then holds nothing bootable (exit 2), a file target is left as
    it was. --check-first checks the whole image before writing a byte instead, for when the
    card's old contents must survive a bad image. Verification failure exits 1.

    Several cards: `idlewire flash IMAGE /dev/sdb /dev/sdc --units units.csv` writes them at
    the same time from one read of IMAGE, each stamped with its own unit, and reports per card.
    A regular file as TARGET is written beside it (.TARGET.partial) and renamed over it once
    written and read back, so a refused, failed or interrupted write leaves it as it was; the new
    file keeps the old one's mode and owner. An existing file is only replaced when idlewire
    wrote it (or it holds no data) unless --force; one of this command's own files (IMAGE, the
    bmap, --unit/--units, --record) never is, nor is one file named twice (a link, ./x and x). A
    file a loop device is attached to is refused: flash the loop device instead. Ctrl-C, SIGTERM
    and SIGHUP leave no partial file and no temporary copy of a unit's private key (those live on
    tmpfs, 0600, or in IDLEWIRE_SECRET_DIR).

    The record (--record, a CSV shared safely by any number of runs) gets one row per card whose
    write began, with the unit's public key and status ok or failed; when it cannot be written
    the rows go to a fallback file beside it (or in the working directory) and to stdout. A
    node_key already in the record is refused before anything is written.

    Speed: writes and reads bypass the page cache (O_DIRECT); each range is read back while the
    later ones are being written; the image is checked against its bmap during the write rather
    than before it (unless --check-first). --json reports write_seconds, verify_seconds (the
    read-back's own time) and verify_extra_seconds (what it added after the write) per card.
    """
    from .hostio import signals_interrupt

    with signals_interrupt():  # SIGTERM / SIGHUP clean up as Ctrl-C does
        _flash(image, targets, bmap_file, unit, units, start, record, force, force_fixed, no_verify,
               verify_only, skip_boot, as_json, keys, check_first)


def _flash(image: Path, targets: list[Path], bmap_file: Path | None, unit: Path | None, units: Path | None,
           start: int, record: Path | None, force: bool, force_fixed: bool, no_verify: bool, verify_only: bool,
           skip_boot: bool, as_json: bool, keys: list[Path] | None = None, check_first: bool = False) -> None:
    from . import flash as fl

    if unit and units:
        raise UserError("give --unit or --units, not both")
    if check_first and verify_only:
        raise UserError("--check-first is for writing; --verify-only writes nothing (it checks the image as it reads)")
    rec = (record or Path("stamped-units.csv")) if (unit or units) else None
    inputs_ = {"the image": image, "the bmap": bmap_file, "the unit file": unit, "the units file": units,
               "the record": rec}
    try:  # the refusals come before any progress bar: an error stays one line
        chosen = _units(unit, units, start, len(targets), verify_only)
        _check_targets(targets, inputs_, force, verify_only)
        src = _open_checked_source(image, bmap_file, keys)
        if rec is not None:
            _check_record(rec, chosen or [])
        mine = tuple(p for p in (image, src.bmap_path) if p)
        infos = [fl.inspect_target(t, src.size, force_fixed=force_fixed, write=not verify_only, sources=mine)
                 for t in targets]
        boot = _image_boot(src) if verify_only and skip_boot else None
    except UserError as exc:
        raise fl.before_writing(exc, verify_only=verify_only) from None
    except OSError as exc:
        raise fl.before_writing(_os_error(exc), verify_only=verify_only) from None
    show = not as_json or sys.stderr.isatty()
    t0 = time.monotonic()
    if verify_only:
        with _progress(show) as progress:
            reports = [fl.verify_only(src, info, skip_boot=skip_boot, progress=progress, boot=boot)
                       for info in infos]
        result = fl.FlashResult(str(image), str(src.bmap_path), src.sha256_checked,
                                src.bmap.mapped_blocks * src.bmap.block_size, time.monotonic() - t0, reports)
    else:
        result = _write(src, infos, chosen, rec, not no_verify, show, as_json, check_first)
    _report(result, verify_only, as_json)


def _os_error(exc: OSError) -> UserError:
    return UserError(f"{exc.filename or 'flash'}: {exc.strerror or exc}")


def _units(unit: Path | None, units: Path | None, start: int, count: int, verify_only: bool) -> list | None:
    """The units to stamp the targets with (None: no stamping)."""
    from .inputs import regular_file
    from .units import load_unit, load_units

    if verify_only and (unit or units):
        raise UserError("--verify-only compares with IMAGE; to check a card stamped while flashing add "
                        "--skip-boot instead of --unit/--units")
    if unit:
        if count != 1:
            raise UserError(f"--unit stamps one card but {count} targets were given; use --units units.csv")
        regular_file(unit, "--unit")  # its encoding: the loader says (config._load_yaml, units)
        return [load_unit(unit)]
    if units:
        regular_file(units, "--units")
        rows = load_units(units)
        chosen = rows[start - 1:start - 1 + count]
        if len(chosen) < count:
            raise UserError(f"{units}: {len(rows)} unit row(s); rows {start}-{start + count - 1} are "
                            f"needed for {count} target(s); add rows or lower --start")
        return chosen
    return None


def _check_targets(targets: list[Path], inputs_: dict[str, Path | None], force: bool, verify_only: bool) -> None:
    """The same target never twice (however it is named); no input of this command, and no file
    idlewire did not write (without --force), is a target."""
    from . import inputs

    inputs.distinct(targets)
    if not verify_only:
        for t in targets:
            inputs.overwritable(t, {k: v for k, v in inputs_.items() if v is not None}, force=force)


def _open_checked_source(image: Path, bmap_file: Path | None, keys=None):
    """THE place the source is opened and checked, before any target is opened: the artifacts'
    signatures (`flash --key`), the image, its bmap, its .sha256 and the container's own size (an
    uncompressed image's ranges are checked against the bmap just before, or while, writing)."""
    from . import flash as fl

    if keys:
        from . import signing

        signing.verify_for_flash(image, bmap_file, keys)
    return fl.open_source(image, bmap_file, preverify=False)


def _check_record(rec: Path, chosen: list) -> None:
    """The record can take the new rows, and no given node key is one it already holds."""
    from . import record, stamp

    record.preflight(rec)
    known = record.known_keys(rec)
    for u in chosen:
        if u.node_key_pem and known:
            pub = stamp.node_key(u)[1]
            if pub in known:
                where = getattr(u, "source", "") or f"unit {u.unit}"
                raise UserError(f"{where}: field 'node_key': this key is already in {rec} as unit "
                                f"{known[pub]!r}; every unit needs its own node key")


def _image_boot(src) -> tuple[int, int]:
    from . import flash as fl

    layout = fl.image_layout(src)
    return layout.boot_offset, layout.boot_end


def _write(src, infos: list, chosen: list | None, rec: Path | None, verify: bool, show: bool, as_json: bool,
           check_first: bool = False):
    """Write every target; whatever happens, every unit whose card was written is recorded."""
    from . import flash as fl

    # The image is checked against its bmap beside the write (an uncompressed one by its own
    # thread, a compressed one as it streams): a damaged one stops every target before the
    # partition table. --check-first: the whole image first, nothing opened for writing until then.
    raw_check = src.kind == "raw" and src.bmap_path is not None
    reports: list = []
    finished = False
    try:
        with _progress(show) as progress:
            task = progress.add_task("check  image", total=src.bmap.mapped_blocks * src.bmap.block_size) \
                if progress is not None and (raw_check or check_first) else None
            checked = lambda n: task is not None and progress.advance(task, n)  # noqa: E731
            if check_first:
                try:
                    fl.check_whole(src, checked)
                except UserError as exc:
                    raise fl.before_writing(exc) from None
            result = fl.flash(src, infos, chosen, verify=verify, progress=progress,
                              check=raw_check and not check_first, check_progress=checked, reports=reports)
        finished = True
    except OSError as exc:
        raise _os_error(exc) from None
    finally:
        if chosen and rec is not None:
            _record(rec, src.path, reports, interrupted=not finished, as_json=as_json)
    return result


def _record(rec: Path, image: Path, reports: list, interrupted: bool, as_json: bool) -> None:
    """Append every written card's unit to the record (status failed when its card failed); when
    the record cannot be written, a fallback file. The rows go to stdout too when no summary
    will carry the keys (the record failed, or the run was interrupted or failed)."""
    from . import record

    rows = [{"unit": c.unit, "hostname": c.hostname, "node_public_key": c.node_public_key, "image": str(image),
             "target": c.target, "stamped_at": record.now(), record.STATUS: record.OK if c.ok else record.FAILED}
            for c in reports if c.unit and c.reached]
    out = record.append(rec, rows)
    if out.fallback:
        err.print(f"[red]error:[/red] the record could not be written ({out.reason}); the units' public keys "
                  f"are in {out.path} and below", highlight=False, soft_wrap=True)
    if out.fallback or interrupted:
        print(record.rows_text(rows), end="", flush=True)
    if not out.fallback and not as_json and any(r[record.STATUS] == record.FAILED for r in rows):
        err.print(f"failed cards recorded as failed in {out.path}", highlight=False)


def _report(result, verify_only: bool, as_json: bool) -> None:
    failed = [c for c in result.cards if not c.ok]
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
        _report_card(c, verify_only, as_json)
    if failed:
        raise SystemExit(1)


def _report_card(c, verify_only: bool, as_json: bool) -> None:
    who = f" ({c.unit}, node key {c.node_public_key})" if c.unit else ""
    if c.error:
        err.print(f"[red]failed[/red] {c.target}{who}: {c.error}", highlight=False)
    elif c.verified is False:
        first = c.mismatches[0] if c.mismatches else None
        err.print(f"[red]differs[/red] {c.target}{who}: {len(c.mismatches)} range(s) do not match the image"
                  + (f", first at bytes {first[0]}-{first[1]}" if first else "")
                  + ": the write was interrupted or the card is faulty; flash it again", highlight=False)
    elif not as_json:
        rate = c.written_bytes / c.write_seconds / (1 << 20) if c.write_seconds else 0
        what = "verified" if verify_only else ("written and verified" if c.verified else "written (not verified)")
        extra = "" if verify_only else f", {c.written_bytes >> 20} MiB in {c.write_seconds:.1f}s ({rate:.0f} MiB/s)"
        err.print(f"[green]ok[/green] {c.target}{who}: {what}{extra}", highlight=False)
        if c.unit:
            print(f"{c.unit}\t{c.node_public_key}\t{c.target}", flush=True)
