"""What the host accepts, the node applies: the one schema seen from both sides, by hypothesis.

(a) the same unit field, valid or not, given to the host (units.py from unit.yml and units.csv,
    then stamp_toml) and to the node (stamp.toml as consume-stamp checks it, unit.toml as the
    agent loads it): the same verdict, and the same value when accepted;
(b) whole units: refused by the host in one line naming the unit file and the field, or stamped
    (stamp_toml), consumed by the real `consume-stamp` code into a temporary root and loaded by
    the agent's config loader, which holds exactly what the host took.

Values include control characters, U+2028/U+2029, lone surrogates, BOMs, trailing newlines (a
YAML folded scalar), non-UTF-8 bytes and the extremes of every number. Each test prints how many
cases it ran (`pytest -rP tests/unit/test_schema_contract.py` shows them).
"""

from __future__ import annotations

import csv
import io
import math
import re
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from idlewire import stamp as host_stamp
from idlewire.errors import UserError
from idlewire.units import load_unit, load_units
from idlewire_agent import config, schema
from idlewire_agent.consume import consume

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICCwTJHb49C0zwb8vi6tjbdXa2mX9kiOu2khkhPP5LMu vendor@desk"
PUB = "Ct3jL6k0fVq0i5t8Y2TrWNqZ3Ku6l9Pl0lqZ3Kx7mX0="
EXAMPLES = 250


class Raw(bytes):
    """Bytes that are not UTF-8, put into the file as they are (a spreadsheet saved as Latin-1)."""


NASTY = ["\n", "\r\n", "\r", "\t", " ", "\x00", "\x1b", "\x7f", "\x85", "\x9f", "\u2028", "\u2029", "\ud800",
         "\udfff", "\ufeff", "\u200b", "\u202e", "\u00e9", "\U0001f600", "\\", '"', "'", ";", ",", "#", "=", "[",
         "é"]


def texts(good: list[str]) -> st.SearchStrategy:
    nasty = st.sampled_from(NASTY)
    base = st.sampled_from(good)
    return st.one_of(
        base,
        st.builds(lambda g, n: g + n, base, nasty),  # trailing newline, separator, …
        st.builds(lambda n, g: n + g, nasty, base),
        st.builds(lambda g, n, i: g[:i] + n + g[i:], base, nasty, st.integers(0, 8)),
        base.map(str.upper), base.map(lambda g: g * 9),
        st.text(max_size=12),
        st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=6),
        st.builds(lambda g: Raw(g.encode()[:2] + b"\xff\xfe" + g.encode()[2:]), base),
        st.integers(-10, 10**6), st.booleans(), st.none(),
    )


NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70), st.integers(-5, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1, max_value=200_000),
    st.sampled_from([0, 0.0, -0.0, 0.01, 0.00999, 0.5, 8.0, 8.5, 99_999, 99_999.0001, 100_000, 1e9, 1e9 + 1,
                     3840, 3841, 1, 5e-324, 1.7976931348623157e308, math.inf, -math.inf, math.nan, 2**63, -(2**63)]),
    st.booleans(), st.sampled_from(["8", "", "1e3", "fast"]), st.none(),
)

FIELDS: dict[str, st.SearchStrategy] = {
    "unit": texts(["shop-0001", "Shop_01.a", "a", "x" * 64]),
    "hostname": texts(["iw-0001", "IW-01", "a", "x" * 63, "-bad", "a_b"]),
    "payout_address": texts(["bc1qexample", "addr:x@y+z", "abcd", "abc"]),
    "marketplace": texts(["https://hub.example", "http://10.0.0.1:8080/api", "hub.example", "ftp://x", "https://"]),
    "region": texts(["DE", "de", "gb", "UK", "XK", "DEU", "unset", "eu-west"]),
    "mode": texts(["router", "node", "Router", "bridge", "routers"]),
    "ssh_authorized_keys": texts([KEY, "ssh-rsa AAAA x", "nope"]),
    "wifi.country": texts(["DE", "de", "US", "DEU"]),
    "wifi.ssid": texts(["Cafe Luna", "x", "é" * 16, "a" * 32, "a" * 33]),
    "wifi.hidden": st.one_of(st.booleans(), st.sampled_from(["yes", "true", 1, 0, None]), st.integers(),
                             st.floats(), st.text(max_size=5)),
    "caps.up_mbit": NUMBERS,
    "caps.down_mbit": NUMBERS,
    "caps.monthly_gb": NUMBERS,
    "caps.max_sessions": NUMBERS,
}
WIFI_OK = {"country": "DE", "ssid": "net", "psk": "password1"}
COUNTS: dict[str, int] = {}


