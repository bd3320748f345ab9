"""Unit files (unit.yml, units.csv): every field validated, every complaint one line naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from idlewire.errors import UserError
from idlewire.units import load_unit, load_units, wpa_psk

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICCwTJHb49C0zwb8vi6tjbdXa2mX9kiOu2khkhPP5LMu vendor@desk"


def test_wpa_psk_matches_the_ieee_test_vector():
    # IEEE 802.11i-2004, H.4.2: passphrase "password", SSID "IEEE"
    assert wpa_psk("IEEE", "password") == "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"


def test_full_unit_yml(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())
    (tmp_path / "k.pem").write_bytes(pem)
    p = tmp_path / "unit.yml"
    p.write_text(f"""unit: Shop_0001
hostname: iw-0001
ssh_authorized_keys: ["{KEY}"]
wifi: {{country: DE, ssid: "Café Luna", psk: "correct horse", hidden: true}}
payout_address: bc1qexample
caps: {{up_mbit: 20, down_mbit: 100.5, monthly_gb: 500, max_sessions: 8}}
node_key: k.pem
""")
    u = load_unit(p)
    assert u.unit == "Shop_0001" and u.hostname == "iw-0001" and u.ssh_authorized_keys == (KEY,)
    assert u.wifi and u.wifi.hidden and u.wifi.psk_hash == wpa_psk("Café Luna", "correct horse")
    assert u.caps == {"up_mbit": 20.0, "down_mbit": 100.5, "monthly_gb": 500, "max_sessions": 8}
    assert u.node_key_pem == pem


def test_hostname_defaults_to_the_unit_id(tmp_path):
    p = tmp_path / "u.yml"
    p.write_text("unit: shop-7\n")
    assert load_unit(p).hostname == "shop-7"


@pytest.mark.parametrize(("body", "field"), [
    ("hostname: x\n", "unit"),
    ("unit: 'bad id!'\n", "unit"),
    ("unit: a\nhostname: Bad_Host\n", "hostname"),
    ("unit: a\nssh_authorized_keys: [nope]\n", "ssh_authorized_keys[0]"),
    ("unit: a\nwifi: {country: deu, ssid: x, psk: '12345678'}\n", "wifi.country"),
    ("unit: a\nwifi: {country: de, ssid: x, psk: 12345678}\n", "wifi.psk"),  # a number: quote it
    ("unit: a\nwifi: {country: DE, ssid: x, psk: short}\n", "wifi.psk"),
    ("unit: a\nwifi: {country: DE, ssid: '', psk: 12345678}\n", "wifi.ssid"),
    ("unit: a\nwifi: {country: DE, ssid: x, psk: '12345678', hidden: maybe}\n", "wifi.hidden"),
    ("unit: a\nwifi: {country: DE, ssid: x, pass: '12345678'}\n", "wifi.pass"),
    ("unit: a\npayout_address: 'a b'\n", "payout_address"),
    ("unit: a\ncaps: {monthly_gb: -1}\n", "caps.monthly_gb"),
    ("unit: a\ncaps: {max_sessions: 1.5}\n", "caps.max_sessions"),
    ("unit: a\ncaps: {up_mbit: -1}\n", "caps.up_mbit"),
    ("unit: a\ncaps: {speed: 1}\n", "caps.speed"),
    ("unit: a\ncaps: {max_sessions: 5000}\n", "caps.max_sessions"),  # the agent would refuse it at boot
    ("unit: a\nnode_key: missing.pem\n", "node_key"),
    ("unit: a\ncolour: red\n", "colour"),
])
def test_bad_unit_yml_names_file_and_field(tmp_path, body, field):
    p = tmp_path / "unit.yml"
    p.write_text(body)
    with pytest.raises(UserError) as e:
        load_unit(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and f"'{field}'" in msg, msg


def test_node_key_must_be_ed25519(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(tmp_path / "k")], check=True)
    p = tmp_path / "u.yml"
    p.write_text("unit: a\nnode_key: k\n")
    with pytest.raises(UserError, match="expected an ed25519 key"):
        load_unit(p)


def test_units_csv(tmp_path):
    p = tmp_path / "units.csv"
    p.write_text("unit,hostname,ssh_authorized_keys,wifi_country,wifi_ssid,wifi_psk,caps_monthly_gb\n"
                 f"a1,,{KEY};{KEY.replace('vendor', 'other')},DE,net,12345678,300\n"
                 "a2,host-2,,,,,\n\n")
    units = load_units(p)
    assert [u.unit for u in units] == ["a1", "a2"]
    assert len(units[0].ssh_authorized_keys) == 2 and units[0].caps == {"monthly_gb": 300}
    assert units[0].wifi and units[1].wifi is None and units[1].hostname == "host-2"


@pytest.mark.parametrize(("text", "where"), [
    ("unit,colour\na,red\n", "row 1: unknown column 'colour'"),
    ("hostname\nx\n", "row 1: no 'unit' column"),
    ("unit,hostname\na,x\nb,x\n", "row 3: field 'hostname'"),
    ("unit\na\na\n", "row 3: field 'unit'"),
    ("unit,wifi_country,wifi_ssid,wifi_psk\na,DE,net,short\n", "row 2: field 'wifi_psk'"),
    ("unit,caps_up_mbit\na,fast\n", "row 2: field 'caps_up_mbit'"),
    ("unit,hostname\na\n", "row 2: 1 cells"),
    ("unit\n", "no unit rows"),
])
def test_bad_units_csv_names_row_and_column(tmp_path, text, where):
    p = tmp_path / "units.csv"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        load_units(p)
    assert where in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_bad_unit_is_one_line_exit_2(tmp_path):
    img = tmp_path / "x.img"
    img.write_bytes(b"")
    u = tmp_path / "u.yml"
    u.write_text("unit: a\nwifi: {country: DE, ssid: x, psk: short}\n")
    res = subprocess.run([sys.executable, "-m", "idlewire", "stamp", str(img), "--unit", str(u)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and "wifi.psk" in res.stderr and "Traceback" not in res.stderr


def test_node_key_in_the_agent_format(tmp_path):
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    raw = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                     serialization.NoEncryption())
    (tmp_path / "node.key").write_bytes(base64.b64encode(raw) + b"\n")
    p = tmp_path / "u.yml"
    p.write_text("unit: a\nnode_key: node.key\n")
    from idlewire.stamp import node_key

    assert node_key(load_unit(p))[0].strip() == base64.b64encode(raw)


def _key(tmp_path, name: str, fmt: str = "pem", raw: bytes | None = None) -> bytes:
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(raw) if raw else Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    data = (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()) if fmt == "pem" else base64.b64encode(raw) + b"\n")
    (tmp_path / name).write_bytes(data)
    return raw


@pytest.mark.parametrize("second", ["keys/a.pem", "./keys/../keys/a.pem", "link.pem", "copy.key"])
def test_one_node_key_for_two_rows_is_refused_naming_both(tmp_path, second):
    """Two units with one identity: the same file, the same file named two ways (a path, a link),
    or the same key in another file and format."""
    (tmp_path / "keys").mkdir()
    raw = _key(tmp_path, "keys/a.pem")
    (tmp_path / "link.pem").symlink_to(tmp_path / "keys" / "a.pem")
    _key(tmp_path, "copy.key", "b64", raw)
    _key(tmp_path, "keys/b.pem")
    p = tmp_path / "units.csv"
    p.write_text(f"unit,node_key\nu1,keys/a.pem\nu2,keys/b.pem\nu3,{second}\n")
    with pytest.raises(UserError) as e:
        load_units(p)
    msg = str(e.value)
    assert "\n" not in msg and f"{p}: row 4: field 'node_key': the same node key as row 2" in msg, msg
    p.write_text("unit,node_key\nu1,keys/a.pem\nu2,keys/b.pem\nu3,\n")  # empty: generated, unique
    assert [u.unit for u in load_units(p)] == ["u1", "u2", "u3"]


@pytest.mark.parametrize("name", ["unit.yml", "units.csv"])
@pytest.mark.parametrize(("data", "ok"), [
    (b"\xef\xbb\xbf", True),  # a byte-order mark (spreadsheets and Windows editors write one): not content
    (b"\xff\xfe", False),  # UTF-16 / Latin-1 exports
    (b"", True),
])
def test_encodings_one_line_no_traceback(tmp_path, name, data, ok):
    p = tmp_path / name
    body = "unit: caf\xe9-1\n" if name == "unit.yml" else "unit,hostname\ncaf\xe9-1,h1\n"
    text = body.encode("latin-1") if data == b"\xff\xfe" else data + body.replace("\xe9", "e").encode()
    p.write_bytes(text)
    if ok:
        units = [load_unit(p)] if name == "unit.yml" else load_units(p)
        assert units[0].unit == "cafe-1"
        return
    r = subprocess.run([sys.executable, "-m", "idlewire", "stamp", str(tmp_path / "x.img"),
                        "--unit" if name == "unit.yml" else "--units", str(p)],
                       capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(p) in lines[0] and "not UTF-8 text (byte 0xe9)" in lines[0], lines


def test_stamp_refuses_what_the_node_would_refuse_naming_unit_and_field(tmp_path):
    """A value that passed the old host checks and broke the node: refused at stamping now."""
    p = tmp_path / "unit.yml"
    for body, field in (("unit: a\nhostname: >\n  iw-1\n", None),  # folded scalar: "iw-1\n" → iw-1
                        ("unit: a\nhostname: IW-1\n", None),  # a host name is case-blind: iw-1
                        ("unit: a\ncaps: {monthly_gb: 0}\n", None),  # 0 = no quota, as on the node
                        ("unit: a\npayout_address: \"bc1q\\u2028x\"\n", "payout_address"),
                        ("unit: a\npayout_address: \"bc1q\\x7fx\"\n", "payout_address"),
                        ("unit: a\nwifi: {country: DE, ssid: \"a\\u0085b\", psk: '12345678'}\n", "wifi.ssid"),
                        ("unit: a\nssh_authorized_keys: [\"" + KEY + "\\rinjected\"]\n", "ssh_authorized_keys[0]"),
                        ("unit: a\ncaps: {up_mbit: .inf}\n", "caps.up_mbit"),
                        ("unit: a\ncaps: {up_mbit: 1.0e-9}\n", "caps.up_mbit"),
                        ("unit: a\ncaps: {max_sessions: 8.0}\n", None)):
        p.write_text(body)
        if field is None:
            u = load_unit(p)
            assert u.hostname in ("a", "iw-1") and u.caps.get("monthly_gb", 0) == 0
            assert u.caps.get("max_sessions", 8) == 8 and type(u.caps.get("max_sessions", 8)) is int
            continue
        with pytest.raises(UserError) as e:
            load_unit(p)
        assert "\n" not in str(e.value) and f"field '{field}'" in str(e.value), (body, str(e.value))
