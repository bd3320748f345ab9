"""Router mode as one fact: [home] mode in node.toml, the unit's stamped mode winning, the site
file's `mode:` and the roles' idlewire_mode; what the node prints for its boot-time switch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from idlewire.build.bake import bake_vars
from idlewire.config import load_site, load_target
from idlewire.errors import UserError
from idlewire.units import load_units
from idlewire_agent import config, schema

ROOT = Path(__file__).resolve().parents[2]


def agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "idlewire_agent", *args], capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT / "agent")})


def node_toml(tmp_path: Path, home: str, unit: str | None) -> Path:
    f, unit_file = tmp_path / "node.toml", tmp_path / "unit.toml"
    f.write_text(f'[node]\nunit_file = "{unit_file}"\n\n[home]\n{home}\n')
    if unit is not None:
        unit_file.write_text('unit = "u1"\nhostname = "h1"\nnode_public_key = "' + "A" * 43 + '="\n' + unit)
    return f


@pytest.mark.parametrize(("home", "unit", "mode"), [
    ('mode = "node"', None, "node"),             # provisioned live: node.toml alone
    ('mode = "router"', None, "router"),
    ('mode = "node"', 'mode = "router"\n', "router"),  # a golden node image stamped a router
    ('mode = "router"', 'mode = "node"\n', "node"),
    ('mode = "router"', "", "router"),           # stamped without a mode: node.toml's stands
])
def test_the_stamped_mode_wins_over_node_toml(tmp_path, home, unit, mode):
    f = node_toml(tmp_path, home, unit)
    assert config.load(f).policy.home.mode == mode
    r = agent("mode", "--config", str(f))
    assert (r.returncode, r.stdout) == (0, f"{mode}\n"), r.stderr
    if unit:
        r = agent("check-config", str(f))
        assert f"mode = {mode!r} replaces home.mode" in r.stdout, r.stdout


@pytest.mark.parametrize("bad", ['"bridge"', '"Router "', "1", "true", '""'])
def test_a_bad_mode_is_one_line_naming_the_file_and_key(tmp_path, bad):
    f = node_toml(tmp_path, 'mode = "node"', f"mode = {bad}\n")
    r = agent("mode", "--config", str(f))
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith(f"{tmp_path / 'unit.toml'}: mode: expected \"node\" or \"router\""), r.stderr
    f = node_toml(tmp_path, f"mode = {bad}", None)
    r = agent("mode", "--config", str(f))
    assert r.returncode == 2 and r.stderr.startswith(f"{f}: home.mode: expected"), r.stderr


def test_the_site_files_mode_reaches_the_roles_as_idlewire_mode(tmp_path):
    site = tmp_path / "site.yml"
    site.write_text("hostname: r1\nmode: router\n")
    target = load_target(ROOT / "image/targets/x86_64.yml")
    assert bake_vars(target, load_site(site))["idlewire_mode"] == "router"
    assert bake_vars(target, load_site(None))["idlewire_mode"] == schema.NODE["home"]["mode"].default == "node"
    for bad in ("bridge", "1", "[router]"):
        site.write_text(f"hostname: r1\nmode: {bad}\n")
        with pytest.raises(UserError, match=rf"^{site}: field 'mode': expected "):
            load_site(site)


def test_units_csv_mode_column(tmp_path):
    f = tmp_path / "units.csv"
    f.write_text("unit,mode\na1,router\na2,\na3,bridge\n")
    with pytest.raises(UserError, match=r"units.csv.*row 4.*mode.*expected \"node\" or \"router\""):
        load_units(f)
    f.write_text("unit,mode\na1,router\na2,\n")
    a1, a2 = load_units(f)
    assert (a1.mode, a2.mode) == ("router", None)  # blank: not stamped, the image's mode stands


def test_every_role_documents_idlewire_mode_with_the_schemas_choices():
    for role in ("base", "agent"):
        spec = yaml.safe_load((ROOT / f"roles/{role}/meta/argument_specs.yml").read_text())
        opt = spec["argument_specs"]["main"]["options"]["idlewire_mode"]
        assert opt["default"] == schema.NODE["home"]["mode"].default
        assert opt["choices"] == schema.NODE["home"]["mode"].pattern.pattern.split("|")