# --- writing one value into each format ------------------------------------------------------------

MARK = "@@RAW@@"


def _placeholder(v):
    return MARK if isinstance(v, Raw) else v


def _with_raw(text: str, v) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return data.replace(MARK.encode(), bytes(v)) if isinstance(v, Raw) else data


def host_input(field: str, v) -> dict:
    d: dict = {"unit": "u1", "hostname": "h1"}
    if field.startswith("wifi."):
        d["wifi"] = {**WIFI_OK, field[5:]: _placeholder(v)}
    elif field.startswith("caps."):
        d["caps"] = {field[5:]: _placeholder(v)}
    elif field == "ssh_authorized_keys":
        d[field] = [_placeholder(v)]
    else:
        d[field] = _placeholder(v)
    return d


def host_value(u, field: str):
    if field.startswith("wifi."):
        return getattr(u.wifi, field[5:])
    if field.startswith("caps."):
        return u.caps.get(field[5:])
    if field == "ssh_authorized_keys":
        return u.ssh_authorized_keys[0]
    return getattr(u, field)


def host_verdict(tmp: Path, data: bytes, kind: str, field: str):
    """(accepted, value as stamped) from unit.yml or units.csv, through stamp_toml."""
    p = tmp / f"unit.{kind}"
    p.write_bytes(data)
    try:
        u = load_unit(p) if kind == "yml" else load_units(p)[0]
        host_stamp.stamp_toml(u, PUB)
    except UserError as exc:
        msg = str(exc)
        assert "\n" not in msg and str(p) in msg, msg
        return False, None
    return True, host_value(u, field)


def yaml_bytes(field: str, v) -> bytes:
    return _with_raw(yaml.safe_dump(host_input(field, v), allow_unicode=True), v)


def as_yaml_reads_it(data: bytes, field: str, v):
    """The value the YAML file holds, as a YAML parser reads it back (v itself when it cannot)."""
    try:
        d = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return v
    if field.startswith(("wifi.", "caps.")):
        table, key = field.split(".")
        return d[table][key]
    return d[field][0] if field == "ssh_authorized_keys" else d[field]


def csv_bytes(field: str, v) -> bytes | None:
    """The row a spreadsheet would hold, or None when a cell cannot say it (a number as text…)."""
    numeric = field.startswith("caps.")
    if field == "wifi.hidden":  # a cell holds text: true/false is how a spreadsheet says a boolean
        if not isinstance(v, bool):
            return None
        v = "true" if v else "false"
    elif isinstance(v, bool) or v is None or (isinstance(v, str) and not v.strip()):
        return None  # a blank cell is "not set" in a spreadsheet
    if numeric != isinstance(v, int | float) and not isinstance(v, Raw):
        return None
    if numeric and isinstance(v, Raw):
        return None
    d = host_input(field, v)
    row = {"unit": d["unit"], "hostname": d["hostname"]}
    for k, val in (d.get("wifi") or {}).items():
        row[f"wifi_{k}"] = val
    for k, val in (d.get("caps") or {}).items():
        row[f"caps_{k}"] = repr(val) if isinstance(val, float) else str(val)
    if "ssh_authorized_keys" in d:
        if ";" in str(v):
            return None  # ';' separates keys in a cell
        row["ssh_authorized_keys"] = d["ssh_authorized_keys"][0]
    for plain in ("payout_address", "marketplace", "region", "mode"):
        if plain in d:
            row[plain] = d[plain]
    if "unit" in field:
        row["unit"] = d["unit"]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(row), lineterminator="\r\n")
    w.writeheader()
    w.writerow(row)
    return _with_raw(buf.getvalue(), v)


def toml_value(v) -> str:
    if isinstance(v, Raw):
        return '"' + MARK + '"'
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in v):
        return '"' + "".join(f"\\u{ord(c):04X}" if 0xD800 <= ord(c) <= 0xDFFF else c for c in v) + '"'
    return schema.dump_value(v)


