"""The bake's layers: which role a change re-applies. A role's layer key covers its files, the files
it installs from elsewhere and every variable its text reaches (through the roles' defaults and
the site's own values); a change outside those keeps the layer, one inside re-bakes it and every
role after it. (That a re-bake gives the bytes of a cold bake: tests/image/test_artifacts.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from idlewire.build import bake
from idlewire.config import Site, load_target

ROOT = Path(__file__).resolve().parents[2]
TAR = Path("rpi4-arm64-0123456789abcdef.tar")


@pytest.fixture(scope="module")
def target():
    return load_target("rpi4-arm64")


def keys(target, **kw) -> dict[str, str]:
    return dict(zip(bake.ROLES, bake.layer_keys(target, Site(**kw), TAR), strict=True))


def changed(a: dict, b: dict) -> list[str]:
    return [r for r in bake.ROLES if a[r] != b[r]]


def test_the_layers_are_bake_yml_roles_in_order_each_tagged_with_its_name():
    play = yaml.safe_load((ROOT / "playbooks/bake.yml").read_text())[0]
    assert [r["role"] for r in play["roles"]] == list(bake.ROLES)
    assert all(r.get("tags") == [r["role"]] for r in play["roles"]), "bake applies one role per run (--tags)"


def test_a_variable_only_the_agent_reads_rebakes_the_agent_alone(target):
    a = keys(target, vars={"agent_price_per_gb": 0.5})
    assert changed(a, keys(target, vars={"agent_price_per_gb": 0.75})) == ["agent"]
    assert changed(a, keys(target, vars={"agent_price_per_gb": 0.5, "no_role_reads_this": 1})) == []


def test_a_change_rebakes_its_role_and_every_role_after_it(target):
    a = keys(target)
    assert changed(a, keys(target, vars={"firewall_tunnel_port": 51821})) == ["firewall", "agent"]
    assert changed(a, keys(target, hostname="other")) == list(bake.ROLES)  # base_hostname
    assert changed(a, keys(target, vars={"idlewire_new_switch": True})) == list(bake.ROLES)  # idlewire_*: any role
    other = bake.layer_keys(target, Site(), Path("rpi4-arm64-fedcba9876543210.tar"))
    assert all(x != y for x, y in zip(a.values(), other, strict=True)), "another rootfs is another base"


def test_a_variable_reached_through_a_site_value_or_a_default_is_an_input(target):
    """agent_price_per_gb: "{{ my_price }}" makes my_price an agent input; the firewall's defaults
    follow the agent's variables, so an agent_* variable they name is a firewall input too."""
    a = keys(target, vars={"agent_price_per_gb": "{{ my_price }}", "my_price": 1})
    assert changed(a, keys(target, vars={"agent_price_per_gb": "{{ my_price }}", "my_price": 2})) == ["agent"]
    fw_default = (ROOT / "roles/firewall/defaults/main.yml").read_text()
    assert "agent_firewall_table" in fw_default
    assert changed(keys(target), keys(target, vars={"agent_firewall_table": "x"})) == ["firewall", "agent"]


def test_a_role_reading_variables_by_computed_name_depends_on_every_variable(target, monkeypatch):
    real = bake._role_text
    monkeypatch.setattr(bake, "_role_text",
                        lambda role: real(role) + ("\n{{ lookup('vars', 'agent_' ~ x) }}" if role == "base" else ""))
    assert changed(keys(target, vars={"agent_price_per_gb": 0.5}),
                   keys(target, vars={"agent_price_per_gb": 0.75})) == list(bake.ROLES)


def _plain_text(role: str) -> str:
    base = ROOT / "roles" / role
    return "\n".join(f.read_text(errors="replace") for f in sorted(base.rglob("*")) if f.is_file())


def test_files_a_role_installs_from_outside_its_directory_are_its_inputs():
    """A role that reaches out of its directory (role_path/../..) must list what it reads there."""
    for role in bake.ROLES:
        text = _plain_text(role)
        if re.search(r"role_path\s*}}\s*/\.\.", text):
            assert role in bake.ROLE_SOURCES, f"roles/{role} reads files outside it: add them to ROLE_SOURCES"
            for rel in bake.ROLE_SOURCES[role]:
                assert (ROOT / rel).exists()
