"""`idlewire economy`: the network's rules and the simulator (`idlewire hub simulate` is the same command)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from .clikit import App, Opt
from .errors import UserError


def _rules(path: Path | None):
    from .economy.rules import RulesError, load_rules

    try:
        return load_rules(path)
    except RulesError as exc:
        raise UserError(str(exc)) from None


def register(app: App) -> None:
    group = App(help="The economy: rules, burn-and-mint settlement, the simulator.")
    app.add_group(group, "economy")

    @group.command()
    def rules(
        rules_file: Annotated[Path | None, Opt("--rules", "-r", help="Rules file (.toml, .yml, .json); "
                                               "without it the reference network's rules.")] = None,
        as_json: Annotated[bool, Opt("--json", help="Print the rules as JSON.")] = False,
    ):
        """Show the rules in force (every default filled in) and the first epochs of the emission schedule.

        Token amounts are base units (1 token = 10^decimals), fractions ppm (1000000 = 100 %).
        Example:  idlewire economy rules --rules network.toml
        """
        from .economy.rules import emission_for

        r = _rules(rules_file)
        if as_json:
            print(json.dumps({"rules": r.to_dict(), "digest": r.digest()}, indent=1))
            return
        print(json.dumps(r.to_dict(), indent=1))
        dec = 10**r.market.decimals
        print(f"rules digest {r.digest()}")
        for e in (0, 30, 90, r.emission.bootstrap_epochs, 365, r.emission.halving_epochs):
            print(f"  emission at epoch {e:5}: {emission_for(r, e) / dec:,.6f} tokens")

    group.command("simulate")(simulate_command)


def simulate_command(
    nodes: Annotated[int, Opt("--nodes", "-n", min=1, max=1_000_000, help="Nodes at genesis.")] = 1000,
    epochs: Annotated[int, Opt("--epochs", "-e", min=1, max=100_000, help="Epochs to run.")] = 90,
    seed: Annotated[int, Opt("--seed", min=0, help="Seed of the population (same seed, same run).")] = 1,
    rules_file: Annotated[Path | None, Opt("--rules", "-r", help="Rules file (.toml, .yml, .json).")] = None,
    out: Annotated[Path | None, Opt("--out", "-o", help="Directory for the PNG plots "
                                    "(supply, burned vs minted, price, nodes per region, multipliers).")] = None,
    growth: Annotated[float, Opt("--growth", min=-0.5, max=0.5, help="Demand growth per epoch.")] = 0.005,
    churn: Annotated[float, Opt("--churn", min=0, max=1, help="Share of nodes leaving per epoch.")] = 0.004,
    cheaters: Annotated[float, Opt("--cheaters", min=0, max=1, help="Share of new nodes that cheat "
                                   "(half fake their speed, half inflate usage).")] = 0.05,
    sell_share: Annotated[float, Opt("--sell-share", min=0, max=1, help="Share of its reward an owner sells "
                                     "to the market each epoch (what buyers can buy back, so the price and "
                                     "the supply in circulation).")] = 0.6,
    as_json: Annotated[bool, Opt("--json", help="Print every epoch's row as JSON on stdout.")] = False,
):
    """Run the settlement code on a seeded population for N epochs: a table, plots, JSON.

    The population has regions with different shares of nodes and of demand (some underserved),
    a demand curve (growth plus a weekly swing), cheaters (fake speeds fail probes; inflated usage
    is slashed with the receipts as evidence), churn (new nodes join where rewards per node are
    highest) and a token market (owners sell --sell-share of their rewards; buyers buy what they burn;
    the price moves with the tokens buyers want against the tokens owners sell). Every epoch is settled by the same
    function the hub calls, into a signed statement.

    Example:  idlewire economy simulate --nodes 10000 --epochs 365 --out sim/
    """
    from .economy import simulate as sim

    cfg = sim.SimConfig(nodes=nodes, epochs=epochs, seed=seed, growth=growth, churn=churn,
                        fake_speed=cheaters * 0.6, inflaters=cheaters * 0.4, sell=sell_share)
    r = _rules(rules_file)
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory; name a directory for the plots")
    result = sim.run(r, cfg, progress=None if as_json else sim.progress_printer())
    paths = sim.plot(result, out) if out is not None else []
    if as_json:
        print(json.dumps({"config": vars(cfg), "rules_digest": r.digest(), "seconds": round(result.seconds, 2),
                          "cpu_seconds": round(result.cpu_seconds, 2), "plots": [str(p) for p in paths],
                          "epochs": result.rows}, indent=1))
        return
    print(sim.table(result))
    print(f"{epochs} epochs of {nodes} nodes settled in {result.seconds:.1f} s "
          f"({result.cpu_seconds:.1f} s CPU)")
    for p in paths:
        print(f"  plot: {p}")
