"""The economy's pure core: invariants as properties (hypothesis), the formulas to the last unit,
slashing with evidence, Merkle inclusion proofs a node checks, the rules loader's errors."""

from __future__ import annotations

import copy
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from idlewire.economy import PPM
from idlewire.economy.ledger import BURN, MINT, SLASHED, MemoryLedger, Overdraft, apply_genesis, supply
from idlewire.economy.proof import COSIGNED, EQUIVOCATION, FORGED, UNSIGNED, NodeReport, Offence, Probe, Usage
from idlewire.economy.rules import Rules, emission_for
from idlewire.economy.settle import EconomyState, EpochInputs, _leaf_hash, reward_leaf, settle
from idlewire.economy.staking import bond, stake_account, unbond, unbonding_account
from idlewire_agent import merkle

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
RULES = Rules()
GB = 10**9
MIN = RULES.staking.min_stake
FULL_HB = RULES.epoch_seconds // RULES.probes.heartbeat_seconds
PRICE = 250_000  # $0.25 per token


def fresh(rules: Rules = RULES) -> MemoryLedger:
    ledger = MemoryLedger()
    apply_genesis(ledger, rules)
    return ledger


def fund(ledger: MemoryLedger, account: str, amount: int) -> None:
    ledger.transfer(0, "transfer", "market", account, amount)


def staked(ledger: MemoryLedger, node: str, amount: int = MIN) -> None:
    fund(ledger, f"payout:{node}", amount)
    if amount:
        bond(ledger, 0, node, f"payout:{node}", amount)


def report(node: str, region: str = "DE", cap: int = 100, hb: int = FULL_HB) -> NodeReport:
    return NodeReport(node, region, node, cap, hb)


# -- a random epoch -----------------------------------------------------------------------------------

NODES = [f"node{i}" for i in range(8)]


