"""Where one `idlewire flash` spends its time: timestamps around each step, on stderr.

    sudo .venv/bin/python bench/flash_phases.py [--what-if-no-precheck | --what-if-check-alongside] \
        -- flash [ARGS…]

e.g. `… -- flash --json /var/tmp/idlewire-bench/idlewire-bench-1.img /dev/loop0`. Prints, from
the interpreter's start: imports done, then start → end of open_source, inspect_target,
check_image (the sha256 of the image before a card is written), flash (write, fsync, read-back),
_publish, and the end of main. `--what-if-no-precheck` makes check_image do nothing, to measure
what the "nothing written from a bad image" guarantee costs (never use it to write a card: a
damaged image would be written); `--what-if-check-alongside` runs the check beside the write
instead (as for file targets), so the process ends only when both have (a bad image would still
have been written: bench only).
"""

from __future__ import annotations

import functools
import sys
import threading
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
    alongside: list = []
    if args and args[0] == "--what-if-no-precheck":
        args = args[1:]
        fl.check_image = lambda *a, **k: None
    elif args and args[0] == "--what-if-check-alongside":
        # the check run beside the write instead of before it, as for file targets: what a card
        # flash would cost if "nothing written" became "nothing bootable written"
        args = args[1:]
        real_check = fl.check_image

        def later(src, *a, **k):
            alongside.append(threading.Thread(target=real_check, args=(src,), daemon=True))
            alongside[-1].start()

        fl.check_image = later
    if args and args[0] == "--":
        args = args[1:]
    for name in ("open_source", "inspect_target", "check_image", "flash"):
        _timed(name)
    _timed("publish", fl.engine)  # called inside the engine
    from idlewire.cli import main as cli_main

    print(f"{'imports done':16} {time.monotonic() - T0:7.3f} s", file=sys.stderr)
    sys.argv = ["idlewire", *args]
    try:
        cli_main()
    finally:
        for t in alongside:
            t.join()
        print(f"{'main done':16} {time.monotonic() - T0:7.3f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