def node_verdict(field: str, v):
    """(accepted, value as applied) by the node: stamp.toml as consume-stamp checks it, and the
    unit.toml part as the agent loads it."""
    if v is None:
        return None
    head = {"format": 1, "unit": "u1", "hostname": "h1", "node_public_key": PUB}
    lines = [f"{k} = {schema.dump_value(x)}" for k, x in head.items() if k != field]
    table = None
    if field.startswith(("wifi.", "caps.")):
        table, key = field.split(".")
        rest = {"country": "DE", "ssid": "net", "psk_hash": "0" * 64} if table == "wifi" else {}
        rest.pop(key, None)
        lines += ["", f"[{table}]"] + [f"{k} = {schema.dump_value(x)}" for k, x in rest.items()]
        lines.append(f"{key} = {toml_value(v)}")
    elif field == "ssh_authorized_keys":
        lines.insert(0, f"{field} = [{toml_value(v)}]")
    else:
        lines.insert(0, f"{field} = {toml_value(v)}")
    data = _with_raw("\n".join(lines) + "\n", v)
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False, None
    values, problems = schema.check_stamp(parsed)
    unit, unit_problems = config.parse_unit({k: x for k, x in parsed.items() if k in schema.UNIT})
    if problems or unit_problems:
        return False, None
    if table:
        return True, values[table][field.split(".")[1]]
    if field == "ssh_authorized_keys":
        return True, values[field][0]
    assert getattr(unit, field) == values[field]
    return True, values[field]


def _blank_means_unset(field: str, v) -> bool:
    """unit.yml/units.csv leave a blank hostname to the default (from the unit id); the stamp
    always carries one. Blank there is "not set", not a value to compare."""
    return field in ("hostname", "payout_address", "marketplace", "region", "mode") and (
        v is None or (isinstance(v, str) and not v.strip()))


@pytest.mark.parametrize("field", list(FIELDS))
def test_host_and_node_give_the_same_verdict_for_every_field(field):
    seen = {"cases": 0, "accepted": 0, "csv": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(FIELDS[field])
    def check(v):
        if _blank_means_unset(field, v):
            return
        seen["cases"] += 1
        ydata = yaml_bytes(field, v)
        yv = as_yaml_reads_it(ydata, field, v)  # YAML folds NEL/U+2028 inside a scalar to a space
        node = node_verdict(field, yv)
        with tempfile.TemporaryDirectory() as tmp:
            host = host_verdict(Path(tmp), ydata, "yml", field)
            if node is None:  # a YAML null: "not set" on the host
                return
            assert host == node or (host[0] and node[0] and host[1] == node[1]), (field, v, yv, host, node)
            node = node_verdict(field, v)
            row = csv_bytes(field, v)
            if row is not None:
                seen["csv"] += 1
                host_csv = host_verdict(Path(tmp), row, "csv", field)
                assert host_csv[0] == node[0] and host_csv[1] == node[1], (field, v, host_csv, node)
        seen["accepted"] += host[0]

    check()
    COUNTS[f"same verdict: {field}"] = seen["cases"]
    print(f"{field}: {seen['cases']} generated values (csv {seen['csv']}), {seen['accepted']} accepted by both")
    assert seen["cases"] >= EXAMPLES // 2 and 0 < seen["accepted"] < seen["cases"], seen


def edged(good: list[str]) -> st.SearchStrategy:
    """Valid values as people type them: a trailing newline (YAML folded scalar), spaces, any case."""
    edge = st.sampled_from(["", "\n", " ", "\t", "\r\n", "\u2028", "\x85", "\n\n"])
    return st.builds(lambda e1, g, e2: e1 + g + e2, edge, st.sampled_from(good), edge)


RATES = st.one_of(st.sampled_from([0.01, 0.5, 20, 99_999, 99_998.99]), st.floats(0.01, 99_999))
VALID: dict[str, st.SearchStrategy] = {
    "unit": edged(["shop-0001", "Shop_01.a", "x" * 64, "9"]),
    "hostname": edged(["iw-0001", "IW-01", "x" * 63, "a"]),
    "payout_address": edged(["bc1qexample", "addr:x@y+z", "abcd"]),
    "marketplace": edged(["https://hub.example", "http://192.0.2.1:8080/v1"]),
    "region": edged(["DE", "us", "Gb"]),
    "mode": edged(["router", "node"]),
    "ssh_authorized_keys": edged([KEY, KEY.replace("vendor@desk", "é ü \u00a0x")]),
    "wifi.country": edged(["DE", "us"]),
    "wifi.ssid": st.one_of(edged(["Cafe Luna", "é" * 16, "a" * 32]),
                           st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), min_size=1,
                                   max_size=32).filter(str.strip)),
    "wifi.hidden": st.booleans(),
    "caps.up_mbit": RATES, "caps.down_mbit": RATES,
    "caps.monthly_gb": st.one_of(st.sampled_from([0, 0.0, -0.0, 1e9, 1_000_000_000]), st.floats(0, 1e9),
                                 st.integers(0, 10**9)),
    "caps.max_sessions": st.one_of(st.sampled_from([1, 3840, 8.0]), st.integers(1, 3840)),
}
UNITS = st.one_of(
    st.fixed_dictionaries({"unit": VALID["unit"]}, optional={k: v for k, v in VALID.items() if k != "unit"}),
    st.fixed_dictionaries({"unit": st.one_of(st.just("shop-0001"), FIELDS["unit"])},
                          optional={k: v for k, v in FIELDS.items() if k != "unit"}),
)


