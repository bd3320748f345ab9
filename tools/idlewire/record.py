"""The vendor's record of stamped units: one CSV row per unit, with its node's public key.

The record is what ties a unit in the field to its identity; a lost row is a unit nobody can
claim. So:
- rows are appended under an exclusive lock (flock) as one write, then fsync'd: any number of
  `stamp` / `flash` processes can share one record, and a crash leaves whole rows only;
- a record that cannot be written (read-only, full disk, not a record) never loses the rows:
  they go to a fallback file beside it (or in the working directory, or $HOME) and the caller
  prints them on stdout;
- a record exported by a spreadsheet (UTF-8 BOM, CRLF line ends) reads as one written here;
- a card that failed its read-back is recorded with status "failed", never as a unit.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import hostio
from .errors import UserError

COLUMNS = ("unit", "hostname", "node_public_key", "image", "target", "stamped_at")
STATUS = "status"  # ok | failed: newer records carry it (older ones without it are still appended)
OK, FAILED = "ok", "failed"
BOM = "\ufeff"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); not an idlewire record, "
                        "give another --record file") from None
    return text.removeprefix(BOM)


def _header(path: Path, text: str) -> list[str] | None:
    """The record's columns (None for an empty file); a file that is not a record is refused."""
    first = text.splitlines()[0] if text.strip() else ""
    if not first:
        return None
    cols = [c.strip() for c in next(csv.reader([first]))]
    if cols[:len(COLUMNS)] != list(COLUMNS) or cols[len(COLUMNS):] not in ([], [STATUS]):
        raise UserError(f"{path}: not an idlewire record (its header is not {','.join(COLUMNS)},{STATUS}); "
                        "give another --record file")
    return cols


def read(path: Path) -> list[dict[str, str]]:
    """Every row of a record (BOM and CRLF tolerated); rows without a status are "ok"."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UserError(f"{path}: cannot read the record: {exc.strerror}") from None
    text = _decode(path, data)
    if _header(path, text) is None:
        return []
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise UserError(f"{path}: damaged record: {exc}") from None
    for r in rows:
        r[STATUS] = (r.get(STATUS) or OK).strip()
    return rows


def known_keys(path: Path) -> dict[str, str]:
    """{node public key: unit} of the units a record holds (failed cards left out)."""
    return {r["node_public_key"]: r.get("unit") or "" for r in read(path)
            if r.get("node_public_key") and r[STATUS] == OK}


def _render(cols: list[str], rows: list[dict[str, str]], header: bool, crlf: bool) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\r\n" if crlf else "\n", extrasaction="ignore")
    if header:
        w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") or "" for k in cols})
    return buf.getvalue().encode()


def _append_locked(path: Path, rows: list[dict[str, str]]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        existing = os.pread(fd, size, 0) if size else b""
        text = _decode(path, existing)
        cols = _header(path, text)
        header = cols is None
        cols = cols or [*COLUMNS, STATUS]
        if STATUS not in cols:  # an older record: a failed card is not written as a unit there
            rows = [r for r in rows if r.get(STATUS, OK) == OK]
        lead = b"\r\n" if existing and not existing.endswith((b"\n", b"\r")) else b""
        data = lead + _render(cols, rows, header, crlf=b"\r\n" in existing[:4096])
        if os.write(fd, data) != len(data):
            raise OSError(28, "short write")
        os.fsync(fd)
    finally:
        os.close(fd)


def preflight(path: Path) -> None:
    """Before anything is written: the record is a record (or absent) and can be appended to.
    (Appending can still fail later; then the rows go to a fallback file.)"""
    if path.exists() or path.is_symlink():
        from .inputs import regular_file  # a FIFO or a device as --record would hang or worse

        regular_file(path, "--record")
        read(path)
        if not os.access(path, os.W_OK):
            raise UserError(f"{path}: the record is not writable; fix its permissions or give another --record")
        return
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():  # created later (stamp --out DIR makes its directory)
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{path}: cannot create the record in {parent}; give another --record")


@dataclass
class Outcome:
    path: Path  # where the rows are
    fallback: bool  # the record could not be written: `path` is a fallback file
    reason: str = ""  # why not


def fallback_path(path: Path) -> list[Path]:
    name = f"{path.name}.unrecorded-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.csv"
    return [path.parent / name, Path.cwd() / name, Path.home() / name]


def append(path: Path, rows: list[dict[str, str]]) -> Outcome:
    """Append `rows` to the record; when it cannot be written, to a fallback file. Never raises
    for the record's own failure (the caller also prints every row on stdout)."""
    if not rows:
        return Outcome(path, False)
    with hostio.signals_deferred():  # a second Ctrl-C or SIGTERM waits for the rows
        return _append_or_fall_back(path, rows)


def _append_or_fall_back(path: Path, rows: list[dict[str, str]]) -> Outcome:
    try:
        _append_locked(path, rows)
        return Outcome(path, False)
    except (OSError, UserError) as exc:
        reason = str(exc) if isinstance(exc, UserError) else f"{path}: {exc.strerror or exc}"
    for cand in fallback_path(path):
        try:
            fd = os.open(cand, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                data = _render([*COLUMNS, STATUS], rows, True, crlf=False)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return Outcome(cand, True, reason)
        except OSError:
            continue
    return Outcome(path, True, reason + "; no fallback file could be written either: the rows are on stdout only")


def rows_text(rows: list[dict[str, str]]) -> str:
    """The rows as the record holds them (for stdout when the record could not be written)."""
    return _render([*COLUMNS, STATUS], rows, False, crlf=False).decode()
