"""[shaping], [schedule], [quota], [firewall]: parsed values, and one problem per bad key naming it."""

import tomllib

from idlewire_agent import config
from idlewire_agent.policy import MBIT, parse_sections
from rolerender import render

GOOD = """
[shaping]
enabled = true
wan_interface = "eth1"
tunnel_interface = "wg0"
tunnel_port = 51821
line_up_mbit = 40
line_down_mbit = 200
overhead = 26
floor_up_mbit = 0.5
floor_down_mbit = 2
cap_up_mbit = 10
cap_down_mbit = 80
session_cap_down_mbit = 20

[[schedule.rule]]
days = ["mon", "tue", "wed", "thu", "fri"]
start = "08:00"
end = "23:00"
cap_up_mbit = 5
cap_down_mbit = 5

[[schedule.rule]]
start = "23:30"
end = "07:00"
cap_up_mbit = 30
cap_down_mbit = 150

[quota]
monthly_gb = 500
reset_day = 15
max_sessions = 3

[firewall]
table = "idlewire"
buyer_nat_ports = "49152-65535"
"""


def test_good_sections_parse():
    cfg = config.parse(tomllib.loads(GOOD))  # old keys: read, one deprecation line each
    pol = cfg.policy
    assert cfg.warnings == [
        "shaping.wan_interface is deprecated: write it as interfaces.wan (read as that now)",
        "shaping.tunnel_interface is deprecated: write it as tunnel.interface (read as that now)",
        "shaping.tunnel_port is deprecated: write it as tunnel.port (read as that now)",
        "quota.max_sessions is deprecated: write it as sessions.max (read as that now)"]
    assert (cfg.interfaces.wan, cfg.tunnel.interface, cfg.tunnel.port, cfg.sessions.max) == ("eth1", "wg0", 51821, 3)
    s = pol.shaping
    assert (s.enabled, s.wan_interface, s.tunnel_port, s.overhead) == (True, "eth1", 51821, 26)
    assert (s.line_up, s.line_down, s.floor_up, s.cap_down, s.session_cap_down) == (
        40 * MBIT, 200 * MBIT, 500_000, 80 * MBIT, 20 * MBIT)
    assert s.session_cap_up == 0
    r0, r1 = pol.schedule
    assert (r0.days, r0.start, r0.end, r0.cap_up) == ((0, 1, 2, 3, 4), 480, 1380, 5 * MBIT)
    assert (r1.days, r1.start, r1.end, r1.cap_down) == (tuple(range(7)), 1410, 420, 150 * MBIT)
    assert (pol.quota.monthly_bytes, pol.quota.reset_day, pol.quota.max_sessions) == (500 * 10**9, 15, 3)
    assert (pol.firewall.nat_port_low, pol.firewall.nat_port_high, pol.firewall.nat_port_mask) == (
        49152, 65535, 0xC000)


def test_defaults_without_sections():
    pol, problems = parse_sections({})
    assert problems == [] and pol.schedule == [] and pol.shaping.enabled is False
    assert pol.firewall.nat_port_mask == 0xF000


def test_every_bad_key_is_named_with_what_is_expected():
    bad = {
        "shaping": {"line_up_mbit": -1, "cap_down_mbit": 500, "overhead": "18", "colour": 1},
        "schedule": {"rule": [{"days": ["monday"], "start": "8:00", "end": "25:00", "cap_up_mbit": 5}]},
        "quota": {"monthly_gb": -5, "reset_day": 32},
        "firewall": {"buyer_nat_ports": "60000-65535", "required": "yes"},
    }
    _, problems = parse_sections(bad)
    keys = [p.split(":")[0] for p in problems]
    assert keys == ["shaping.colour", "shaping.line_up_mbit",
                    "shaping.overhead", "shaping.cap_down_mbit", "schedule.rule[0].days",
                    "schedule.rule[0].start", "schedule.rule[0].end", "schedule.rule[0].cap_down_mbit",
                    "quota.monthly_gb", "quota.reset_day", "firewall.required",
                    "firewall.buyer_nat_ports"], problems
    assert all("expected" in p for p in problems)
    assert "shaping.cap_down_mbit: expected at most line_down_mbit (100), got 500" in problems
    assert any(p.startswith("firewall.buyer_nat_ports: expected \"LOW-HIGH\", a block of 2^n") for p in problems)


def test_role_renders_a_node_toml_the_agent_accepts(tmp_path):
    text = render("agent", "etc/idlewire/node.toml.j2", {
        "agent_shaping_enabled": True, "agent_quota_monthly_gb": 250,
        "agent_schedule": [{"days": ["sat", "sun"], "start": "01:00", "end": "07:00",
                            "cap_up_mbit": 80, "cap_down_mbit": 80}],
    })
    lines = text.splitlines()
    for expected in ['[shaping]', 'enabled = true', 'wan = "eth0"', 'line_down_mbit = 100',
                     '[[schedule.rule]]', 'days = ["sat", "sun"]', 'start = "01:00"', 'cap_down_mbit = 80',
                     'monthly_gb = 250', 'reset_day = 1', 'max = 8', 'buyer_nat_ports = "61440-65535"']:
        assert expected in lines, expected
    path = tmp_path / "node.toml"
    path.write_text(text)
    cfg = config.load(path)
    assert cfg.policy.shaping.enabled and cfg.policy.quota.monthly_bytes == 250 * 10**9
    assert cfg.policy.schedule[0].days == (5, 6)


def test_one_key_per_fact_old_and_new_disagreeing_is_an_error_naming_both():
    data = {"tunnel": {"interface": "iw0"}, "shaping": {"tunnel_interface": "wg0"},
            "sessions": {"max": 20}, "quota": {"max_sessions": 8}}
    try:
        config.parse(data, "node.toml")
    except config.ConfigError as exc:
        lines = str(exc).splitlines()
    else:
        raise AssertionError("accepted")
    assert lines == [
        "node.toml: shaping.tunnel_interface: 'wg0' conflicts with tunnel.interface = 'iw0'; expected one value: "
        "keep tunnel.interface, remove shaping.tunnel_interface (deprecated)",
        "node.toml: quota.max_sessions: 8 conflicts with sessions.max = 20; expected one value: keep sessions.max, "
        "remove quota.max_sessions (deprecated)"]
    # the same value twice is only a deprecation; the shaper and the quota keeper read the one owner
    cfg = config.parse({"tunnel": {"interface": "wg1", "port": 4500}, "shaping": {"tunnel_interface": "wg1"},
                        "interfaces": {"wan": "eth1"}})
    sh = cfg.policy.shaping
    assert (sh.tunnel_interface, sh.tunnel_port, sh.wan_interface) == ("wg1", 4500, "eth1")
    assert cfg.warnings == ["shaping.tunnel_interface is deprecated: write it as tunnel.interface (read as that now)"]
    # defaults agree: the shaper shapes the agent's tunnel (iw0), not a wg0 nobody creates
    cfg = config.parse({})
    assert (cfg.policy.shaping.tunnel_interface, cfg.policy.quota.max_sessions) == (cfg.tunnel.interface,
                                                                                     cfg.sessions.max)


def test_deprecation_is_one_line_on_stderr(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "node.toml"
    p.write_text('[shaping]\nwan_interface = "eth1"\n')
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "check-config", str(p)], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stderr.strip() == (
        f"{p}: shaping.wan_interface is deprecated: write it as interfaces.wan (read as that now)"), r.stderr
