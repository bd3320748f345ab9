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
    pol, problems = parse_sections(tomllib.loads(GOOD))
    assert problems == []
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
        "shaping": {"wan_interface": "an interface name that is far too long", "tunnel_port": 70000,
                    "line_up_mbit": -1, "cap_down_mbit": 500, "overhead": "18", "colour": 1},
        "schedule": {"rule": [{"days": ["monday"], "start": "8:00", "end": "25:00", "cap_up_mbit": 5}]},
        "quota": {"monthly_gb": -5, "reset_day": 32, "max_sessions": 0},
        "firewall": {"buyer_nat_ports": "60000-65535", "required": "yes"},
    }
    _, problems = parse_sections(bad)
    keys = [p.split(":")[0] for p in problems]
    assert keys == ["shaping.colour", "shaping.wan_interface", "shaping.tunnel_port", "shaping.line_up_mbit",
                    "shaping.overhead", "shaping.cap_down_mbit", "schedule.rule[0].days",
                    "schedule.rule[0].start", "schedule.rule[0].end", "schedule.rule[0].cap_down_mbit",
                    "quota.monthly_gb", "quota.reset_day", "quota.max_sessions", "firewall.required",
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
    for expected in ['[shaping]', 'enabled = true', 'wan_interface = "eth0"', 'line_down_mbit = 100',
                     '[[schedule.rule]]', 'days = ["sat", "sun"]', 'start = "01:00"', 'cap_down_mbit = 80',
                     'monthly_gb = 250', 'reset_day = 1', 'max_sessions = 8', 'buyer_nat_ports = "61440-65535"']:
        assert expected in lines, expected
    path = tmp_path / "node.toml"
    path.write_text(text)
    cfg = config.load(path)
    assert cfg.policy.shaping.enabled and cfg.policy.quota.monthly_bytes == 250 * 10**9
    assert cfg.policy.schedule[0].days == (5, 6)
