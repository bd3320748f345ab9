"""The node's region and the unit's market facts: one owner (the agent's schema), read alike by the
node, the host (`idlewire stamp`, `client connect --region`) and the hub.

- [node] region is an ISO 3166-1 alpha-2 code (case-blind, stored upper-case) or "" for none; an old
  region name ("unset", "eu-west") still reads, as none, with a deprecation line saying what to write;
- a marketplace without a region stops `run` and `check-config` in one line naming the key and the fix
  (`--before-stamp` for a golden image makes it a note: the stamp may still give it);
- unit.yml / units.csv `marketplace` and `region` are stamped, consumed into unit.toml at first boot,
  and replace node.toml's values (the stamp wins over the role's agent_marketplace / agent_region).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from idlewire import stamp as host_stamp
from idlewire.errors import UserError
from idlewire.units import load_unit, load_units
from idlewire_agent import config, schema
from idlewire_agent.consume import consume

ROOT = Path(__file__).resolve().parents[2]
REGION = schema.NODE["node"]["region"]
ISO_CODES = Path("/usr/share/iso-codes/json/iso_3166-1.json")  # Debian's iso-codes


def agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "idlewire_agent", *args], capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT / "agent")})


@pytest.mark.skipif(not ISO_CODES.exists(), reason="Debian's iso-codes is not installed")
def test_the_country_list_is_iso_3166_1_as_debian_ships_it():
    codes = {c["alpha_2"] for c in json.loads(ISO_CODES.read_text())["3166-1"]}
    assert codes == schema.COUNTRIES


@pytest.mark.parametrize(("given", "applied"), [("DE", "DE"), ("de", "DE"), (" gb\n", "GB"), ("", ""), ("us", "US")])
def test_a_country_code_is_case_blind_and_stored_upper_case(given, applied):
    assert REGION.check(given) == applied
    assert schema.WIFI["country"].check(given) == applied if applied else True


@pytest.mark.parametrize("bad", ["UK", "EU", "XK", "ZZ", "QM", "DEU", "D", "D1", "unset", "eu-west", "D\u200bE", 7])
def test_what_is_no_country_is_refused_saying_what_is(bad):
    with pytest.raises(schema.Invalid) as exc:
        REGION.check(bad)
    assert "ISO 3166-1 alpha-2" in str(exc.value) and "GB (not UK)" in str(exc.value)


def node_toml(tmp_path: Path, node: str, unit: str | None = None) -> Path:
    f = tmp_path / "node.toml"
    unit_file = tmp_path / "unit.toml"
    f.write_text(f'[node]\nunit_file = "{unit_file}"\n{node}\n')
    if unit is not None:
        unit_file.write_text('unit = "u1"\nhostname = "h1"\nnode_public_key = "' + "A" * 43 + '="\n' + unit)
    return f


@pytest.mark.parametrize("old", ["unset", "UNSET", "eu-west", "home-lab", "DEU"])
def test_an_old_region_name_reads_as_none_with_a_deprecation_line(tmp_path, old):
    f = node_toml(tmp_path, f'region = "{old}"')
    cfg = config.load(f)
    assert cfg.region == "" and cfg.old_region == old
    (line,) = cfg.warnings
    assert line.startswith(f"node.region = {old!r}" if old.lower() != "unset" else 'node.region = "unset"')
    assert 'region = "DE"' in line and 'region = ""' in line
    r = agent("check-config", str(f))
    assert r.returncode == 0 and "deprecated" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("bad", ["Berlin Mitte", "a/b", "x" * 65, 5, "é"])
def test_a_region_that_never_was_valid_is_an_error_naming_the_key(tmp_path, bad):
    value = json.dumps(bad) if isinstance(bad, str) else str(bad)
    r = agent("check-config", str(node_toml(tmp_path, f"region = {value}")))
    assert r.returncode == 2 and "node.region: expected an ISO 3166-1 alpha-2 country code" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_a_marketplace_without_a_region_is_one_line_naming_the_key_and_the_fix(tmp_path):
    f = node_toml(tmp_path, 'marketplace = "https://hub.example"')
    r = agent("check-config", str(f))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"{f}: node.region: expected the node's country") and "got none" in r.stderr
    assert 'set region = "DE"' in r.stderr and "agent_region" in r.stderr and "unit.yml" in r.stderr
    # a golden image: its units' stamps may still give the region
    r = agent("check-config", "--before-stamp", str(f))
    assert r.returncode == 0 and "note: marketplace https://hub.example without a region" in r.stdout, r.stderr
    # the unit's stamp gives it: complete
    f = node_toml(tmp_path, 'marketplace = "https://hub.example"', 'region = "at"\n')
    r = agent("check-config", str(f))
    assert r.returncode == 0, r.stderr
    assert "region = 'AT' replaces node.region ('')" in r.stdout


def test_the_units_market_facts_replace_node_tomls(tmp_path):
    f = node_toml(tmp_path, 'marketplace = "http://old.example"\nregion = "FR"',
                  'marketplace = "https://hub.example"\nregion = "DE"\n')
    cfg = config.load(f)
    assert (cfg.marketplace, cfg.region) == ("https://hub.example", "DE")
    assert cfg.unit.notes == ["marketplace = 'https://hub.example' replaces node.marketplace ('http://old.example')",
                              "region = 'DE' replaces node.region ('FR')"]
    # not stamped: node.toml's stand
    f = node_toml(tmp_path, 'marketplace = "http://old.example"\nregion = "FR"', "")
    cfg = config.load(f)
    assert (cfg.marketplace, cfg.region, cfg.unit.notes) == ("http://old.example", "FR", [])
    # a unit file is strict: no old names there
    f = node_toml(tmp_path, "", 'region = "eu-west"\n')
    with pytest.raises(config.ConfigError) as exc:
        config.load(f)
    assert str(exc.value) == (f"{tmp_path / 'unit.toml'}: region: expected an ISO 3166-1 alpha-2 country code such "
                              "as DE, US or GB (not UK), or \"\" for none, got 'eu-west'")


def test_stamp_consume_and_apply_marketplace_and_region(tmp_path):
    """unit.yml → stamp.toml → first boot's unit.toml → the agent's config, the node.toml of a role that
    set other values (the stamp wins)."""
    src = tmp_path / "unit.yml"
    src.write_text("unit: shop-0001\nmarketplace: https://hub.example:8443\nregion: de\n")
    unit = load_unit(src)
    assert (unit.marketplace, unit.region, unit.payout_address) == ("https://hub.example:8443", "DE", None)
    pem, pub = host_stamp.node_key(unit)
    stamp = host_stamp.stamp_toml(unit, pub).decode()
    assert 'marketplace = "https://hub.example:8443"\n' in stamp and 'region = "DE"\n' in stamp
    boot, root = tmp_path / "boot", tmp_path / "root"
    (boot / "idlewire").mkdir(parents=True)
    (boot / "idlewire" / "stamp.toml").write_text(stamp)
    (boot / "idlewire" / "node.key").write_bytes(pem)
    (root / "etc").mkdir(parents=True)
    assert consume(str(boot), str(root), "root") == 0
    unit_toml = (root / "etc" / "idlewire" / "unit.toml").read_text()
    assert 'marketplace = "https://hub.example:8443"\n' in unit_toml and 'region = "DE"\n' in unit_toml
    node = tmp_path / "node.toml"
    node.write_text(f'[node]\nmarketplace = ""\nregion = "FR"\nunit_file = "{root}/etc/idlewire/unit.toml"\n')
    cfg = config.load(node)
    assert (cfg.marketplace, cfg.region) == ("https://hub.example:8443", "DE")
    assert config.market_problem(cfg) is None


def test_units_csv_columns_marketplace_and_region(tmp_path):
    f = tmp_path / "units.csv"
    f.write_text("unit,marketplace,region\na1,https://hub.example,de\na2,,\na3,http://hub.example,UK\n")
    with pytest.raises(UserError) as exc:
        load_units(f)
    assert str(exc.value).startswith(f"{f}: row 4: field 'region': expected an ISO 3166-1 alpha-2 country code")
    f.write_text("unit,marketplace,region\na1,https://hub.example,de\na2,,\n")
    a1, a2 = load_units(f)
    assert (a1.marketplace, a1.region) == ("https://hub.example", "DE")
    assert (a2.marketplace, a2.region) == (None, None)  # blank: not stamped, the image's node.toml stands
    assert "marketplace" not in host_stamp.stamp_values(a2, "x") and "region" not in host_stamp.stamp_values(a2, "x")


def test_every_unit_field_is_in_the_stamp_help_and_the_examples():
    """The help, the example unit.yml and units.csv list every field of the schema."""
    r = subprocess.run([sys.executable, "-m", "idlewire", "stamp", "--help"], capture_output=True, text=True,
                       timeout=60, env={"PYTHONPATH": f"{ROOT / 'tools'}:{ROOT / 'agent'}", "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    helptext = " ".join(r.stdout.split())
    for col in schema.csv_columns():
        assert col in helptext, col
    assert (ROOT / "units.example.csv").read_text().splitlines()[0].split(",") == list(schema.csv_columns())
    example = (ROOT / "unit.example.yml").read_text()
    for name in schema.UNIT_INPUT:
        assert f"\n{name}:" in example or f"\n# {name}:" in example, name
    assert load_unit(ROOT / "unit.example.yml").region == "DE"


def test_the_client_and_the_hub_check_a_region_with_the_nodes_key():
    from idlewire.hub import service

    assert service.checked(service.REGION, "region", "de", required=True) == "DE"
    for bad in ("UK", "XX", "", "eu-west"):
        with pytest.raises(service.HubError) as exc:
            service.checked(service.REGION, "region", bad, required=True)
        assert exc.value.status == 422 and exc.value.message.startswith("region: expected ")
    assert service.checked(service.LOCATION, "location", " Berlin (Mitte) ") == "Berlin (Mitte)"
    with pytest.raises(service.HubError):
        service.checked(service.LOCATION, "location", "Main St 1\n<script>")