@st.composite
def worlds(draw):
    """A ledger with stakes and buyer balances, and an epoch's inputs (some cheating, some offline)."""
    n = draw(st.integers(1, len(NODES)))
    nodes = NODES[:n]
    stakes = {x: draw(st.sampled_from([0, MIN // 2, MIN, 3 * MIN])) for x in nodes}
    reports = [report(x, draw(st.sampled_from(["DE", "KE", "US"])), draw(st.sampled_from([10, 100, 1000])),
                      draw(st.sampled_from([0, FULL_HB // 3, FULL_HB])))
               for x in nodes if draw(st.booleans()) or x == nodes[0]]
    usage = []
    for i in range(draw(st.integers(0, 20))):
        node = draw(st.sampled_from(nodes))
        buyer_bytes = draw(st.integers(0, 50 * GB))
        node_bytes = draw(st.sampled_from([buyer_bytes, buyer_bytes + 1000, buyer_bytes * 2, buyer_bytes // 2]))
        status = draw(st.sampled_from([COSIGNED, COSIGNED, COSIGNED, UNSIGNED, FORGED]))
        usage.append(Usage(f"r{i}", node, draw(st.sampled_from(["b1", "b2"])), node_bytes, buyer_bytes, status))
    probes = [Probe(f"p{i}", draw(st.sampled_from(nodes)), draw(st.booleans()), draw(st.integers(0, 200)), 100,
                    draw(st.sampled_from([20, 500])))
              for i in range(draw(st.integers(0, 12)))]
    offences = [Offence(x, EQUIVOCATION, (f"r-eq-{x}",)) for x in nodes if draw(st.integers(0, 9)) == 0]
    buyers = {b: draw(st.sampled_from([0, 10**6, 10**12])) for b in ("b1", "b2")}
    unbonds = {x: draw(st.sampled_from([0, stakes[x] // 2])) for x in nodes}
    return nodes, stakes, buyers, unbonds, EpochInputs(reports, usage, probes, offences,
                                                       {"KE": draw(st.integers(0, 10 * GB))})


def setup(world, rules: Rules = RULES):
    nodes, stakes, buyers, unbonds, inputs = world
    ledger, state = fresh(rules), EconomyState()
    for x in nodes:
        staked(ledger, x, stakes[x])
        if unbonds[x]:
            unbond(rules, ledger, state.unbonding, 0, x, unbonds[x], f"payout:{x}")
    for b, amount in buyers.items():
        fund(ledger, f"buyer:{b}", amount)
    return ledger, state, copy.deepcopy(inputs)


PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(worlds())
def test_supply_changes_by_minted_minus_burned_and_rewards_sum_to_the_pool(world):
    ledger, state, inputs = setup(world)
    state.carry = 12_345
    before = supply(ledger)
    res = settle(RULES, state, inputs, PRICE, ledger, KEY)
    s = res.statement
    assert supply(ledger) - before == s["minted"] - s["burned"]
    assert s["burned"] == ledger.balance(BURN) and s["supply"] == supply(ledger)
    rewards = sum(r.reward for r in res.nodes.values())
    pool = emission_for(RULES, 0) + 12_345
    assert rewards == s["minted"] <= pool
    assert s["carried_out"] == pool - rewards   # the rest is carried, as emission.unallocated = "carry" says
    if any(r.weight for r in res.nodes.values()):
        assert pool - rewards < len(res.nodes)  # only rounding dust is left over: < 1 unit per node
    assert sum(ledger.accounts().values()) == 0   # double entry


@PROPS
@given(worlds())
def test_no_reward_without_verified_receipts_and_no_negative_balance(world):
    ledger, state, inputs = setup(world)
    res = settle(RULES, state, inputs, PRICE, ledger, KEY)
    counted = {u.node for u in inputs.usage if u.status == COSIGNED and u.buyer_bytes and u.node_bytes
               and abs(u.node_bytes - u.buyer_bytes) <= max(RULES.market.tolerance_bytes,
                                                            max(u.node_bytes, u.buyer_bytes) * 2 // 100)}
    offended = {s["node"] for s in res.statement["slashes"]}
    for r in res.nodes.values():
        if r.reward:
            assert r.node in counted and r.node not in offended and r.verified_bytes > 0
            assert ledger.balance(stake_account(r.node)) >= MIN
    for account, balance in ledger.accounts().items():
        assert balance >= 0 or account == MINT, account


@PROPS
@given(worlds(), st.randoms(use_true_random=False))
def test_settlement_is_deterministic_whatever_the_input_order(world, rnd):
    a_ledger, a_state, a_in = setup(world)
    b_ledger, b_state, b_in = setup(world)
    for seq in (b_in.nodes, b_in.usage, b_in.probes, b_in.offences):
        rnd.shuffle(seq)
    a = settle(RULES, a_state, a_in, PRICE, a_ledger, KEY)
    b = settle(RULES, b_state, b_in, PRICE, b_ledger, KEY)
    assert a.hash == b.hash and a.statement == b.statement
    assert a_ledger.accounts() == b_ledger.accounts()


@PROPS
@given(worlds())
def test_stakes_never_go_negative_over_many_epochs_of_slashing(world):
    ledger, state, inputs = setup(world)
    for _ in range(RULES.staking.unbonding_epochs + 3):
        settle(RULES, state, copy.deepcopy(inputs), PRICE, ledger, KEY)
        for account, balance in ledger.accounts().items():
            assert balance >= 0 or account == MINT, account
        assert all(u.amount >= 0 for u in state.unbonding)
    assert not state.unbonding   # released once the unbonding period is over


@PROPS
@given(worlds())
def test_every_rewarded_node_can_prove_its_inclusion(world):
    ledger, state, inputs = setup(world)
    res = settle(RULES, state, inputs, PRICE, ledger, KEY)
    for r in res.rewarded:
        leaf, proof = res.inclusion_proof(r.node)
        assert leaf["reward"] == r.reward
        assert merkle.check_reward(res.statement, leaf, proof, r.node, merkle_key()) is None
    for r in res.nodes.values():
        if not r.reward:
            with pytest.raises(KeyError):
                res.inclusion_proof(r.node)


def merkle_key() -> str:
    from idlewire.economy.settle import public_b64

    return public_b64(KEY)


# -- the formulas, to the last unit ---------------------------------------------------------------------


def test_an_honest_nodes_reward_is_the_formula_to_the_last_unit():
    ledger, state = fresh(), EconomyState()
    for x in ("a", "b", "c"):
        staked(ledger, x)
    fund(ledger, "buyer:B", 10**12)
    inputs = EpochInputs(
        [report("a", "DE", 100), report("b", "DE", 100, FULL_HB // 2), report("c", "KE", 50)],
        [Usage("ra", "a", "B", 10 * GB, 10 * GB), Usage("rb", "b", "B", 7 * GB, 7 * GB + 5000),
         Usage("rc", "c", "B", 3 * GB, 3 * GB)],
        [Probe("pa", "a", True, 90, 100, 30), Probe("pb", "b", True, 85, 100, 30),
         Probe("pb2", "b", True, 10, 100, 30)],
    )
    res = settle(RULES, state, inputs, PRICE, ledger, KEY)
    # by hand: demand DE 17 GB / supply 200 Mbit, KE 3 GB / 50 Mbit; network 20 GB / 250 Mbit
    mult_de = (17 * GB) * 250 * PPM // (200 * 20 * GB)
    mult_ke = (3 * GB) * 250 * PPM // (50 * 20 * GB)
    assert res.statement["multipliers"] == {"DE": max(PPM, mult_de), "KE": max(PPM, mult_ke)}
    mult_de, mult_ke = max(PPM, mult_de), max(PPM, mult_ke)
    up_a, up_b, up_c = PPM, (FULL_HB // 2) * PPM // FULL_HB * 1 // 2, PPM   # b passed 1 of 2 probes
    agree_b = PPM - 5000 * PPM // (7 * GB)
    rep = {x: (RULES.reputation.initial_ppm * RULES.reputation.decay_ppm + score * (PPM - RULES.reputation.decay_ppm))
           // PPM for x, score in (("a", up_a), ("b", up_b * agree_b // PPM), ("c", up_c))}
    w = {"a": 10 * GB * mult_de * rep["a"] * up_a, "b": 7 * GB * mult_de * rep["b"] * up_b,
         "c": 3 * GB * mult_ke * rep["c"] * up_c}
    pool = emission_for(RULES, 0)
    for x in w:
        assert res.nodes[x].reputation_ppm == rep[x]
        assert res.nodes[x].reward == pool * w[x] // sum(w.values()), x
        assert ledger.balance(f"payout:{x}") == res.nodes[x].reward
    # and the buyer burned its verified usage at the oracle price
    verified = 10 * GB + 7 * GB + 3 * GB
    assert res.statement["burned"] == verified * RULES.market.price_per_gb_micro_usd // GB * 10**6 // PRICE


def test_two_equal_nodes_earn_in_the_ratio_of_their_regions_multipliers():
    ledger, state = fresh(), EconomyState()
    for x in ("a", "b", "k"):
        staked(ledger, x)
    fund(ledger, "buyer:B", 10**12)
    inputs = EpochInputs([report("a", "DE"), report("b", "DE"), report("k", "KE")],
                         [Usage("ra", "a", "B", 5 * GB, 5 * GB), Usage("rb", "b", "B", 5 * GB, 5 * GB),
                          Usage("rk", "k", "B", 5 * GB, 5 * GB)],
                         unserved={"KE": 20 * GB})
    res = settle(RULES, state, inputs, PRICE, ledger, KEY)
    m = res.statement["multipliers"]
    assert m["DE"] == PPM and PPM < m["KE"] <= RULES.regions.max_multiplier_ppm
    a, k = res.nodes["a"].reward, res.nodes["k"].reward
    assert abs(k * PPM - a * m["KE"]) <= m["KE"]   # the ratio, up to one unit of rounding
    assert res.nodes["a"].reward == res.nodes["b"].reward


def test_multipliers_are_bounded_and_a_region_without_supply_gets_the_maximum():
    from idlewire.economy.scores import multipliers

    m = multipliers(RULES, {"DE": GB, "KE": 1000 * GB, "NG": GB}, {"DE": 1000, "KE": 1})
    assert m == {"DE": PPM, "KE": 3 * PPM, "NG": 3 * PPM}
    assert multipliers(RULES, {}, {"DE": 10}) == {"DE": PPM}


def test_emission_declines_from_the_bootstrap_boost_and_halves():
    e = RULES.emission
    assert emission_for(RULES, 0) == e.base * 3
    assert emission_for(RULES, e.bootstrap_epochs // 2) == e.base * 2
    assert emission_for(RULES, e.bootstrap_epochs) == e.base
    assert emission_for(RULES, e.halving_epochs) == e.base // 2
    values = [emission_for(RULES, i) for i in range(0, 3 * e.halving_epochs, 7)]
    assert values == sorted(values, reverse=True)


def test_nothing_eligible_carries_the_whole_emission_and_drop_mints_nothing():
    ledger, state = fresh(), EconomyState()
    res = settle(RULES, state, EpochInputs([report("a")]), PRICE, ledger, KEY)
    assert res.statement["minted"] == 0 and state.carry == emission_for(RULES, 0)
    res2 = settle(RULES, state, EpochInputs([report("a")]), PRICE, ledger, KEY)
    assert res2.statement["carried_in"] == emission_for(RULES, 0)
    assert res2.statement["prev"] == res.hash   # statements chain
    drop = Rules(emission=type(RULES.emission)(unallocated="drop"))
    s2 = EconomyState(carry=5)
    settle(drop, s2, EpochInputs([report("a")]), PRICE, fresh(drop), KEY)
    assert s2.carry == 0


# -- staking and slashing -------------------------------------------------------------------------------


def test_a_node_below_the_minimum_stake_earns_nothing():
    ledger, state = fresh(), EconomyState()
    staked(ledger, "a", MIN - 1)
    res = settle(RULES, state, EpochInputs([report("a")], [Usage("r", "a", "B", GB, GB)]), PRICE, ledger, KEY)
    assert res.nodes["a"].reward == 0 and "below the minimum" in res.nodes["a"].why_not


def test_a_node_that_fakes_its_speed_fails_its_probes_and_is_slashed_with_them_as_evidence():
    ledger, state = fresh(), EconomyState()
    staked(ledger, "liar", 4 * MIN)
    probes = [Probe(f"p{i}", "liar", True, 10, 100, 20) for i in range(3)]   # claims 100 Mbit/s, delivers 10
    res = settle(RULES, state, EpochInputs([report("liar")], [Usage("r", "liar", "B", GB, GB)], probes),
                 PRICE, ledger, KEY)
    (s,) = res.statement["slashes"]
    cut = 4 * MIN * RULES.staking.slash_failed_probes_ppm // PPM
    assert s == {"node": "liar", "kind": "failed_probes", "amount": cut, "evidence": ["p0", "p1", "p2"]}
    assert ledger.balance(SLASHED) == s["amount"] and res.nodes["liar"].reward == 0


def test_forged_and_inflated_usage_are_slashed_with_the_receipts_as_evidence():
    ledger, state = fresh(), EconomyState()
    for x in ("f", "i", "p", "s", "h"):
        staked(ledger, x, 2 * MIN)
    usage = [Usage("f1", "f", "B", GB, GB, FORGED), Usage("f2", "f", "B", GB, GB, FORGED),
             Usage("i1", "i", "B1", 2 * GB, GB), Usage("i2", "i", "B2", 2 * GB, GB), Usage("i3", "i", "B3", 3 * GB, GB),
             Usage("i4", "i", "B4", GB, GB),
             Usage("p1", "p", RULES.probes.prober_buyer, 2 * GB, GB),     # the hub's prober is believed alone
             Usage("s1", "s", "stingy", 2 * GB, GB), Usage("s2", "s", "stingy", 2 * GB, GB),  # one buyer is not
             Usage("s3", "s", "B", GB, GB), Usage("h1", "h", "B", GB, GB)]
    nodes = [report(x) for x in ("f", "i", "p", "s", "h")]
    res = settle(RULES, state, EpochInputs(nodes, usage), PRICE, ledger, KEY)
    kinds = {(s["node"], s["kind"]): s["evidence"] for s in res.statement["slashes"]}
    assert kinds == {("f", "forged_usage"): ["f1", "f2"], ("i", "inflated_usage"): ["i1", "i2", "i3"],
                     ("p", "inflated_usage"): ["p1"]}
    assert res.nodes["s"].reward > 0 and res.nodes["s"].verified_bytes == GB   # only the agreed session counts
    assert res.nodes["s"].reputation_ppm < res.nodes["h"].reputation_ppm   # disagreement lowers reputation
    assert ledger.balance(stake_account("f")) == 2 * MIN - 2 * MIN * RULES.staking.slash_forged_usage_ppm // PPM
    assert res.nodes["i"].reward == 0 and res.nodes["i"].verified_bytes == GB   # i4 within tolerance still counts


def test_unbonding_stake_stays_slashable_and_is_released_after_the_period():
    ledger, state = fresh(), EconomyState()
    staked(ledger, "a", 2 * MIN)
    unbond(RULES, ledger, state.unbonding, 0, "a", MIN, "payout:a")
    settle(RULES, state, EpochInputs([report("a")], offences=[Offence("a", EQUIVOCATION, ("r7", "r7'"))]),
           PRICE, ledger, KEY)
    half = RULES.staking.slash_equivocation_ppm
    assert ledger.balance(unbonding_account("a")) == MIN - MIN * half // PPM
    while state.epoch <= RULES.staking.unbonding_epochs:
        settle(RULES, state, EpochInputs([]), PRICE, ledger, KEY)
    assert ledger.balance(unbonding_account("a")) == 0
    assert ledger.balance("payout:a") == MIN - MIN * half // PPM


def test_negative_usage_is_refused_naming_the_receipt():
    with pytest.raises(ValueError, match="usage r9: byte counts must be ≥ 0"):
        settle(RULES, EconomyState(), EpochInputs([report("a")], [Usage("r9", "a", "B", -1, 5)]), PRICE, fresh(), KEY)


def test_the_ledger_refuses_an_overdraft():
    ledger = fresh()
    with pytest.raises(Overdraft):
        ledger.transfer(0, "bond", "payout:nobody", stake_account("x"), 1)
    with pytest.raises(ValueError):
        ledger.transfer(0, "bond", "market", "x", -1)


# -- Merkle proofs, as the node checks them --------------------------------------------------------------


def _settled(n: int):
    ledger, state = fresh(), EconomyState()
    nodes = [f"n{i:03d}" for i in range(n)]
    for x in nodes:
        staked(ledger, x)
    fund(ledger, "buyer:B", 10**12)
    inputs = EpochInputs([report(x) for x in nodes], [Usage(f"r{x}", x, "B", (i + 1) * GB, (i + 1) * GB)
                                                     for i, x in enumerate(nodes)])
    return settle(RULES, state, inputs, PRICE, ledger, KEY)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_inclusion_proofs_verify_and_tampered_ones_do_not(n):
    res = _settled(n)
    hub = merkle_key()
    for r in res.rewarded:
        leaf, proof = res.inclusion_proof(r.node)
        assert merkle.check_reward(res.statement, leaf, proof, r.node, hub) is None
        assert merkle.check_reward(res.statement, {**leaf, "reward": leaf["reward"] + 1}, proof, r.node, hub)
        assert merkle.check_reward(res.statement, leaf, proof, "someone-else", hub)
        for i in range(len(proof)):
            flipped = [list(p) for p in proof]
            flipped[i][1] = ("0" if flipped[i][1][0] != "0" else "1") + flipped[i][1][1:]
            assert not merkle.verify_inclusion(leaf, flipped, res.statement["merkle_root"])
            swapped = [list(p) for p in proof]
            swapped[i][0] = "L" if swapped[i][0] == "R" else "R"
            assert not merkle.verify_inclusion(leaf, swapped, res.statement["merkle_root"])
        assert not merkle.verify_inclusion(leaf, proof[:-1], res.statement["merkle_root"]) or not proof
        for junk in (None, [["X", "00"]], [["L", "zz"]], [["L"]], "abc"):
            assert not merkle.verify_inclusion(leaf, junk, res.statement["merkle_root"])
    forged = {**res.statement, "minted": res.statement["minted"] + 1}
    assert not merkle.verify_statement(forged)
    assert not merkle.verify_statement(res.statement, hub_key=merkle.sign_statement(
        Ed25519PrivateKey.generate(), {})["sig"][:44])
    other = merkle.sign_statement(Ed25519PrivateKey.generate(), {k: v for k, v in res.statement.items() if k != "hub"})
    assert merkle.check_reward(other, *res.inclusion_proof(res.rewarded[0].node), res.rewarded[0].node, hub)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40), st.integers(0, 10**30), st.integers(0, 2**64))
def test_the_fast_leaf_encoding_is_the_canonical_one(node, payout, reward, vb):
    from idlewire.economy.settle import NodeResult

    r = NodeResult(node, "DE", payout, vb, PPM, 123, 2 * PPM, 0, reward=reward)
    assert _leaf_hash(7, r) == merkle.leaf_hash(reward_leaf(7, r))


def test_the_node_side_verifier_imports_nothing_from_tools():
    import ast
    from pathlib import Path

    src = Path(merkle.__file__).read_text()
    mods = {a.name.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= {"__future__", "base64", "hashlib", "json", "cryptography"}, mods


def test_a_large_tree_proves_every_leaf():
    hashes = [bytes([i % 256, i // 256]) * 16 for i in range(1000)]
    levels = merkle.tree(hashes)
    rnd = random.Random(3)
    for i in rnd.sample(range(1000), 50):
        h = hashes[i]
        for side, sib in merkle.proof(levels, i):
            h = merkle._parent(bytes.fromhex(sib), h) if side == "L" else merkle._parent(h, bytes.fromhex(sib))
        assert h.hex() == merkle.root_of(levels)
