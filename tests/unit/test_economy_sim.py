"""The economy's edges a user touches: the rules file, the price file, `idlewire economy` and the
simulator (seeded, so the same run twice gives the same statements)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from idlewire.economy import simulate as sim
from idlewire.economy.pricefeed import FilePriceFeed, PriceError
from idlewire.economy.rules import Rules, RulesError, load_rules

EXAMPLE = Path(sim.__file__).with_name("rules.example.toml")


def idlewire(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "idlewire", *argv], capture_output=True, text=True, check=False)


def test_the_example_rules_file_is_the_reference_network():
    assert load_rules(EXAMPLE) == Rules()
    assert load_rules(None) == Rules()


def test_rules_in_yaml_and_json_override_what_they_name(tmp_path):
    (tmp_path / "r.yml").write_text("staking:\n  min_stake: 5\ngenesis:\n  - {account: ops, amount: 7}\n")
    r = load_rules(tmp_path / "r.yml")
    assert r.staking.min_stake == 5 and r.staking.unbonding_epochs == Rules().staking.unbonding_epochs
    assert [(g.account, g.amount) for g in r.genesis] == [("ops", 7)]
    (tmp_path / "r.json").write_text('{"regions": {"max_multiplier_ppm": 2000000}}')
    assert load_rules(tmp_path / "r.json").regions.max_multiplier_ppm == 2_000_000
    assert Rules().digest() != r.digest()


@pytest.mark.parametrize("name, text, words", [
    ("r.toml", "[staking]\nmin_stake = -5\n", "staking.min_stake: expected a whole number ≥ 0, got -5"),
    ("r.toml", "[staking]\nmin_stak = 5\n", "staking.min_stak: unknown key (known: inflated_min_buyers, min_stake,"),
    ("r.toml", "[staking]\nslash_equivocation_ppm = 2000000\n", "staking.slash_equivocation_ppm: expected a "
                                                                 "fraction in ppm from 0 to 1000000"),
    ("r.toml", "[emission]\nunallocated = \"burn\"\n", "emission.unallocated: expected carry or drop, got 'burn'"),
    ("r.toml", "[regions]\nmin_multiplier_ppm = 4000000\n", "regions: expected 1000000 ≤ min_multiplier_ppm"),
    ("r.toml", "epoch_seconds = 0\n", "epoch_seconds: expected a whole number ≥ 1, got 0"),
    ("r.toml", "staking = 3\n", "staking: expected a table, got 3"),
    ("r.toml", "[market]\ndecimals = true\n", "market.decimals: expected a whole number ≥ 0, got True"),
    ("r.toml", "[[genesis]]\naccount = \"mint\"\namount = 1\n", "genesis[0].account: 'mint' is a system account"),
    ("r.toml", "[[genesis]]\naccount = \"a\"\namount = 1\n[[genesis]]\naccount = \"a\"\namount = 2\n",
     "genesis[1].account: 'a' appears twice"),
    ("r.toml", "[[genesis]]\naccount = \"a\x1b[2J\"\namount = 1\n", "not valid TOML"),
    ("r.toml", "name = [\n", "not valid TOML"),
    ("r.yml", "staking: [1, 2\n", "not valid YAML"),
    ("r.yml", "name: \"a\\tb\"\n", "name: expected a non-empty printable string"),
    ("r.ini", "x", "unknown rules format; name it .toml, .yml or .json"),
])
def test_a_bad_rules_file_is_one_line_naming_the_key(tmp_path, name, text, words):
    (tmp_path / name).write_text(text)
    with pytest.raises(RulesError) as e:
        load_rules(tmp_path / name)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(str(tmp_path / name))


def test_the_price_file_gives_the_last_price_at_or_before_an_epoch(tmp_path):
    f = tmp_path / "price.csv"
    f.write_text("# epoch,usd\n0,0.25\n10, 0.5 # a comment\n")
    feed = FilePriceFeed(f)
    assert [feed.price_at(e) for e in (0, 9, 10, 500)] == [250_000, 250_000, 500_000, 500_000]
    f.write_text("0,0.25\n3;0.5\n")
    with pytest.raises(PriceError, match=r"price.csv:2: expected 'EPOCH,PRICE_USD'"):
        FilePriceFeed(f)
    for bad in ("0,0\n", "0,-1\n", "0,NaN\n", "0,inf\n", "-1,1\n"):
        f.write_text(bad)
        with pytest.raises(PriceError):
            FilePriceFeed(f)
    f.write_text("5,1\n")
    with pytest.raises(PriceError, match="no price at or before epoch 2"):
        FilePriceFeed(f).price_at(2)
    with pytest.raises(PriceError, match="no such price file"):
        FilePriceFeed(tmp_path / "missing")


def test_the_simulation_is_reproducible_and_keeps_the_books():
    cfg = sim.SimConfig(nodes=120, epochs=12, seed=7)
    a, b = sim.run(Rules(), cfg), sim.run(Rules(), cfg)
    assert [r["statement"] for r in a.rows] == [r["statement"] for r in b.rows]
    other = sim.run(Rules(), sim.SimConfig(nodes=120, epochs=12, seed=8))
    assert other.rows[-1]["statement"] != a.rows[-1]["statement"]
    for prev, row in zip(a.rows, a.rows[1:], strict=False):
        assert row["supply"] - prev["supply"] == pytest.approx(row["minted"] - row["burned"], abs=1e-6)
    assert sum(r["slashes"] for r in a.rows) > 0   # the cheaters are caught
    assert all(1.0 <= m <= 3.0 for r in a.rows for m in r["multipliers"].values())
    assert max(r["multipliers"]["NG"] for r in a.rows) > 1.0   # the underserved region pays more


def test_simulate_prints_a_table_writes_the_plots_and_json(tmp_path):
    r = idlewire("economy", "simulate", "--nodes", "60", "--epochs", "6", "--out", str(tmp_path / "plots"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[:3] == ["epoch", "nodes", "price"]
    for name in sim.PLOTS:
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"plot: {png}" in r.stdout
    assert not list((tmp_path / "plots").glob(".*"))   # no temp files left
    j = idlewire("economy", "simulate", "--nodes", "60", "--epochs", "6", "--json")
    data = json.loads(j.stdout)
    assert len(data["epochs"]) == 6 and data["config"]["nodes"] == 60 and j.stderr == ""


def test_economy_commands_refuse_bad_input_in_one_line(tmp_path):
    (tmp_path / "r.toml").write_text("[staking]\nmin_stake = \"lots\"\n")
    r = idlewire("economy", "simulate", "--rules", str(tmp_path / "r.toml"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (f"error: {tmp_path / 'r.toml'}: staking.min_stake: expected a whole number ≥ 0, "
                                "got 'lots'")
    (tmp_path / "file").write_text("")
    r = idlewire("economy", "simulate", "--epochs", "1", "--out", str(tmp_path / "file"))
    assert r.returncode == 2 and "exists and is not a directory" in r.stderr
    r = idlewire("economy", "rules", "--rules", str(EXAMPLE), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["digest"] == Rules().digest()


def test_sell_share_is_a_flag_and_moves_the_price():
    """--sell-share: the share of their rewards owners sell each epoch (0.6 by default); owners who
    hold everything leave buyers to bid the price up, owners who sell everything push it down."""
    for bad, words in (("1.5", "expected a number from 0 to 1, got 1.5"),
                       ("-0.1", "expected a number from 0 to 1, got -0.1"), ("nan", "expected a number, got 'nan'")):
        r = idlewire("economy", "simulate", "--epochs", "1", "--sell-share", bad)
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"--sell-share: {words}" in r.stderr
    last = {}
    for share in ("0", "1"):
        j = idlewire("hub", "simulate", "--nodes", "80", "--epochs", "8", "--sell-share", share, "--json")
        data = json.loads(j.stdout)
        assert data["config"]["sell"] == float(share)
        last[share] = data["epochs"][-1]["price_usd"]
    assert last["0"] > sim.SimConfig().price_usd > last["1"]
