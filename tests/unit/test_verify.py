"""`idlewire verify` without nodes: inventory handling, unreachable hosts, the suite's helpers."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "infra"))

from iwnode import FEATURES, expected_vars, feature, parse_rate, playbook_roles, role_defaults  # noqa: E402


def idlewire(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "idlewire", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=180)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: connections are refused


def test_expected_values_come_from_roles_and_inventory():
    roles = playbook_roles()
    assert roles[0] == "base" and {"agent", "firewall"} <= set(roles)
    d = role_defaults()
    assert d["agent_api_port"] == 8740 and "net.ipv4.ip_forward" in d["base_sysctl"]
    v = expected_vars("n1", {"vars": {"agent_api_port": 9000}, "hosts": {"n1": {"agent_api_listen": ["10.1.1.1"]}}},
                      {"agent_region": "eu"})
    assert (v["agent_api_port"], v["agent_api_listen"], v["agent_region"]) == (9000, ["10.1.1.1"], "eu")
    assert expected_vars("n2", {"agent_api_port": 1}, None)["agent_api_port"] == 1


def test_every_feature_variable_is_a_role_variable():
    """A renamed role variable must break here, not turn its check into a silent skip on every node."""
    d = role_defaults()
    missing = {f: names for f, names in FEATURES.items() if not any(n in d for n in names)}
    assert not missing, f"FEATURES name no variable of roles/*/defaults: {missing}"
    assert feature(d, "shaping") == ("agent_shaping_enabled", False)


def test_parse_rate():
    assert parse_rate("10Mbit") == 10e6
    assert parse_rate("1250Kbps") == 10e6
    assert parse_rate("800bit") == 800


def test_unreachable_host_in_the_table_and_junit(tmp_path):
    inv = tmp_path / "inv.yml"
    inv.write_text(f"all:\n  hosts:\n    dead-1:\n      ansible_host: 127.0.0.1\n      ansible_port: {closed_port()}\n"
                   "      ansible_user: nobody\n")
    res = idlewire("verify", "-i", str(inv), "--junit", str(tmp_path / "r.xml"), "--json")
    assert res.returncode == 1, res.stderr
    out = json.loads(res.stdout)
    assert [(h["host"], h["status"]) for h in out["hosts"]] == [("dead-1", "unreachable")]
    assert (tmp_path / "r.xml").read_text().count("<testcase") >= 8
    table = idlewire("verify", "-i", str(inv), "--junit", str(tmp_path / "r.xml"))
    assert "dead-1" in table.stdout and "unreachable" in table.stdout


def test_bad_inventory_and_limit(tmp_path):
    res = idlewire("verify", "-i", str(tmp_path / "missing.yml"))
    assert res.returncode == 2 and "no such inventory file" in res.stderr
    inv = tmp_path / "inv.yml"
    inv.write_text("all:\n  hosts:\n    n1:\n      ansible_host: 127.0.0.1\n")
    res = idlewire("verify", "-i", str(inv), "--limit", "nomatch*")
    assert res.returncode == 2 and "no hosts match --limit" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_plain_pytest_does_not_collect_the_node_suite():
    res = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "infra")], capture_output=True, text=True, cwd=ROOT)
    assert "test_node.py" not in res.stdout, res.stdout


def test_the_line_is_ppp0_when_the_units_wan_is_pppoe():
    """verify's shaping and WireGuard checks look at the device the agent shapes: ppp0 when the
    unit's WAN is PPPoE (`idlewire-agent mode --wan`), else agent_wan_interface."""
    import contextlib
    from types import SimpleNamespace

    from iwnode import Node

    class Host:
        def __init__(self, wan: str):
            self.wan, self.ran = wan, []

        def run(self, command: str):
            self.ran.append(command)
            out = {"idlewire-agent mode --wan": self.wan, "id -u": "0"}.get(command, "")
            return SimpleNamespace(stdout=out + "\n", stderr="", rc=0)

        def file(self, path: str):
            return SimpleNamespace(exists=False)  # not OpenWrt

        @contextlib.contextmanager
        def sudo(self):
            yield

    v = {"agent_wan_interface": "eth0", "firewall_router_pppoe_interface": "ppp0"}
    assert Node(Host("pppoe"), "n1", v).line == "ppp0"
    assert Node(Host("dhcp"), "n1", v).line == "eth0"
