"""The agent role's templates render with StrictUndefined from the role defaults, and the
rendered node.toml passes `idlewire-agent check-config` (what the role's validate: runs)."""

import subprocess
import sys
from pathlib import Path

import pytest
import rolerender

ROLE = Path(__file__).resolve().parents[2] / "roles" / "agent"


def render(name: str, **over) -> str:
    return rolerender.render("agent", name, over)


@pytest.mark.parametrize("over", [{}, {"agent_api_listen": ["192.168.1.1", "fd00::1"], "agent_region": "FR",
                                       "agent_lan_interface": "br-lan", "agent_tunnel_endpoint": "node.example",
                                       "agent_firewall_public_addresses": ["203.0.113.7", "2001:db8::7"],
                                       "agent_session_max_per_buyer": 1, "agent_session_address_rest": 0}])
def test_node_toml_renders_and_validates(tmp_path, over):
    f = tmp_path / "node.toml"
    f.write_text(render("etc/idlewire/node.toml.j2", **over))
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "check-config", str(f)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr + f.read_text()


def test_bad_role_value_is_caught_by_validate(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text(render("etc/idlewire/node.toml.j2", agent_tunnel_pool="10.0.0.0/33"))
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "check-config", str(f)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "tunnel.pool" in r.stderr


def test_systemd_unit_is_hardened():
    unit = render("etc/systemd/system/idlewire-agent.service.j2").splitlines()
    for line in ("ProtectSystem=strict", "StateDirectory=idlewire-agent", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW", "ExecStart=/usr/bin/idlewire-agent run "
                 "--config /etc/idlewire/node.toml"):
        assert line in unit


def test_the_file_limit_is_set_by_the_unit_and_by_procd():
    """The agent derives its API connection bounds from RLIMIT_NOFILE: both service managers set it."""
    assert "LimitNOFILE=4096" in render("etc/systemd/system/idlewire-agent.service.j2",
                                        agent_nofile_limit=4096).splitlines()
    assert '\tprocd_set_param limits nofile="4096 4096"' in render("etc/init.d/idlewire-agent.j2",
                                                                    agent_nofile_limit=4096).splitlines()
