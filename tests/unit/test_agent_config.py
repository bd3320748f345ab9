"""node.toml schema: every error names its key and the expected value; check-config exits 2."""

import subprocess
import sys

from idlewire_agent.config import ConfigError, parse

GOOD = """
[node]
region = "eu-west"
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
