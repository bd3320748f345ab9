"""node.toml schema: every error names its key and the expected value; check-config exits 2."""

import subprocess
import sys

from idlewire_agent.config import ConfigError, parse

GOOD = """
[node]
region = "de"
price_per_gb = 0.25
key_file = "/etc/idlewire/node.key"
marketplace = "https://market.example/api"
[interfaces]
wan = "eth0"
lan = "br-lan"
management = ""
[tunnel]
interface = "iw0"
port = 51820
pool = "10.99.0.0/16"
[metering]
poll_interval = 5
line_rate_mbit = 100
unpaid_cap_mb = 20
[sessions]
max = 10
expiry = 3600
idle_timeout = 300
[api]
listen = ["192.168.1.1"]
"""


def check(tmp_path, text):
    f = tmp_path / "node.toml"
    f.write_text(text)
    return subprocess.run([sys.executable, "-m", "idlewire_agent", "check-config", str(f)], capture_output=True,
                          text=True)


def test_good_config(tmp_path):
    r = check(tmp_path, GOOD)
    assert r.returncode == 0, r.stderr


def test_every_error_is_reported_with_key_and_expectation(tmp_path):
    bad = GOOD.replace('pool = "10.99.0.0/16"', 'pool = "10.99.0.0/31"').replace("port = 51820", "port = 0")
    bad = bad.replace("line_rate_mbit = 100", "line_rate_mbit = -1").replace("max = 10", "max = true")
    bad = bad.replace('listen = ["192.168.1.1"]', 'listen = ["0.0.0.0"]\nbogus = 1')
    bad = bad.replace('wan = "eth0"', 'wan = "a-name-that-is-too-long"') + "\n[extra]\n"
    r = check(tmp_path, bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    for key in ("tunnel.pool", "tunnel.port", "metering.line_rate_mbit", "sessions.max", "api.listen",
                "api.bogus", "interfaces.wan", "[extra]"):
        assert any(key in line and "expected" in line for line in lines), (key, lines)
    assert len(lines) == 8


def test_not_toml_and_missing(tmp_path):
    r = check(tmp_path, "[node\n")
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "check-config", str(tmp_path / "nope.toml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "check-config", str(tmp_path)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_api_inside_tunnel_pool_refused():
    try:
        parse({"api": {"listen": ["10.99.0.1"]}})
    except ConfigError as exc:
        assert "inside tunnel.pool" in str(exc)
    else:
        raise AssertionError("accepted")


POLICY = """
[shaping]
enabled = true
line_up_mbit = 20
line_down_mbit = 100
cap_up_mbit = 10
cap_down_mbit = 50
[[schedule.rule]]
start = "01:00"
end = "06:00"
cap_up_mbit = 15
cap_down_mbit = 80
[quota]
monthly_gb = 500
"""

UNIT = """
# written at first boot from the unit stamp (idlewire stamp)
unit = "shop-0007"
hostname = "iw-0007"
node_public_key = "Ct3jL6k0fVq0i5t8Y2TrWNqZ3Ku6l9Pl0lqZ3Kx7mX0="
payout_address = "bc1qexamplepayout0007"

[caps]
down_mbit = 250
max_sessions = 4
monthly_gb = 300
up_mbit = 5
"""


def node_with_unit(tmp_path, unit_text: str | None):
    unit = tmp_path / "unit.toml"
    if unit_text is not None:
        unit.write_text(unit_text)
    node = tmp_path / "node.toml"
    node.write_text(GOOD.replace('marketplace = "https://market.example/api"',
                                 f'marketplace = "https://market.example/api"\nunit_file = "{unit}"') + POLICY)
    return node, unit


def test_unit_caps_replace_the_roles_and_are_bounded_by_the_line(tmp_path):
    from idlewire_agent.config import load

    node, unit = node_with_unit(tmp_path, UNIT)
    cfg = load(node)
    sh, q = cfg.policy.shaping, cfg.policy.quota
    assert (sh.cap_up, sh.cap_down) == (5_000_000, 100_000_000)  # down: 250 asked, the line is 100
    assert [(r.cap_up, r.cap_down) for r in cfg.policy.schedule] == [(5_000_000, 80_000_000)]
    assert (q.monthly_bytes, q.max_sessions) == (300_000_000_000, 4)
    assert cfg.unit.present and cfg.unit.payout_address == "bc1qexamplepayout0007" and cfg.unit.unit == "shop-0007"
    assert any("lowered to shaping.line_down_mbit (100)" in n for n in cfg.unit.notes), cfg.unit.notes
    # without a unit file, node.toml alone (a node provisioned live)
    unit.unlink()
    cfg = load(node)
    assert not cfg.unit.present and (cfg.policy.shaping.cap_up, cfg.policy.quota.max_sessions) == (10_000_000, 10)
    # check-config reports the unit and what its caps change
    unit.write_text(UNIT)
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "check-config", str(node)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert f"{unit}: OK: unit shop-0007, payout address bc1qexamplepayout0007" in r.stdout
    assert f"{unit}: caps.up_mbit = 5 replaces shaping.cap_up_mbit (10)" in r.stdout
    # the shaper is built with the unit's caps (what `shaping show` prints, trees present or not)
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "shaping", "show", "--config", str(node),
                        "--state", str(tmp_path / "no-state.json")], capture_output=True, text=True)
    assert "buyer caps: up 5 Mbit/s, down 100 Mbit/s" in r.stdout, r.stdout + r.stderr


def test_bad_unit_values_name_the_unit_file_and_key(tmp_path):
    bad = (UNIT.replace("up_mbit = 5", "up_mbit = -3").replace("max_sessions = 4", "max_sessions = 1.5")
           .replace('payout_address = "bc1qexamplepayout0007"', 'payout_address = "no spaces allowed"')
           .replace("[caps]", 'wifi_psk = "x"\n[caps]\nspeed = 1'))
    node, unit = node_with_unit(tmp_path, bad)
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "check-config", str(node)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    for key in ("caps.up_mbit", "caps.max_sessions", "payout_address", "wifi_psk", "caps.speed"):
        assert any(line.startswith(f"{unit}: {key}:") and ("expected" in line) for line in lines), (key, lines)
    assert len(lines) == 5
    # the agent refuses to start on it, with the same lines
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "run", "--config", str(node)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and f"{unit}: caps.up_mbit: expected a rate in Mbit/s > 0" in r.stderr
    # --unit names a file that must exist; broken TOML is named too
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "check-config", str(node), "--unit",
                        str(tmp_path / "none.toml")], capture_output=True, text=True)
    assert r.returncode == 2 and f"{tmp_path / 'none.toml'}: no such file" in r.stderr
    unit.write_text("[caps\n")
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "check-config", str(node)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and f"{unit}: not valid TOML" in r.stderr
