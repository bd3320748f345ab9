"""Where one `idlewire flash` spends its time: timestamps around each step, on stderr.

    sudo .venv/bin/python bench/flash_phases.py [--what-if-no-check] -- flash [ARGS…]

e.g. `… -- flash --json /var/tmp/idlewire-bench/idlewire-bench-1.img /dev/loop0`. Prints, from
the interpreter's start: imports done, then start → end of open_source, inspect_target,
check_whole (only with `flash --check-first`: the image checked before a byte is written), flash
(write with the check beside it, fsync, read-back), publish, and the end of main. Compare a run
with and without `--check-first` to see what "nothing written from a bad image" costs over the
default "nothing bootable written".

--what-if-no-check skips the image's check against its bmap altogether (the sha256 of every
mapped range; the read-back still compares the target with the image). No command of idlewire
can do that: it is here to show the floor of a flash on this machine without that check, e.g.
that a verified flash to a loop device without it is already as slow as the bench's 4x-dd
goal allows (issue #18).
"""

from __future__ import annotations

import functools
import sys
import time

T0 = time.monotonic()

from idlewire import flash as fl  # noqa: E402 (timed from the interpreter's start)


def _timed(name: str, where=fl) -> None:
    f = getattr(where, name)

    @functools.wraps(f)
    def g(*a, **k):
        t = time.monotonic()
        try:
            return f(*a, **k)
        finally:
            print(f"{name:16} {t - T0:7.3f} → {time.monotonic() - T0:7.3f} s", file=sys.stderr)

    setattr(where, name, g)


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--what-if-no-check":
        args = args[1:]
        from idlewire.flash import source

        def unchecked(_where, part, progress, _bad) -> None:
            if progress:
                progress(sum(e - s for s, e, _ in part))

        source._hash_part = source._hash_mapped = unchecked  # read, or hashed where it is mapped
        print("what if: no check of the image against its bmap", file=sys.stderr)
    if args and args[0] == "--":
        args = args[1:]
    for name in ("open_source", "inspect_target", "check_whole", "flash"):
        _timed(name)
    _timed("publish", fl.engine)  # called inside the engine
    from idlewire.cli import main as cli_main

    print(f"{'imports done':16} {time.monotonic() - T0:7.3f} s", file=sys.stderr)
    sys.argv = ["idlewire", *args]
    try:
        cli_main()
    finally:
        print(f"{'main done':16} {time.monotonic() - T0:7.3f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
