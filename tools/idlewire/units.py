"""Unit files: what makes one unit (one card, one node) different from every other.

Two formats hold the same fields:

- `unit.yml`, one unit::

      unit: shop-0001                 # required: letters, digits, '.', '_', '-' (at most 64)
      hostname: iw-0001               # default: the unit id, when it is a valid hostname
      ssh_authorized_keys: ["ssh-ed25519 AAAA… vendor@desk"]
      wifi: {country: DE, ssid: "Cafe Luna", psk: "correct horse", hidden: false, wpa3: false}
      payout_address: "bc1q…"
      marketplace: https://hub.example   # the hub the unit registers with at first boot
      region: DE                      # the unit's country (ISO 3166-1 alpha-2), for the hub and buyers
      mode: router                    # the unit is the home router (default: node, a host on the LAN)
      wan: pppoe                      # router mode's WAN: dhcp (default) or pppoe, with the ISP's login:
      pppoe: {user: "0123456789@isp.example", password: "…"}   # written 0600 on the unit, never logged
      caps: {up_mbit: 20, down_mbit: 100, monthly_gb: 500, max_sessions: 8}
      node_key: keys/shop-0001.key    # ed25519 private key (PEM, OpenSSH or base64); generated when absent

- `units.csv`, one row per unit, a header row naming the columns (any order, unknown columns are
  refused, an empty cell means "not set"): ``unit, hostname, ssh_authorized_keys`` (several keys
  separated by ';'), ``wifi_country, wifi_ssid, wifi_psk, wifi_hidden, wifi_wpa3`` (true/false),
  ``payout_address, marketplace, region, mode, wan, pppoe_user, pppoe_password, caps_up_mbit,
  caps_down_mbit, caps_monthly_gb, caps_max_sessions, node_key`` (the columns are
  schema.csv_columns()).

Relative `node_key` paths are taken from the unit file's directory. Every complaint names the
file, the row (CSV) and the field, and says what is expected. Every field is checked by its key
in the agent's schema (idlewire_agent.schema.UNIT_INPUT): what passes here, the node applies.
Within a batch, unit ids, hostnames and node keys are unique (the same key file named two ways,
or two files holding one key, are refused naming both rows).
"""

from __future__ import annotations

import csv
import hashlib
import io
import string
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from idlewire_agent import schema
from idlewire_agent.schema import Invalid

from .config import _load_yaml
from .errors import UserError
from .nodekey import load_node_key, raw_private

CAPS = schema.CAPS
CSV_FIELDS = schema.csv_columns()  # column → the unit.yml path it fills
CSV_COLUMNS = tuple(CSV_FIELDS)
YAML_FIELDS = set(schema.UNIT_INPUT)
# The node settings a unit carries as plain text, stamped as given (blank: not stamped, node.toml's
# stands): every text key of unit.toml the host has no rule of its own for. payout_address,
# marketplace, region today; a key added to schema.UNIT and UNIT_INPUT is stamped with no change here.
PLAIN = tuple(k for k, key in schema.UNIT_INPUT.items()
              if k in schema.UNIT and key.kind == schema.STR and k not in ("unit", "hostname"))


@dataclass(frozen=True)
class Wifi:
    country: str
    ssid: str
    psk: str = field(repr=False)  # as given: the passphrase (8-63 characters) or the 64-hex-digit key
    hidden: bool = False
    wpa3: bool = False  # the AP offers WPA3-SAE too: the passphrase is stamped (sae_password)

    @cached_property
    def psk_hash(self) -> str:
        """64 hex digits: the WPA-PSK the card gets (the passphrase never lands). Derived when a unit
        is stamped, not when its file is read: PBKDF2's 4,096 rounds cost ~3 ms, and a batch of
        10,000 rows must not spend 30 s before the first card is written."""
        if len(self.psk) == 64 and all(c in string.hexdigits for c in self.psk):
            return self.psk.lower()
        return wpa_psk(self.ssid, self.psk)


@dataclass(frozen=True)
class Unit:
    unit: str
    hostname: str
    ssh_authorized_keys: tuple[str, ...] = ()
    wifi: Wifi | None = None
    settings: dict[str, str] = field(default_factory=dict)  # PLAIN keys given: {"region": "DE", …}
    caps: dict[str, float | int] = field(default_factory=dict)
    node_key_pem: bytes | None = None  # the given key; None: generated at stamping
    source: str = ""  # "units.csv row 3" — for messages
    node_key_path: str = ""  # the key file, for messages
    pppoe: dict[str, str] | None = field(default=None, repr=False)  # {"user", "password"}: wan = pppoe

    def __getattr__(self, name: str):
        """unit.payout_address, unit.marketplace, unit.region: the value given, None when not given."""
        if name in PLAIN:
            return self.settings.get(name)
        raise AttributeError(name)