def unit_yml(d: dict) -> tuple[dict, object]:
    out: dict = {}
    raw = None
    for k, v in d.items():
        if isinstance(v, Raw):
            raw = v
        if k.startswith("wifi."):
            out.setdefault("wifi", dict(WIFI_OK))[k[5:]] = _placeholder(v)
        elif k.startswith("caps."):
            out.setdefault("caps", {})[k[5:]] = _placeholder(v)
        elif k == "ssh_authorized_keys":
            out[k] = [_placeholder(v)]
        else:
            out[k] = _placeholder(v)
    return out, raw


def test_what_the_host_stamps_the_node_applies_exactly():
    seen = {"cases": 0, "refused": 0, "applied": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(UNITS)
    def check(d):
        seen["cases"] += 1
        data, raw = unit_yml(d)
        text = yaml.safe_dump(data, allow_unicode=True)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            src = tmp / "unit.yml"
            src.write_bytes(text.encode("utf-8", "surrogatepass").replace(MARK.encode(), bytes(raw or b"")))
            try:
                unit = load_unit(src)
            except UserError as exc:  # refused: one line naming the unit (its file) and the field
                msg = str(exc)
                if raw is not None and msg.startswith(f"{src}:") and "not UTF-8 text" in msg:
                    seen["refused"] += 1  # the file, not one field: it cannot be read as text
                    return
                named = re.search(r"^(.*?): field '([^']+)'", msg)
                assert "\n" not in msg and named and named[1] == str(src), msg
                field = re.sub(r"\[\d+\]$", "", named[2])
                assert field in d or (field == "hostname" and "the unit id" in msg), (msg, d)
                seen["refused"] += 1
                return
            pem, pub = host_stamp.node_key(unit)
            stamp = host_stamp.stamp_toml(unit, pub)  # what units.py took, the stamp's own check takes
            boot, root = tmp / "boot", tmp / "root"
            (boot / "idlewire").mkdir(parents=True)
            (boot / "idlewire" / "stamp.toml").write_bytes(stamp)
            (boot / "idlewire" / "node.key").write_bytes(pem)
            (root / "etc").mkdir(parents=True)
            assert consume(str(boot), str(root), "root") == 0, stamp
            assert sorted(p.name for p in (boot / "idlewire").iterdir()) == ["stamp.done"]
            node = tmp / "node.toml"
            node.write_text(f'[node]\nunit_file = "{root}/etc/idlewire/unit.toml"\n')
            cfg = config.load(node)
            u = cfg.unit
            assert (u.unit, u.hostname, u.node_public_key, u.payout_address) == (
                unit.unit, unit.hostname, pub, unit.payout_address or "")
            # the market facts: stamped when given, and then in force over node.toml's (which has none here)
            assert (u.marketplace, u.region) == (unit.marketplace, unit.region)
            assert (cfg.marketplace, cfg.region) == (unit.marketplace or "", unit.region or "")
            assert u.caps == unit.caps and all(type(u.caps[k]) is type(unit.caps[k]) for k in unit.caps)
            assert (root / "etc" / "hostname").read_text() == unit.hostname + "\n"
            if unit.wifi:
                wpa = (root / "etc" / "wpa_supplicant" / "wpa_supplicant-wlan0.conf").read_text().splitlines()
                assert f"    ssid={unit.wifi.ssid.encode().hex()}" in wpa and f"country={unit.wifi.country}" in wpa
                assert f"    psk={unit.wifi.psk_hash}" in wpa and ("    scan_ssid=1" in wpa) == unit.wifi.hidden
            if unit.ssh_authorized_keys:
                ak = (root / "root" / ".ssh" / "authorized_keys").read_text().splitlines()
                assert ak == list(unit.ssh_authorized_keys)
            seen["applied"] += 1

    check()
    COUNTS["stamp -> consume-stamp -> agent"] = seen["cases"]
    print(f"stamp -> consume-stamp -> agent config: {seen['cases']} generated units, {seen['refused']} refused "
          f"by the host in one line, {seen['applied']} applied exactly by the node")
    assert seen["cases"] >= EXAMPLES // 2 and seen["refused"] and seen["applied"], seen
