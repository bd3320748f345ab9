"""Router mode over PPPoE as one fact: [home] wan (node.toml, the stamp's `wan` winning), the ISP's
login (unit.yml/units.csv `pppoe`, the roles' idlewire_pppoe_*) written once as pppd options, and
the line (ppp0) that the agent shapes, the firewall treats as the WAN and pppd creates.

The dial-up itself is booted for real: tests/image/test_stamp_firstboot.py (pppd in the guest
against tests/pppoelab.py's access concentrator)."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest
import yaml
from idlewire.errors import UserError
from idlewire.stamp import stamp_values
from idlewire.units import load_unit, load_units
from idlewire_agent import config, consume, schema
from rolerender import render
from test_consume_stamp import make_card, run
from test_router_mode import agent, node_toml

ROOT = Path(__file__).resolve().parents[2]
LOGIN = {"user": 'ab#1 "x"@isp.example', "password": 'p\\a"ss w#rd '}  # quotes, backslash, '#', spaces


def pppd_words(text: str) -> dict[str, str]:
    """option → its argument, read the way pppd's getword reads an options file (quotes, escapes)."""
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, rest = line.split(" ", 1)
        assert rest.startswith('"') and rest.endswith('"'), line
        word, i, body = [], 0, rest[1:-1]
        while i < len(body):
            if body[i] == "\\":
                i += 1
            else:
                assert body[i] != '"', f"an unescaped quote ends the word early: {line}"
            word.append(body[i])
            i += 1
        out[name] = "".join(word)
    return out


def test_a_pppoe_unit_is_stamped_with_its_login_and_the_card_keeps_it_only_until_first_boot(tmp_path):
    boot, root, unit, _ = make_card(tmp_path, "unit: r-1\nmode: router\nwan: pppoe\n"
                                    f"pppoe: {yaml.safe_dump(LOGIN, default_flow_style=True).strip()}\n")
    assert "password" not in repr(unit)  # never in a message or a log line
    assert stamp_values(unit, "x")["pppoe"] == LOGIN
    r = run(boot, root)
    assert r.returncode == 0, r.stdout + r.stderr
    login = root / schema.PPPOE_FILE.lstrip("/")
    assert stat.S_IMODE(login.stat().st_mode) == 0o600
    assert pppd_words(login.read_text()) == LOGIN
    unit_toml = tomllib.loads((root / "etc/idlewire/unit.toml").read_text())
    assert unit_toml["wan"] == "pppoe" and "pppoe" not in unit_toml  # the login is not a setting
    assert not (boot / "idlewire" / "stamp.toml").exists()  # erased with the rest of the stamp
    assert LOGIN["password"] not in r.stdout + r.stderr


@pytest.mark.parametrize(("body", "field", "says"), [
    ("wan: pppoe\n", "pppoe.user", 'missing; wan = "pppoe" needs'),
    ("wan: pppoe\npppoe: {user: u}\n", "pppoe.password", "missing"),
    ("pppoe: {user: u, password: p}\n", "pppoe", 'given, but wan is not "pppoe"'),
    ('wan: pppoe\npppoe: {user: u, password: "a\\nplugin /tmp/x.so"}\n', "pppoe.password", "printable ASCII"),
    ('wan: pppoe\npppoe: {user: "", password: p}\n', "pppoe.user", "printable ASCII"),
    ("wan: pppoe\npppoe: {user: u, password: p, mtu: 1400}\n", "pppoe.mtu", "unknown setting"),
    ("wan: ppoe\n", "wan", '"dhcp" or "pppoe"'),
])
def test_a_bad_pppoe_unit_is_one_line_naming_the_field(tmp_path, body, field, says):
    f = tmp_path / "unit.yml"
    f.write_text("unit: r-1\nmode: router\n" + body)
    with pytest.raises(UserError) as exc:
        load_unit(f)
    msg = str(exc.value)
    assert msg.startswith(f"{f}: field '{field}': ") and says in msg and "\n" not in msg, msg
    assert "plugin /tmp/x.so" not in msg  # a secret is not shown back


def test_units_csv_carries_the_login_in_two_columns(tmp_path):
    f = tmp_path / "units.csv"
    f.write_text('unit,mode,wan,pppoe_user,pppoe_password\nr-1,router,pppoe,u@isp,"se,cret"\nr-2,router,,,\n')
    r1, r2 = load_units(f)
    assert r1.pppoe == {"user": "u@isp", "password": "se,cret"} and r1.settings["wan"] == "pppoe"
    assert r2.pppoe is None and "wan" not in r2.settings
    f.write_text("unit,mode,wan,pppoe_user\nr-1,router,pppoe,u@isp\n")
    with pytest.raises(UserError, match=r"row 2: field 'pppoe.password': missing"):
        load_units(f)


