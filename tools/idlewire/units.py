"""Unit files: what makes one unit (one card, one node) different from every other.

Two formats hold the same fields:

- `unit.yml`, one unit::

      unit: shop-0001                 # required: letters, digits, '.', '_', '-' (at most 64)
      hostname: iw-0001               # default: the unit id, when it is a valid hostname
      ssh_authorized_keys: ["ssh-ed25519 AAAA… vendor@desk"]
      wifi: {country: DE, ssid: "Cafe Luna", psk: "correct horse", hidden: false}
      payout_address: "bc1q…"
      caps: {up_mbit: 20, down_mbit: 100, monthly_gb: 500, max_sessions: 8}
      node_key: keys/shop-0001.key    # ed25519 private key (PEM, OpenSSH or base64); generated when absent

- `units.csv`, one row per unit, a header row naming the columns (any order, unknown columns are
  refused, an empty cell means "not set"): ``unit, hostname, ssh_authorized_keys`` (several keys
  separated by ';'), ``wifi_country, wifi_ssid, wifi_psk, wifi_hidden`` (true/false),
  ``payout_address, caps_up_mbit, caps_down_mbit, caps_monthly_gb, caps_max_sessions, node_key``.

Relative `node_key` paths are taken from the unit file's directory. Every complaint names the
file, the row (CSV) and the field, and says what is expected.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import _HOSTNAME_RE, _KEY_RE, _load_yaml
from .errors import UserError

_UNIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_COUNTRY_RE = re.compile(r"^[A-Z]{2}$")
_HEX64_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_PAYOUT_RE = re.compile(r"^[A-Za-z0-9:._@+-]{4,128}$")

CAPS = {"up_mbit": float, "down_mbit": float, "monthly_gb": int, "max_sessions": int}
CAPS_BELOW = {"up_mbit": 100_000, "down_mbit": 100_000, "monthly_gb": 10**9, "max_sessions": 3841}
CSV_COLUMNS = ("unit", "hostname", "ssh_authorized_keys", "wifi_country", "wifi_ssid", "wifi_psk",
               "wifi_hidden", "payout_address", "caps_up_mbit", "caps_down_mbit", "caps_monthly_gb",
               "caps_max_sessions", "node_key")
YAML_FIELDS = {"unit", "hostname", "ssh_authorized_keys", "wifi", "payout_address", "caps", "node_key"}


@dataclass(frozen=True)
class Wifi:
    country: str
    ssid: str
    psk_hash: str  # 64 hex digits: WPA-PSK derived from the passphrase (the passphrase never lands)
    hidden: bool = False


@dataclass(frozen=True)
class Unit:
    unit: str
    hostname: str
    ssh_authorized_keys: tuple[str, ...] = ()
    wifi: Wifi | None = None
    payout_address: str | None = None
    caps: dict[str, float | int] = field(default_factory=dict)
    node_key_pem: bytes | None = None  # the given key; None: generated at stamping
    source: str = ""  # "units.csv row 3" — for messages


def wpa_psk(ssid: str, passphrase: str) -> str:
    """The 256-bit WPA pre-shared key, as wpa_passphrase computes it."""
    return hashlib.pbkdf2_hmac("sha1", passphrase.encode(), ssid.encode(), 4096, 32).hex()


class _Where:
    def __init__(self, where: str):
        self.where = where

    def fail(self, fld: str, msg: str) -> UserError:
        return UserError(f"{self.where}: field '{fld}': {msg}")


def _build(raw: dict[str, Any], w: _Where, base: Path) -> Unit:
    unit = raw.get("unit")
    if unit is None or unit == "":
        raise w.fail("unit", "missing; expected a unit id such as shop-0001")
    unit = str(unit)
    if not _UNIT_RE.match(unit):
        raise w.fail("unit", f"expected letters, digits, '.', '_' or '-' (at most 64), got {unit!r}")
    hostname = raw.get("hostname")
    if hostname in (None, ""):
        hostname = unit.lower().replace("_", "-").replace(".", "-")
        if not _HOSTNAME_RE.match(hostname):
            raise w.fail("hostname", f"missing and the unit id {unit!r} is not a valid hostname; "
                         "set hostname (lowercase letters, digits, '-')")
    elif not isinstance(hostname, str) or not _HOSTNAME_RE.match(hostname):
        raise w.fail("hostname", f"expected lowercase letters, digits and '-' (at most 63), got {hostname!r}")

    keys = raw.get("ssh_authorized_keys") or []
    if not isinstance(keys, list):
        raise w.fail("ssh_authorized_keys", f"expected a list of OpenSSH public key lines, got {keys!r}")
    for i, k in enumerate(keys):
        if not isinstance(k, str) or not _KEY_RE.match(k.strip()) or "\n" in k.strip():
            raise w.fail(f"ssh_authorized_keys[{i}]", "expected an OpenSSH public key line such as "
                         f"'ssh-ed25519 AAAA… you@host', got {str(k)[:40]!r}")

    wifi = None
    wraw = raw.get("wifi")
    if wraw not in (None, {}):
        if not isinstance(wraw, dict):
            raise w.fail("wifi", "expected a mapping with country, ssid, psk")
        extra = sorted(set(wraw) - {"country", "ssid", "psk", "hidden"})
        if extra:
            raise w.fail(f"wifi.{extra[0]}", "unknown setting; known ones are country, ssid, psk, hidden")
        country, ssid, psk = wraw.get("country"), wraw.get("ssid"), wraw.get("psk")
        if not isinstance(ssid, str) or not ssid or len(ssid.encode()) > 32 or any(ord(c) < 32 for c in ssid):
            raise w.fail("wifi.ssid", f"expected a network name of 1-32 bytes, got {ssid!r}")
        if not isinstance(country, str) or not _COUNTRY_RE.match(country):
            raise w.fail("wifi.country", f"expected a two-letter ISO 3166 country code such as DE or US "
                         f"(it decides the legal channels), got {country!r}")
        if not isinstance(psk, str):
            raise w.fail("wifi.psk", "missing; expected the WPA passphrase (8-63 characters) or 64 hex digits")
        if _HEX64_RE.match(psk):
            psk_hash = psk.lower()
        elif 8 <= len(psk) <= 63 and all(32 <= ord(c) <= 126 for c in psk):
            psk_hash = wpa_psk(ssid, psk)
        else:
            raise w.fail("wifi.psk", f"expected a WPA passphrase of 8-63 printable ASCII characters "
                         f"or 64 hex digits, got {len(psk)} characters")
        hidden = wraw.get("hidden", False)
        if not isinstance(hidden, bool):
            raise w.fail("wifi.hidden", f"expected true or false, got {hidden!r}")
        wifi = Wifi(country, ssid, psk_hash, hidden)

    payout = raw.get("payout_address")
    if payout in ("", None):
        payout = None
    elif not isinstance(payout, str) or not _PAYOUT_RE.match(payout):
        raise w.fail("payout_address", "expected 4-128 characters of letters, digits and ':._@+-', "
                     f"got {payout!r}")

    caps: dict[str, float | int] = {}
    craw = raw.get("caps") or {}
    if not isinstance(craw, dict):
        raise w.fail("caps", f"expected a mapping with {', '.join(CAPS)}")
    for key, value in craw.items():
        if key not in CAPS:
            raise w.fail(f"caps.{key}", f"unknown cap; known ones are {', '.join(CAPS)}")
        kind = CAPS[key]
        top = CAPS_BELOW[key]  # the agent refuses to start beyond these (idlewire_agent.config)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < top
        if kind is int and ok and value != int(value):
            ok = False
        if not ok:
            what = "a whole number > 0" if kind is int else "a number > 0"
            raise w.fail(f"caps.{key}", f"expected {what} and below {top}, got {value!r}")
        caps[key] = kind(value)

    pem = None
    key_path = raw.get("node_key")
    if key_path not in (None, ""):
        path = base / str(key_path)
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise w.fail("node_key", f"{path}: cannot read: {exc.strerror}; give the path of an ed25519 "
                         "private key (PEM) or leave it out to have one generated") from None
        from .stamp import load_node_key

        try:
            load_node_key(pem)
        except ValueError as exc:
            raise w.fail("node_key", f"{path}: {exc}") from None
    return Unit(unit, hostname, tuple(k.strip() for k in keys), wifi, payout, caps, pem, w.where)


def load_unit(path: Path) -> Unit:
    data = _load_yaml(path, "a mapping of unit settings (unit:, hostname:, …)")
    extra = sorted(set(data) - YAML_FIELDS)
    if extra:
        raise UserError(f"{path}: field '{extra[0]}': unknown setting; known ones are {', '.join(sorted(YAML_FIELDS))}")
    return _build(data, _Where(str(path)), path.parent)


def _csv_bool(value: str, w: _Where, fld: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "yes", "1"):
        return True
    if v in ("false", "no", "0", ""):
        return False
    raise w.fail(fld, f"expected true or false, got {value!r}")


def _csv_number(value: str, w: _Where, fld: str) -> float | int:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise w.fail(fld, f"expected a number, got {value!r}") from None


def load_units(path: Path) -> list[Unit]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read as UTF-8 text: {exc}") from None
    reader = csv.reader(text.splitlines())
    rows = list(reader)
    if not rows:
        raise UserError(f"{path}: empty; expected a header row with the columns {', '.join(CSV_COLUMNS)}")
    header = [h.strip() for h in rows[0]]
    for h in header:
        if h not in CSV_COLUMNS:
            raise UserError(f"{path}: row 1: unknown column {h!r}; known columns are {', '.join(CSV_COLUMNS)}")
    if "unit" not in header:
        raise UserError(f"{path}: row 1: no 'unit' column; the header must name the columns")
    if len(set(header)) != len(header):
        raise UserError(f"{path}: row 1: a column is named twice")
    units: list[Unit] = []
    seen_unit: dict[str, int] = {}
    seen_host: dict[str, int] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        w = _Where(f"{path}: row {n}")
        if len(row) != len(header):
            raise UserError(f"{w.where}: {len(row)} cells, expected {len(header)} (one per column of the header)")
        cells = {h: c.strip() for h, c in zip(header, row, strict=True)}
        raw: dict[str, Any] = {"unit": cells.get("unit"), "hostname": cells.get("hostname") or None,
                               "payout_address": cells.get("payout_address") or None,
                               "node_key": cells.get("node_key") or None}
        if cells.get("ssh_authorized_keys"):
            raw["ssh_authorized_keys"] = [k for k in cells["ssh_authorized_keys"].split(";") if k.strip()]
        wifi_cells = {k: cells.get(f"wifi_{k}", "") for k in ("country", "ssid", "psk", "hidden")}
        if any(wifi_cells[k] for k in ("country", "ssid", "psk")):
            wifi: dict[str, Any] = {k: (v or None) for k, v in wifi_cells.items() if k != "hidden"}
            wifi["hidden"] = _csv_bool(wifi_cells["hidden"], w, "wifi_hidden")
            raw["wifi"] = wifi
        caps = {k: _csv_number(cells[f"caps_{k}"], w, f"caps_{k}") for k in CAPS if cells.get(f"caps_{k}")}
        raw["caps"] = caps
        try:
            unit = _build(raw, w, path.parent)
        except UserError as exc:  # name CSV columns, not YAML paths
            msg = str(exc)
            for a, b in (("'wifi.", "'wifi_"), ("'caps.", "'caps_")):
                msg = msg.replace(a, b)
            raise UserError(msg) from None
        if unit.unit in seen_unit:
            raise w.fail("unit", f"{unit.unit!r} is already used in row {seen_unit[unit.unit]}; unit ids are unique")
        if unit.hostname in seen_host:
            raise w.fail("hostname", f"{unit.hostname!r} is already used in row {seen_host[unit.hostname]}")
        seen_unit[unit.unit], seen_host[unit.hostname] = n, n
        units.append(unit)
    if not units:
        raise UserError(f"{path}: no unit rows below the header")
    return units
