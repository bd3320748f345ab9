"""inventory/example.yml as Ansible reads it: group_vars land on the hosts of their group, and every
variable the example sets is a role variable declared in an argument_specs (or an ansible_*
connection variable), so a typo is caught here instead of being silently ignored by the roles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = ROOT / "inventory" / "example.yml"
GROUP_VARS = sorted((ROOT / "inventory" / "group_vars").glob("*.yml"))


def declared_role_variables() -> set[str]:
    names: set[str] = set()
    for spec in (ROOT / "roles").glob("*/meta/argument_specs.yml"):
        for entry in yaml.safe_load(spec.read_text())["argument_specs"].values():
            names.update(entry.get("options", {}))
    return names


@pytest.fixture(scope="module")
def hostvars() -> dict[str, dict]:
    exe = Path(sys.executable).parent / "ansible-inventory"
    r = subprocess.run([str(exe), "-i", str(INVENTORY), "--list"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data["idlewire"]["children"]) == {"pi", "x86", "openwrt"}
    return data["_meta"]["hostvars"]


def test_group_vars_land_on_their_hosts(hostvars):
    owrt, pi, x86 = hostvars["node-owrt-01"], hostvars["node-pi-01"], hostvars["node-x86-01"]
    # OpenWrt: root without sudo, Python at a fixed path (it exists only after the bootstrap).
    assert (owrt["ansible_user"], owrt["ansible_become"], owrt["ansible_python_interpreter"]) == (
        "root", False, "/usr/bin/python3")
    assert (owrt["agent_wan_interface"], owrt["agent_lan_interface"], owrt["firewall_openwrt_wan_zone"]) == (
        "wan", "br-lan", "wan")
    assert owrt["agent_state_dir"] == "/etc/idlewire-agent"  # not /var: RAM on OpenWrt
    # The idlewire group's own vars reach every host; the child group's ansible_user wins on OpenWrt.
    assert pi["ansible_user"] == x86["ansible_user"] == "idlewire"
    assert all(h["base_ssh_authorized_keys"] for h in (owrt, pi, x86))
    assert (pi["agent_wan_interface"], pi["base_serial_autologin_ttys"]) == ("eth0", ["ttyAMA0", "ttyS0"])
    assert (x86["agent_wan_interface"], x86["base_serial_autologin_ttys"]) == ("enp1s0", ["ttyS0"])
    # Nothing of one group leaks into another.
    assert "ansible_become" not in pi and "ansible_become" not in x86
    assert "agent_state_dir" not in pi and "firewall_openwrt_wan_zone" not in x86


def unknown_variables(path: Path) -> list[str]:
    declared = declared_role_variables()
    data = yaml.safe_load(path.read_text()) or {}
    if "all" in data:  # an inventory: the vars of its groups and hosts
        found: dict[str, object] = {}

        def walk(group: dict) -> None:
            found.update(group.get("vars") or {})
            for host in (group.get("hosts") or {}).values():
                found.update(host or {})
            for child in (group.get("children") or {}).values():
                walk(child or {})

        walk(data["all"])
        data = found
    return sorted(k for k in data if not k.startswith("ansible_") and k not in declared)


@pytest.mark.parametrize("path", [INVENTORY, *GROUP_VARS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_variable_is_declared(path):
    unknown = unknown_variables(path)
    assert not unknown, f"{path.name}: not a role variable (typo?): {', '.join(unknown)}"


def test_the_check_catches_a_typo(tmp_path):
    (tmp_path / "g.yml").write_text("agent_wan_interfce: eth0\nansible_port: 22\nfirewall_table: x\n")
    assert unknown_variables(tmp_path / "g.yml") == ["agent_wan_interfce"]
    (tmp_path / "i.yml").write_text("all:\n  children:\n    g:\n      hosts:\n        h: {base_hostnam: x}\n")
    assert unknown_variables(tmp_path / "i.yml") == ["base_hostnam"]
