"""The network's rules: one typed config, loaded once from TOML or YAML and passed down.

Every key has a default (`Rules()` is the reference network); a file overrides what it names.
A wrong key or value is one line naming the key and what is expected, e.g.
`rules.toml: staking.min_stake: expected a whole number ≥ 0, got -5`.

Units: token amounts in base units (1 token = 10**decimals base units), fractions in ppm
(1_000_000 = 100 %), prices in micro-USD, durations in epochs or seconds as named.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from idlewire_agent.config import MeteringConfig

from . import PPM


class RulesError(ValueError):
    """A rules file the loader refuses; str() is the one line to show the user."""


@dataclass(frozen=True)
class Emission:
    """Tokens minted per epoch: `base` halves every `halving_epochs`; a bootstrap boost multiplies it by
    `bootstrap_boost_ppm` at epoch 0, declining linearly to 1x at `bootstrap_epochs`."""

    base: int = 100_000 * 10**6            # base units per epoch before any halving
    halving_epochs: int = 4 * 365
    bootstrap_boost_ppm: int = 3 * PPM     # 3x at genesis ...
    bootstrap_epochs: int = 180            # ... down to 1x after this many epochs
    # What happens to emission that no eligible node earned (no verified usage, rounding dust):
    # "carry" adds it to the next epoch's pool; "drop" leaves it unminted for good.
    unallocated: str = "carry"


@dataclass(frozen=True)
class Staking:
    min_stake: int = 1_000 * 10**6         # bonded base units a node needs to earn
    unbonding_epochs: int = 14             # unbonded stake stays slashable this long
    # Fraction of bonded (and unbonding) stake taken per offence, ppm.
    slash_equivocation_ppm: int = 500_000
    slash_forged_usage_ppm: int = 500_000
    slash_inflated_usage_ppm: int = 200_000
    slash_failed_probes_ppm: int = 50_000
    # Inflated usage (the node signed more than the buyer co-signed, beyond tolerance) costs stake only
    # when that many different buyers disagree with the node in one epoch, or the hub's prober does:
    # one stingy buyer must not be able to get an honest node slashed.
    inflated_min_buyers: int = 3


@dataclass(frozen=True)
class Probes:
    pass_throughput_ppm: int = 800_000     # a probe passes at ≥ 80 % of the advertised cap ...
    max_latency_ms: int = 250              # ... and at most this round-trip latency
    slash_after_failures: int = 3          # failed probes in one epoch that cost stake
    heartbeat_seconds: int = 60            # expected heartbeat interval (uptime = heartbeats seen / expected)
    prober_buyer: str = "prober"           # the buyer id the hub's prober buys probe sessions as


@dataclass(frozen=True)
class Reputation:
    initial_ppm: int = 500_000             # a new node starts at 0.5
    # New reputation = old * decay + epoch score * (1 - decay): the weight of history per epoch.
    decay_ppm: int = 900_000
    floor_ppm: int = 10_000                # reputation never multiplies a reward below 1 %


@dataclass(frozen=True)
class Regions:
    min_multiplier_ppm: int = PPM          # 1x ...
    max_multiplier_ppm: int = 3 * PPM      # ... 3x


@dataclass(frozen=True)
class Market:
    decimals: int = 6
    price_per_gb_micro_usd: int = 500_000  # buyers pay $0.50 per GB, burned at the oracle price
    # Node and buyer counts of one session may differ by this much and still count as verified: by
    # default what a node itself accepts as agreement (node.toml [metering] tolerance_percent), so a
    # node running the defaults never signs what the network calls inflated.
    tolerance_ppm: int = round(MeteringConfig().tolerance_percent * 10_000)
    tolerance_bytes: int = 1 << 20


@dataclass(frozen=True)
class GenesisAccount:
    account: str
    amount: int


@dataclass(frozen=True)
class Rules:
    name: str = "idlewire-reference"
    epoch_seconds: int = 86_400
    emission: Emission = field(default_factory=Emission)
    staking: Staking = field(default_factory=Staking)
    probes: Probes = field(default_factory=Probes)
    reputation: Reputation = field(default_factory=Reputation)
    regions: Regions = field(default_factory=Regions)
    market: Market = field(default_factory=Market)
    genesis: tuple[GenesisAccount, ...] = (
        GenesisAccount("treasury", 50_000_000 * 10**6),
        GenesisAccount("market", 50_000_000 * 10**6),
    )

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        """SHA-256 of the canonical rules: every statement names the rules it was settled under."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_CHOICES = {"emission.unallocated": ("carry", "drop")}
_MAX = {"bootstrap_boost_ppm": 100 * PPM, "max_multiplier_ppm": 100 * PPM, "decimals": 18}
_PPM_FRACTIONS = ("slash_", "pass_throughput_ppm", "tolerance_ppm", "decay_ppm", "initial_ppm", "floor_ppm")


