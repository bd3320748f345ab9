#!/usr/bin/env python3
"""`idlewire flash --units`: time from the command's start to the first byte written, by rows.

Usage: bench/flash_first_byte.py [--rows 10000] [--wifi-rows N] [--cards 2] [--image IMG]

Runs `idlewire flash IMAGE card1.img … --units units.csv` in a fresh interpreter (timed from its
start) with a units.csv of 1 row per card, then of ROWS rows without Wi-Fi, then of ROWS rows
with Wi-Fi (each row's WPA key is derived from its passphrase: PBKDF2, 4096 rounds), and prints
the phases (wall and CPU seconds, this process and its tools): units loaded, overlays stamped,
first byte written, done. The ratio is each run's CPU to the first byte against the file that
holds just the rows needed (the goal: ≤ 2 s to the first byte). CPU seconds stay meaningful on
a machine shared with other work, where wall time does not.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from flash_record import small_image  # noqa: E402 (bench/ is this script's directory)

PROBE = r"""
import os, sys, time, threading
T0 = time.monotonic()
C0 = sum(os.times()[:4])
from idlewire import units as U
from idlewire.flash import engine as E
marks = {}
def mark(name):
    marks.setdefault(name, (time.monotonic() - T0, sum(os.times()[:4]) - C0))
real_load = U.load_units
def load_units(p):
    try:
        return real_load(p)
    finally:
        mark("units loaded")
U.load_units = load_units
real_data = E.Writer._data
def _data(self, *a):
    mark("first byte")
    return real_data(self, *a)
E.Writer._data = _data
real_open = E._Flash.open_targets
def open_targets(self):
    mark("overlays stamped")
    return real_open(self)
E._Flash.open_targets = open_targets
from idlewire.cli import main
try:
    main(sys.argv[1:])
finally:
    mark("done")
    print(" ".join(f"{k.replace(' ', '_')}={w:.3f}/{c:.3f}" for k, (w, c) in marks.items()), file=sys.stderr)
"""


def write_units(path: Path, rows: int, wifi: bool) -> None:
    head = "unit,hostname,payout_address" + (",wifi_country,wifi_ssid,wifi_psk" if wifi else "")
    lines = [head] + [f"u{i:05},h{i:05},addr-{i:05}" + (f",DE,net{i},passphrase-{i}" if wifi else "")
                      for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def run(image: Path, d: Path, units: Path, cards: int) -> dict[str, float]:
    targets = [str(d / f"card{i}.img") for i in range(cards)]
    res = subprocess.run([sys.executable, "-c", PROBE, "flash", str(image), *targets, "--units", str(units),
                          "--record", str(d / "rec.csv"), "--no-verify"], cwd=d, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    last = res.stderr.strip().splitlines()[-1]
    out = {}
    for kv in last.split():
        k, v = kv.split("=")
        wall, cpu = v.split("/")
        out[k.replace("_", " ")] = (float(wall), float(cpu))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--wifi-rows", type=int, help="rows of the Wi-Fi file (default: --rows)")
    ap.add_argument("--cards", type=int, default=2)
    ap.add_argument("--image", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="idlewire-bench-ttfb-") as tmp:
        d = Path(tmp)
        image = a.image or small_image(d)
        base = None
        for label, rows, wifi in (("just the rows needed", a.cards, True), (f"{a.rows} rows", a.rows, False),
                                  (f"{a.wifi_rows or a.rows} rows with Wi-Fi", a.wifi_rows or a.rows, True)):
            units = d / "units.csv"
            write_units(units, rows, wifi)
            m = run(image, d, units, a.cards)
            base = base or m["first byte"][1]
            print(f"{label:28} wall/CPU s: units loaded {'/'.join(f'{x:.2f}' for x in m['units loaded'])}, "
                  f"overlays {'/'.join(f'{x:.2f}' for x in m['overlays stamped'])}, "
                  f"first byte {'/'.join(f'{x:.2f}' for x in m['first byte'])} "
                  f"({m['first byte'][1] / base:.1f}x the CPU of the rows needed), "
                  f"done {'/'.join(f'{x:.2f}' for x in m['done'])}", flush=True)


if __name__ == "__main__":
    main()
