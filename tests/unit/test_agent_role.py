"""The agent role's templates render with StrictUndefined from the role defaults, and the
rendered node.toml passes `idlewire-agent check-config` (what the role's validate: runs)."""

import json
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

ROLE = Path(__file__).resolve().parents[2] / "roles" / "agent"


def variables(**over) -> dict:
    raw: dict = {}
    for f in sorted((ROLE / "defaults" / "main").glob("*.yml")):
        raw.update(yaml.safe_load(f.read_text()) or {})
    raw.update(over)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)  # noqa: S701 (config, not HTML)
    ctx = {"role_path": str(ROLE), "idlewire_baking": True}
    for _ in range(4):  # defaults refer to each other
        for k, v in raw.items():
            ctx[k] = env.from_string(v).render(ctx) if isinstance(v, str) and "{{" in v else v
    return ctx


def render(name: str, **over) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ROLE / "templates"), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)  # noqa: S701
    env.filters["comment"] = lambda s: "\n".join("# " + line for line in s.splitlines())
    env.filters["to_json"] = json.dumps
    env.filters["basename"] = lambda p: Path(p).name
    return env.get_template(name).render(ansible_managed="Ansible managed", **variables(**over))


@pytest.mark.parametrize("over", [{}, {"agent_api_listen": ["192.168.1.1", "fd00::1"], "agent_region": "eu-1",
                                       "agent_lan_interface": "br-lan", "agent_tunnel_endpoint": "node.example"}])
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


def test_openwrt_init_script():
    text = render("etc/init.d/idlewire-agent.j2")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh /etc/rc.common"
    assert "USE_PROCD=1" in lines
    assert '\tprocd_set_param command "$PROG" run --config "$CONF"' in lines
    r = subprocess.run(["sh", "-n"], input=text, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr
