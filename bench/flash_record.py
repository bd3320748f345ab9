#!/usr/bin/env python3
"""Many `idlewire flash --unit` processes sharing one record: is every row there?

Usage: bench/flash_record.py [--procs 16] [--rounds 20] [--image IMG]

Each round starts PROCS real `idlewire flash IMAGE cardN.img --unit uN.yml --record R` processes at
once (file targets, a small synthetic image unless --image), waits for them, and checks that the
record holds exactly one row per process, with the key that process printed. The peer is the
record's former way of appending (read the whole file, write it aside, rename over it), run by
the same number of processes at once: the ratio is rows lost by each.
"""

from __future__ import annotations

import argparse
import csv
import io
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests")]

from idlewire import record  # noqa: E402


def small_image(d: Path) -> Path:
    """A 48 MiB synthetic image (FAT boot + ext4 root, 2 MiB of data) with its .bmap."""
    from imagelab import make_image

    return make_image(d / "small.img", size=48 << 20, boot_size=33 << 20, data_mib=2)


def _old_append(path: Path, row: dict[str, str]) -> None:
    """The former append_record: whole file read, written aside, renamed (no lock)."""
    existing = path.read_text() if path.exists() else ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=record.COLUMNS, lineterminator="\n")
    if not existing:
        w.writeheader()
    w.writerow({k: row.get(k, "") for k in record.COLUMNS})
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(existing + buf.getvalue())
    tmp.rename(path)


def _old_worker(args: tuple[str, int]) -> bool:
    path, i = args
    try:
        _old_append(Path(path), {"unit": f"u{i:02}", "node_public_key": f"K{i}"})
        return True
    except OSError:
        return False  # a rename race: the row is lost with an error


def peer_round(d: Path, procs: int) -> int:
    rec = d / "old.csv"
    rec.unlink(missing_ok=True)
    with multiprocessing.Pool(procs) as pool:
        pool.map(_old_worker, [(str(rec), i) for i in range(procs)])
    rows = list(csv.DictReader(rec.open())) if rec.exists() else []
    return procs - len(rows)


def idlewire_round(d: Path, image: Path, procs: int, r: int) -> tuple[int, float]:
    rec = d / f"record-{r}.csv"
    running = []
    t0 = time.monotonic()
    for i in range(procs):
        u = d / f"u{i:02}.yml"
        u.write_text(f"unit: r{r:02}u{i:02}\npayout_address: addr-r{r:02}u{i:02}\n")
        running.append(subprocess.Popen(
            [sys.executable, "-m", "idlewire", "flash", str(image), str(d / f"card{i:02}.img"), "--unit", str(u),
             "--record", str(rec), "--no-verify"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    printed = {}
    for p in running:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a flash failed: {err.strip().splitlines()[-1:]}")
        unit, key, _ = out.strip().split("\t")
        printed[unit] = key
    seconds = time.monotonic() - t0
    rows = {r_["unit"]: r_["node_public_key"] for r_ in record.read(rec)}
    lost = sum(1 for u, k in printed.items() if rows.get(u) != k)
    return lost + abs(len(record.read(rec)) - procs), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--image", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="idlewire-bench-record-") as tmp:
        d = Path(tmp)
        image = a.image or small_image(d)
        lost_new = lost_old = 0
        for r in range(a.rounds):
            lost, secs = idlewire_round(d, image, a.procs, r)
            old = peer_round(d, a.procs)
            lost_new, lost_old = lost_new + lost, lost_old + old
            print(f"round {r + 1:2}: idlewire {a.procs - lost}/{a.procs} rows in {secs:.1f}s; "
                  f"former append {a.procs - old}/{a.procs}", flush=True)
        total = a.procs * a.rounds
        print(f"{a.procs} concurrent idlewire flash --unit, {a.rounds} rounds: {total - lost_new}/{total} rows "
              f"present (lost {lost_new}); former read-rename append: lost {lost_old}/{total} "
              f"(ratio of rows lost, former : now = {lost_old} : {lost_new})")
        if lost_new:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