def wpa_psk(ssid: str, passphrase: str) -> str:
    """The 256-bit WPA pre-shared key, as wpa_passphrase computes it."""
    return hashlib.pbkdf2_hmac("sha1", passphrase.encode(), ssid.encode(), 4096, 32).hex()


class _Where:
    def __init__(self, where: str):
        self.where = where

    def fail(self, fld: str, msg: str) -> UserError:
        return UserError(f"{self.where}: field '{fld}': {msg}")

    def check(self, key: schema.Key, fld: str, value, item: bool = False):
        """The schema's verdict on one value (the node's, too): the value as applied, or one line."""
        try:
            return key.check_item(value) if item else key.check(value)
        except Invalid as exc:
            got = "a value not shown (a secret)" if key.secret else schema.shown(value)
            raise self.fail(fld, f"expected {exc}, got {got}") from None


def _unknown(w: _Where, data: dict, keys: dict, prefix: str = "") -> None:
    extra = sorted(set(data) - set(keys), key=str)
    if extra:
        raise w.fail(f"{prefix}{extra[0]}", f"unknown setting; known ones are {', '.join(keys)}")


def _blank(v) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _build(raw: dict[str, Any], w: _Where, base: Path) -> Unit:
    keys = schema.UNIT_INPUT
    if _blank(raw.get("unit")):
        raise w.fail("unit", "missing; expected a unit id such as shop-0001")
    unit = w.check(keys["unit"], "unit", raw["unit"])
    hostname = raw.get("hostname")
    if _blank(hostname):
        hostname = unit.lower().replace("_", "-").replace(".", "-")
        try:
            hostname = keys["hostname"].check(hostname)
        except Invalid:
            raise w.fail("hostname", f"missing and the unit id {unit!r} is not a valid hostname; "
                         f"set hostname ({keys['hostname'].expect})") from None
    else:
        hostname = w.check(keys["hostname"], "hostname", hostname)

    ssh = raw.get("ssh_authorized_keys") or []
    if not isinstance(ssh, list):
        raise w.fail("ssh_authorized_keys", f"expected a list of OpenSSH public key lines, got {schema.shown(ssh)}")
    ssh = [w.check(keys["ssh_authorized_keys"], f"ssh_authorized_keys[{i}]", k, item=True) for i, k in enumerate(ssh)]

    wifi = None
    wraw = raw.get("wifi")
    if wraw not in (None, {}):
        wkeys = schema.WIFI_INPUT
        if not isinstance(wraw, dict):
            raise w.fail("wifi", f"expected a mapping with {', '.join(wkeys)}")
        _unknown(w, wraw, wkeys, "wifi.")
        ssid = w.check(wkeys["ssid"], "wifi.ssid", wraw.get("ssid"))
        country = w.check(wkeys["country"], "wifi.country", wraw.get("country"))
        psk = wraw.get("psk")
        if psk is None:
            raise w.fail("wifi.psk", f"missing; expected {wkeys['psk'].expect}")
        if not isinstance(psk, str):
            raise w.fail("wifi.psk", f"expected {wkeys['psk'].expect}, got {schema.shown(psk)} "
                         "(not text: quote it)")
        hex_key = len(psk) == 64 and all(c in string.hexdigits for c in psk)
        if not hex_key and not (8 <= len(psk) <= 63 and all(32 <= ord(c) <= 126 for c in psk)):
            raise w.fail("wifi.psk", f"expected {wkeys['psk'].expect}, got {len(psk)} characters")
        hidden = w.check(wkeys["hidden"], "wifi.hidden", wraw.get("hidden", False))
        wpa3 = w.check(wkeys["wpa3"], "wifi.wpa3", wraw.get("wpa3", False))
        if wpa3 and hex_key:
            raise w.fail("wifi.wpa3", "WPA3-SAE needs the passphrase, not the 64-hex-digit key; give wifi.psk "
                         "as the passphrase or leave wpa3 out")
        if wpa3 and "|" in psk:
            raise w.fail("wifi.psk", f"expected {schema.SAE_EXPECT} with wifi.wpa3 (hostapd reads what follows "
                         "'|' as options), got a passphrase with '|'")
        wifi = Wifi(country, ssid, psk, hidden, wpa3)

    settings = {k: w.check(keys[k], k, raw[k]) for k in PLAIN if not _blank(raw.get(k))}

    caps: dict[str, float | int] = {}
    craw = raw.get("caps") or {}
    if not isinstance(craw, dict):
        raise w.fail("caps", f"expected a mapping with {', '.join(CAPS)}")
    _unknown(w, craw, CAPS, "caps.")
    for key, value in craw.items():
        caps[key] = w.check(CAPS[key], f"caps.{key}", value)

    pppoe = None
    praw = raw.get("pppoe")
    if praw not in (None, {}):
        if not isinstance(praw, dict):
            raise w.fail("pppoe", f"expected a mapping with {', '.join(schema.PPPOE)}")
        _unknown(w, praw, schema.PPPOE, "pppoe.")
        pppoe = {k: w.check(schema.PPPOE[k], f"pppoe.{k}", praw[k]) for k in schema.PPPOE if k in praw}
    for problem in schema.pppoe_problems({"wan": settings.get("wan"), "pppoe": pppoe or {}}):
        fld, _, msg = problem.partition(": ")
        raise w.fail(fld, msg)

    pem = None
    key_path = raw.get("node_key")
    if not _blank(key_path):
        path = base / str(key_path).strip()
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise w.fail("node_key", f"{path}: cannot read: {exc.strerror}; give the path of an ed25519 "
                         "private key (PEM) or leave it out to have one generated") from None
        try:
            load_node_key(pem)
        except ValueError as exc:
            raise w.fail("node_key", f"{path}: {exc}") from None
        key_path = str(path)
    return Unit(unit, hostname, tuple(ssh), wifi, settings, caps, pem, w.where, key_path or "", pppoe)