def _bad(where: str, key: str, want: str, got: Any) -> RulesError:
    return RulesError(f"{where}: {key}: expected {want}, got {got!r}")


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise _bad(where, prefix.rstrip(".") or "(top level)", "a table", data)
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise RulesError(f"{where}: {prefix}{key}: unknown key (known: {', '.join(sorted(known))})")
    kw = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        key, value, kind = prefix + f.name, data[f.name], hints[f.name]
        if is_dataclass(kind):
            kw[f.name] = _build(kind, value, where, key + ".")
        elif f.name == "genesis":
            if not isinstance(value, list):
                raise _bad(where, key, "a list of {account, amount}", value)
            kw[f.name] = tuple(_build(GenesisAccount, v, where, f"{key}[{i}].") for i, v in enumerate(value))
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _bad(where, key, "a whole number ≥ 0", value)
            if f.name.endswith("_ppm") and f.name.startswith(_PPM_FRACTIONS) and value > PPM:
                raise _bad(where, key, f"a fraction in ppm from 0 to {PPM}", value)
            if f.name in _MAX and value > _MAX[f.name]:
                raise _bad(where, key, f"at most {_MAX[f.name]}", value)
            kw[f.name] = value
        elif kind is str:
            if not isinstance(value, str) or not value.isprintable() or not value:
                raise _bad(where, key, "a non-empty printable string", value)
            if key in _CHOICES and value not in _CHOICES[key]:
                raise _bad(where, key, " or ".join(_CHOICES[key]), value)
            kw[f.name] = value
        else:  # pragma: no cover - a field type this loader does not know
            raise TypeError(f"rules: {key}: unsupported type {kind}")
    return cls(**kw)


def _check(r: Rules, where: str) -> Rules:
    positive = {"epoch_seconds": r.epoch_seconds, "emission.halving_epochs": r.emission.halving_epochs,
                "probes.heartbeat_seconds": r.probes.heartbeat_seconds}
    for key, value in positive.items():
        if value <= 0:
            raise _bad(where, key, "a whole number ≥ 1", value)
    if r.emission.bootstrap_boost_ppm < PPM:
        raise _bad(where, "emission.bootstrap_boost_ppm", f"≥ {PPM} (1x: no boost)", r.emission.bootstrap_boost_ppm)
    if not PPM <= r.regions.min_multiplier_ppm <= r.regions.max_multiplier_ppm:
        raise RulesError(f"{where}: regions: expected {PPM} ≤ min_multiplier_ppm ≤ max_multiplier_ppm, got "
                         f"{r.regions.min_multiplier_ppm} and {r.regions.max_multiplier_ppm}")
    seen = set()
    for i, g in enumerate(r.genesis):
        if g.account in seen:
            raise RulesError(f"{where}: genesis[{i}].account: {g.account!r} appears twice")
        if g.account in ("mint", "burn"):
            raise RulesError(f"{where}: genesis[{i}].account: {g.account!r} is a system account; name another")
        seen.add(g.account)
    return r


def parse_rules(data: Any, where: str = "rules") -> Rules:
    return _check(_build(Rules, data, where, ""), where)


def load_rules(path: Path | str | None) -> Rules:
    """The rules in PATH (.toml, .yml/.yaml or .json), or the reference rules for None."""
    if path is None:
        return Rules()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RulesError(f"{path}: no such rules file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"{path}: cannot read it ({exc})") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yml", ".yaml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise RulesError(f"{path}: unknown rules format; name it .toml, .yml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, RulesError):
            raise
        raise RulesError(f"{path}: not valid {path.suffix[1:].upper()}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # yaml.YAMLError without importing yaml up front
        raise RulesError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_rules(data if data is not None else {}, str(path))


# -- the schedule -------------------------------------------------------------------------------------


def emission_for(rules: Rules, epoch: int) -> int:
    """The tokens the schedule mints in EPOCH (before any carry from earlier epochs)."""
    e = rules.emission
    base = e.base >> min(epoch // e.halving_epochs, 255)
    left = max(0, e.bootstrap_epochs - epoch)
    boost = PPM if e.bootstrap_epochs == 0 else PPM + (e.bootstrap_boost_ppm - PPM) * left // e.bootstrap_epochs
    return base * boost // PPM
