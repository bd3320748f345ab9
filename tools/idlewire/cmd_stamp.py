"""`idlewire stamp`: per-unit identity written into copies of a golden image."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

from rich.console import Console

from .clikit import App, Arg, Opt
from .errors import UserError

err = Console(stderr=True)


def register(app: App) -> None:
    app.command()(stamp)


def stamp(
    image: Annotated[Path, Arg(help="The golden image (.img from `idlewire build`).")],
    unit: Annotated[Path | None, Opt("--unit", "-u", help="One unit: unit.yml.")] = None,
    units: Annotated[Path | None, Opt("--units", help="Many units: units.csv, one row each.")] = None,
    out: Annotated[Path | None, Opt(
        "--out", "-o", help="With --unit: the output .img (default: IMAGE-UNIT.img next to IMAGE). "
        "With --units: the output directory (required).")] = None,
    record: Annotated[Path | None, Opt(
        "--record", help="CSV the units' public keys are appended to (default: stamped-units.csv "
        "in the output directory).")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print a JSON summary on stdout.")] = False,
):
    """Write each unit's identity into its own copy of IMAGE (boot partition only, via mtools).

    Per unit: an ed25519 node key (generated unless the unit gives node_key; the public key is
    printed and appended to the record CSV for the vendor), SSH authorized keys, hostname, Wi-Fi
    (country, SSID, PSK — stored as the derived WPA key, never the passphrase), payout address
    and caps, in idlewire/stamp.toml + idlewire/node.key on the boot partition. The unit's first
    boot moves them into /etc/idlewire and erases them from the boot partition.

    unit.yml fields: unit, hostname, ssh_authorized_keys, wifi {country, ssid, psk, hidden},
    payout_address, caps {up_mbit, down_mbit, monthly_gb, max_sessions}, node_key (path of an
    ed25519 private key: PEM, OpenSSH, or base64 of its 32 bytes as /etc/idlewire/node.key holds it).
    units.csv columns: unit, hostname, ssh_authorized_keys (';' between keys), wifi_country,
    wifi_ssid, wifi_psk, wifi_hidden, payout_address, caps_up_mbit, caps_down_mbit,
    caps_monthly_gb, caps_max_sessions, node_key.

    Each output gets its own .bmap (golden ranges + the boot partition's new ranges), so
    `idlewire flash` and `bmaptool copy` write it sparsely. Mass production without image copies:
    `idlewire flash IMAGE DEV1 DEV2 … --units units.csv` stamps while writing.
    """
    from . import stamp as st
    from .units import load_unit, load_units

    if (unit is None) == (units is None):
        raise UserError("give exactly one of --unit unit.yml or --units units.csv")
    todo = [load_unit(unit)] if unit else load_units(units)  # type: ignore[arg-type]
    t0 = time.monotonic()
    golden = st.Golden(image)  # every check of the image; its boot partition set aside once
    try:
        done, record = _stamp_all(golden, image, todo, units, out, record, as_json)
        total = time.monotonic() - t0
    finally:
        golden.close()
    if as_json:
        print(json.dumps({"golden": str(image), "record": str(record), "seconds": round(total, 3),
                          "units": [{"unit": s.unit.unit, "hostname": s.unit.hostname, "image": str(s.image),
                                     "bmap": str(s.bmap) if s.bmap else None,
                                     "node_public_key": s.node_public_key, "copy": s.copy,
                                     "seconds": round(s.seconds, 3)} for s in done]}, indent=1))
    else:
        err.print(f"{len(done)} unit(s) in {total:.1f}s ({total / len(done):.2f}s each); public keys in {record}")


def _stamp_all(golden, image: Path, todo: list, units: Path | None, out: Path | None, record: Path | None,
               as_json: bool):
    from . import stamp as st

    stem, _ = st.companions(image)
    if units:
        if out is None:
            raise UserError("--units needs --out DIR, the directory for the stamped images")
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: exists and is not a directory; --out with --units is a directory")
        targets = [out / f"{stem}-{u.unit}.img" for u in todo]
    else:
        target = out or image.with_name(f"{stem}-{todo[0].unit}.img")
        if target.is_dir():
            target = target / f"{stem}-{todo[0].unit}.img"
        if target.suffix != ".img":
            raise UserError(f"{target}: the output image name must end in .img")
        targets = [target]
    for t in targets:
        if t.resolve() == image.resolve():
            raise UserError(f"{t}: is the golden image itself; give another --out")
        if t.exists():
            raise UserError(f"{t}: already exists; remove it or give another --out (stamping never overwrites)")
    record = record or targets[0].parent / "stamped-units.csv"
    done: list = []
    # two units at a time: one's mtools, key and hashing run while the other's copy is written
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=2)
    try:
        with err.status("stamping") as status:
            for i, (u, s) in enumerate(zip(todo, pool.map(golden.stamp, todo, targets), strict=True), start=1):
                status.update(f"stamping ({i}/{len(todo)} done, {u.unit})")
                done.append(s)
                if not as_json:
                    print(f"{u.unit}\t{s.node_public_key}\t{s.image}", flush=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        # the units stamped before a failure are recorded too: their images exist
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if done:
            st.append_record(record, [{"unit": s.unit.unit, "hostname": s.unit.hostname,
                                       "node_public_key": s.node_public_key, "image": str(s.image),
                                       "stamped_at": now} for s in done])
    return done, record
