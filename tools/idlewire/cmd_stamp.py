"""`idlewire stamp`: per-unit identity written into copies of a golden image."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

from .clikit import App, Arg, LazyConsole, Opt
from .errors import UserError

err = LazyConsole(stderr=True, soft_wrap=True)  # an error stays one line, however long its paths


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
    (country, SSID, PSK — stored as the derived WPA key, the passphrase only with wpa3: a router's
    access point then offers WPA3-SAE too), payout address,
    the hub it sells through (marketplace), its country (region), its mode (router: the unit
    is the home router; node: a host on the owner's LAN), a router's WAN (wan: dhcp, or pppoe
    with the ISP's login, written 0600 on the unit), and caps, in
    idlewire/stamp.toml + idlewire/node.key on the boot partition. The unit's first boot moves
    them into /etc/idlewire and erases them from the boot partition; a unit stamped with
    marketplace and region registers itself with that hub. Its marketplace, region, mode, wan and
    caps replace the image's node.toml values (the role's agent_marketplace, agent_region,
    idlewire_mode, idlewire_wan, …).

    unit.yml fields: unit, hostname, ssh_authorized_keys, wifi {country, ssid, psk, hidden, wpa3},
    payout_address, marketplace (http(s):// URL of the hub), region (ISO 3166-1 alpha-2 code such
    as DE), mode (node or router), wan (dhcp or pppoe), pppoe {user, password},
    caps {up_mbit, down_mbit, monthly_gb, max_sessions}, node_key (path of an ed25519
    private key: PEM, OpenSSH, or base64 of its 32 bytes as /etc/idlewire/node.key holds it).
    units.csv columns: unit, hostname, ssh_authorized_keys (';' between keys), wifi_country,
    wifi_ssid, wifi_psk, wifi_hidden, wifi_wpa3, payout_address, marketplace, region, mode, wan, pppoe_user,
    pppoe_password, caps_up_mbit, caps_down_mbit, caps_monthly_gb, caps_max_sessions, node_key.

    Each output gets its own .bmap (golden ranges + the boot partition's new ranges), so
    `idlewire flash` and `bmaptool copy` write it sparsely. Mass production without image copies:
    `idlewire flash IMAGE DEV1 DEV2 … --units units.csv` stamps while writing.
    """
    from . import stamp as st
    from .hostio import signals_deferred, signals_interrupt
    from .inputs import regular_file
    from .units import load_unit, load_units

    if (unit is None) == (units is None):
        raise UserError("give exactly one of --unit unit.yml or --units units.csv")
    source = unit or units
    regular_file(source, "--unit" if unit else "--units")  # type: ignore[arg-type]  (encoding: the loader)
    todo = [load_unit(unit)] if unit else load_units(units)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with signals_interrupt():  # SIGTERM / SIGHUP clean up as Ctrl-C does
        golden = st.Golden(image)  # every check of the image; its boot partition set aside once
        try:
            done, record = _stamp_all(golden, image, todo, source, units is not None, out, record, as_json)
            total = time.monotonic() - t0
        finally:
            with signals_deferred():  # the golden boot partition's copy goes, even on a second Ctrl-C
                golden.close()
    if as_json:
        print(json.dumps({"golden": str(image), "record": str(record), "seconds": round(total, 3),
                          "units": [{"unit": s.unit.unit, "hostname": s.unit.hostname, "image": str(s.image),
                                     "bmap": str(s.bmap) if s.bmap else None,
                                     "node_public_key": s.node_public_key, "copy": s.copy,
                                     "seconds": round(s.seconds, 3)} for s in done]}, indent=1))
    else:
        err.print(f"{len(done)} unit(s) in {total:.1f}s ({total / len(done):.2f}s each); public keys in {record}")


def _outputs(image: Path, todo: list, units: bool, out: Path | None) -> list[Path]:
    from . import stamp as st

    stem, _ = st.companions(image)
    if units:
        if out is None:
            raise UserError("--units needs --out DIR, the directory for the stamped images")
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: exists and is not a directory; --out with --units is a directory")
        return [out / f"{stem}-{u.unit}.img" for u in todo]
    target = out or image.with_name(f"{stem}-{todo[0].unit}.img")
    if target.is_dir():
        target = target / f"{stem}-{todo[0].unit}.img"
    if target.suffix != ".img":
        raise UserError(f"{target}: the output image name must end in .img")
    return [target]


def _check_outputs(targets: list[Path], inputs_: dict[str, Path]) -> None:
    """No output is an input (however it is named), exists already, or is named twice."""
    from . import inputs

    for t in targets:
        for what, p in inputs_.items():
            if os.path.lexists(t) and inputs.identity(t) == inputs.identity(p):
                raise UserError(f"{t}: is {what} itself; give another --out")
        if os.path.lexists(t):
            raise UserError(f"{t}: already exists; remove it or give another --out (stamping never overwrites)")
    inputs.distinct(targets)


def _stamp_all(golden, image: Path, todo: list, source: Path, many: bool, out: Path | None,
               record: Path | None, as_json: bool):
    from concurrent.futures import ThreadPoolExecutor

    targets = _outputs(image, todo, many, out)
    record = record or targets[0].parent / "stamped-units.csv"
    _check_outputs(targets, {"the golden image": image, "the unit file": source, "the record": record})
    _check_record(record)
    # two units at a time: one's mtools, key and hashing run while the other's copy is written
    pool = ThreadPoolExecutor(max_workers=2)
    futures = [pool.submit(golden.stamp, u, t) for u, t in zip(todo, targets, strict=True)]
    done: list = []
    finished = False
    try:
        with err.status("stamping") as status:
            for i, (u, f) in enumerate(zip(todo, futures, strict=True), start=1):
                s = f.result()
                status.update(f"stamping ({i}/{len(todo)} done, {u.unit})")
                done.append(s)
                if not as_json:
                    print(f"{u.unit}\t{s.node_public_key}\t{s.image}", flush=True)
        finished = True
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        # every unit whose image exists is recorded, also those finished after a failure or Ctrl-C
        late = [f.result() for f in futures[len(done):] if f.done() and not f.cancelled() and f.exception() is None]
        # on a failure no summary follows: the keys not yet printed are printed now
        _record(record, done + late, print_rows=[] if finished else (done + late if as_json else late))
    return done, record


def _check_record(record: Path) -> None:
    from . import record as rec

    rec.preflight(record)


def _record(record: Path, stamped: list, print_rows: list) -> None:
    from . import record as rec

    def row(s) -> dict[str, str]:
        return {"unit": s.unit.unit, "hostname": s.unit.hostname, "node_public_key": s.node_public_key,
                "image": str(s.image), "stamped_at": rec.now(), rec.STATUS: rec.OK}

    rows = [row(s) for s in stamped]
    outcome = rec.append(record, rows)
    if outcome.fallback:
        err.print(f"[red]error:[/red] the record could not be written ({outcome.reason}); the units' public "
                  f"keys are in {outcome.path} and below", highlight=False, soft_wrap=True)
        print_rows = stamped
    if print_rows:
        print(rec.rows_text([row(s) for s in print_rows]), end="", flush=True)