@pytest.mark.parametrize(("home", "unit", "login", "want"), [
    ('mode = "router"\nwan = "pppoe"', "", True, "pppoe"),
    ('mode = "router"', 'wan = "pppoe"\n', True, "pppoe"),     # the stamp wins
    ('mode = "router"\nwan = "pppoe"', 'wan = "dhcp"\n', True, "dhcp"),
    ('mode = "router"\nwan = "pppoe"', "", False, "dhcp"),   # no login: it could never dial
    ('mode = "node"\nwan = "pppoe"', "", True, "dhcp"),      # a node is not the one dialling
])
def test_the_line_is_ppp0_only_for_a_pppoe_router_with_its_login(tmp_path, monkeypatch, home, unit, login, want):
    f = node_toml(tmp_path, home, unit)
    path = tmp_path / "pppoe.conf"
    if login:
        path.write_text(consume.pppoe_conf({"user": "u", "password": "p"}))
    monkeypatch.setattr(schema, "PPPOE_FILE", str(path))
    cfg = config.load(f)
    assert config.wan_kind(cfg) == want
    line = schema.PPPOE_INTERFACE if want == "pppoe" else "eth0"
    assert cfg.interfaces.wan == cfg.policy.shaping.wan_interface == line


def test_mode_wan_says_why_a_pppoe_without_its_login_runs_on_dhcp(tmp_path):
    assert not Path(schema.PPPOE_FILE).exists()  # this host is not a unit
    f = node_toml(tmp_path, 'mode = "router"', 'wan = "pppoe"\n')
    r = agent("mode", "--wan", "--config", str(f))
    assert (r.returncode, r.stdout) == (0, "dhcp\n")
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"PPPoE refused: no login in {schema.PPPOE_FILE}") and "pppoe.user" in line
    r = agent("mode", "--wan", "--config", str(node_toml(tmp_path, 'mode = "router"', "")))
    assert (r.returncode, r.stdout, r.stderr) == (0, "dhcp\n", "")


def test_the_roles_write_the_login_as_the_stamp_does_and_name_the_schemas_line_and_file():
    text = render("base", "etc/idlewire/pppoe.conf.j2",
                  {"idlewire_pppoe_user": LOGIN["user"], "idlewire_pppoe_password": LOGIN["password"]})
    assert pppd_words(text) == LOGIN == pppd_words(consume.pppoe_conf(LOGIN))
    peer = render("base", "etc/ppp/peers/idlewire-wan.j2", {"agent_wan_interface": "enp1s0"})
    lines = peer.splitlines()
    for want in ("plugin pppoe.so", "nic-enp1s0", f"ifname {schema.PPPOE_INTERFACE}", f"file {schema.PPPOE_FILE}",
                 "persist", "maxfail 0", "noauth", "usepeerdns", "mtu 1492"):
        assert want in lines, (want, lines)
    assert not any(w.startswith(("user", "password")) for w in lines)  # the secret stays in its 0600 file
    for role, var in (("base", "base_pppoe_file"), ("firewall", "firewall_router_pppoe_interface")):
        defaults = yaml.safe_load((ROOT / "roles" / role / "defaults" / "main.yml").read_text())
        assert defaults[var] in (schema.PPPOE_FILE, schema.PPPOE_INTERFACE), (role, var)
    unit = render("base", "etc/systemd/system/idlewire-pppoe.service.j2")
    assert "ConditionPathExists=/run/idlewire/pppoe" in unit and "ExecStart=/usr/sbin/pppd call idlewire-wan" in unit


def test_router_nft_treats_ppp0_as_the_wan_and_clamps_the_mss():
    """(nft -c checks the same rendered table: test_router_templates; the clamp's effect:
    tests/net/test_router.py)"""
    text = render("firewall", "etc/idlewire/router.nft.j2", {"agent_wan_interface": "enp1s0"})
    wan = '{ "enp1s0", "ppp0" }'
    assert f'iifname "iw0" oifname != {wan} counter drop' in text
    assert f'iifname "br-lan" oifname {wan} meta nfproto ipv4 masquerade' in text
    for way in ("oifname", "iifname"):
        assert f'{way} "ppp0" tcp flags syn tcp option maxseg size set rt mtu' in text