def load_unit(path: Path) -> Unit:
    data = _load_yaml(path, "a mapping of unit settings (unit:, hostname:, …)")
    w = _Where(str(path))
    _unknown(w, data, schema.UNIT_INPUT)
    return _build(data, w, path.parent)


def _cells_to_raw(cells: dict[str, str], w: _Where) -> dict[str, Any]:
    """A CSV row as the mapping a unit.yml would give (each cell read by its key's from_text)."""
    raw: dict[str, Any] = {}
    for col, cell in cells.items():
        if not cell.strip():
            continue
        where = CSV_FIELDS[col]
        key = schema.UNIT_INPUT[where[0]]
        if len(where) == 2:
            key = (key.keys or {})[where[1]]
        if key.kind == schema.STR:  # text as written (a passphrase, a key path); others by their kind
            value: Any = cell
        else:
            try:
                value = key.from_text(cell)
            except Invalid as exc:
                raise w.fail(col, f"expected {exc}, got {schema.shown(cell)}") from None
        if len(where) == 2:
            raw.setdefault(where[0], {})[where[1]] = value
        else:
            raw[where[0]] = value
    if "wifi" in raw and not any(k in raw["wifi"] for k in ("country", "ssid", "psk")):
        del raw["wifi"]  # wifi_hidden alone: no Wi-Fi
    return raw


def load_units(path: Path) -> list[Unit]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the "
                        "spreadsheet as CSV UTF-8") from None
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))  # not splitlines(): U+2028 is no row end
    except csv.Error as exc:
        raise UserError(f"{path}: not a CSV file: {exc}") from None
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
    seen: dict[str, dict[Any, int]] = {"unit": {}, "hostname": {}, "node_key": {}}
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        w = _Where(f"{path}: row {n}")
        if len(row) != len(header):
            raise UserError(f"{w.where}: {len(row)} cells, expected {len(header)} (one per column of the header)")
        raw = _cells_to_raw(dict(zip(header, row, strict=True)), w)
        try:
            unit = _build(raw, w, path.parent)
        except UserError as exc:  # name CSV columns, not YAML paths
            msg = str(exc)
            for a, b in (("'wifi.", "'wifi_"), ("'caps.", "'caps_")):
                msg = msg.replace(a, b)
            raise UserError(msg) from None
        facts = {"unit": unit.unit, "hostname": unit.hostname}
        if unit.node_key_pem:
            facts["node_key"] = raw_private(unit.node_key_pem)
        for fld, value in facts.items():
            if value in seen[fld]:
                first = seen[fld][value]
                what = ("the same node key as" if fld == "node_key" else f"{value!r} is already used in")
                raise w.fail(fld, f"{what} row {first}" + (
                    f" ({unit.node_key_path}; the same file or the same key named two ways): two units "
                    "would share one identity; give each unit its own key or leave node_key empty"
                    if fld == "node_key" else ("; unit ids are unique" if fld == "unit" else "")))
            seen[fld][value] = n
        units.append(unit)
    if not units:
        raise UserError(f"{path}: no unit rows below the header")
    return units
