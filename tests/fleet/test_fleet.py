"""site.yml and upgrade.yml on a fleet of booted Debian hosts, the way Molecule/dev-sec do it.

check mode → converge (shaping on, caps from the inventory) → idempotence (changed=0 on every
host, from the recap) → verify (the testinfra suite through `idlewire verify`: every check runs
and passes) → one thing broken by hand on each of four hosts, and verify names exactly that →
a rolling upgrade that stops at an unhealthy batch. The tests share one fleet and run in file
order.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from fleet import CAP_DOWN_MBIT, ROOT, Fleet, why_no_fleet
from netlab import Lab

pytestmark = pytest.mark.fleet
N = 5
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
AGENT_INIT = "/usr/lib/idlewire/idlewire_agent/__init__.py"


def recap(out: str) -> dict[str, dict[str, int]]:
    return {m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
            for m in RECAP.finditer(out)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    why = why_no_fleet()
    if why:
        pytest.skip(why)
    with Lab() as lab, Fleet(lab, N, tmp_path_factory.mktemp("fleet")) as fleet:
        yield fleet


def play(fleet: Fleet, playbook: str, *args: str):
    bin_dir = str(Path(sys.executable).parent)
    return fleet.run(f"{bin_dir}/ansible-playbook", "-i", str(fleet.inventory), f"playbooks/{playbook}",
                     *args, check=False, env={"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"})


def test_check_mode_on_fresh_hosts(fleet):
    res = play(fleet, "site.yml", "--check")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    r = recap(res.stdout)
    assert set(r) == {h.name for h in fleet.hosts}
    assert all(v["changed"] > 0 and v["failed"] == 0 for v in r.values()), r
    # Check mode changed nothing: no agent on any host.
    for h in fleet.hosts:
        assert fleet.ssh(h, "test -e /etc/idlewire/node.toml", check=False).returncode == 1


def test_converge(fleet):
    res = play(fleet, "site.yml")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    r = recap(res.stdout)
    assert len(r) == N and all(v["failed"] == 0 and v["unreachable"] == 0 for v in r.values()), r
    for h in fleet.hosts:
        out = fleet.ssh(h, "systemctl is-active idlewire-agent idlewire-firewall ssh; hostname").stdout.split()
        assert out == ["active", "active", "active", h.name]


def test_idempotence(fleet):
    res = play(fleet, "site.yml")
    assert res.returncode == 0, res.stdout[-4000:]
    r = recap(res.stdout)
    assert len(r) == N
    changed = {h: v["changed"] for h, v in r.items() if v["changed"]}
    assert not changed, f"second run changed something: {changed}\n{res.stdout[-4000:]}"


# Every check of the node suite; a new one is required here without editing this file.
CHECKS = {n.name for n in ast.parse((ROOT / "tests/infra/test_node.py").read_text()).body
          if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
# These two may skip on a host that never had a stamp or a boot partition; on the fleet's hosts
# base installs the stamp consumer and the rootfs has /boot/efi, so they run (and pass: no stamp
# was ever written there, which makes them weak here; tests/image checks a consumed stamp).
MAY_SKIP = {"test_stamp_secrets_gone", "test_no_private_key_on_boot_partition"}
# OpenWrt-only checks (procd, UCI) skip on these Debian hosts, and say so.
OPENWRT_ONLY = {n for n in CHECKS if n.startswith("test_openwrt_")}


def verify(fleet: Fleet, name: str) -> dict[str, dict]:
    res = fleet.run(sys.executable, "-m", "idlewire", "verify", "-i", str(fleet.inventory), "--json",
                    "--identity", str(fleet.key), "--junit", str(fleet.workdir / f"{name}.xml"),
                    check=False)
    assert res.returncode in (0, 1), res.stdout[-4000:] + res.stderr[-3000:]
    hosts = {h["host"]: h for h in json.loads(res.stdout)["hosts"]}
    assert set(hosts) == {h.name for h in fleet.hosts}
    return hosts


def wait_health(fleet: Fleet, h, timeout: float = 30) -> None:
    fleet.ssh(h, f"for i in $(seq {int(timeout * 2)}); do python3 -c \"import urllib.request as u;"
                 f"u.urlopen('http://127.0.0.1:8740/health', timeout=2)\" 2>/dev/null && exit 0; sleep 0.5; "
                 "done; exit 1")


def test_verify_suite(fleet):
    """Every check runs on every host (shaping on: nft, tc and WireGuard included) and passes."""
    for name, h in verify(fleet, "verify").items():
        assert h["status"] == "ok" and not h["failed"], (name, h["failed"])
        skipped = {s["test"] for s in h["skipped"]}
        assert not skipped - MAY_SKIP - OPENWRT_ONLY, (name, h["skipped"])
        assert all("not OpenWrt" in s["reason"] for s in h["skipped"] if s["test"] in OPENWRT_ONLY)
        assert set(h["passed"]) | skipped == CHECKS, (name, CHECKS - set(h["passed"]) - skipped)


def test_verify_names_exactly_what_broke(fleet):
    """One thing broken by hand on each of four hosts; one run names exactly the matching checks."""
    n1, n2, n3, n4, n5 = fleet.hosts
    breaks = [  # (host, break, restore)
        (n2, f"sudo tc class change dev iw0 classid 1:1 htb rate {CAP_DOWN_MBIT // 2}mbit "
             f"ceil {CAP_DOWN_MBIT // 2}mbit", "sudo systemctl restart idlewire-agent"),
        (n3, "sudo nft flush table inet idlewire", "sudo systemctl restart idlewire-firewall"),
        (n4, "sudo systemctl stop idlewire-agent", "sudo systemctl start idlewire-agent"),
        (n5, "echo 'PasswordAuthentication yes' | sudo tee /etc/ssh/sshd_config.d/00-broken.conf "
             ">/dev/null && sudo systemctl reload ssh",
         "sudo rm /etc/ssh/sshd_config.d/00-broken.conf && sudo systemctl reload ssh"),
    ]
    try:
        for h, broken, _ in breaks:
            fleet.ssh(h, broken)
        hosts = verify(fleet, "verify-broken")
    finally:
        for h, _, restore in breaks:
            fleet.ssh(h, restore, check=False)
    failed = {name: {f["test"]: f["message"] for f in h["failed"]} for name, h in hosts.items()}
    assert {name: set(f) for name, f in failed.items()} == {
        n1.name: set(),
        n2.name: {"test_tc_tree_on_wan_with_configured_caps"},
        n3.name: {"test_nft_isolation_table_loaded"},
        # The agent carries the API and the tunnel (its trees go with the tunnel interface).
        n4.name: {"test_agent_service_active_and_enabled", "test_api_listens_on_management_only",
                  "test_api_health_ok", "test_wireguard_port_on_wan", "test_node_mode_measures_the_owner"},
        n5.name: {"test_ssh_password_authentication_off"},
    }, failed
    assert f"want {CAP_DOWN_MBIT} Mbit/s (agent_cap_down_mbit)" in \
        failed[n2.name]["test_tc_tree_on_wan_with_configured_caps"]
    assert "flushed" in failed[n3.name]["test_nft_isolation_table_loaded"]
    assert "passwordauthentication" in failed[n5.name]["test_ssh_password_authentication_off"]
    # Restored: the next run passes everywhere (once the restarted agents answer).
    for h in (n2, n4):
        wait_health(fleet, h)
    again = verify(fleet, "verify-restored")
    assert all(h["status"] == "ok" for h in again.values()), {n: h["failed"] for n, h in again.items()}


def test_upgrade_stops_at_the_unhealthy_batch(fleet, tmp_path):
    # A new agent release: same code, bumped version.
    src = tmp_path / "idlewire_agent"
    shutil.copytree(ROOT / "agent" / "idlewire_agent", src)
    init = src / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]+"', '__version__ = "9.9.9-fleettest"', init.read_text()))
    # node03 (batch 2 of 3 with serial 2) has its agent's API port refused.
    bad = fleet.hosts[2]
    fleet.ssh(bad, "sudo nft add table inet iwtest && sudo nft add chain inet iwtest in "
                   "'{ type filter hook input priority -10; }' && "
                   "sudo nft add rule inet iwtest in tcp dport 8740 reject with tcp reset")
    res = play(fleet, "upgrade.yml", "-e", f"upgrade_agent_source={src}", "-e", "upgrade_batch=2")
    assert res.returncode != 0
    out = res.stdout
    assert re.search(r"fatal: \[node03\]", out), out[-4000:]
    r = recap(out)
    assert r["node03"]["failed"] == 1
    assert "node05" not in r, "the roll went on past the failed batch"
    assert "Check that the agent answers before touching the node" in out
    versions = {h.name: "9.9.9-fleettest" in fleet.ssh(h, f"cat {AGENT_INIT}").stdout for h in fleet.hosts}
    # Batch 1 upgraded; batch 2 stopped as a whole when node03 failed its pre-upgrade health check
    # (max_fail_percentage 0 ends the play after that task, so node04 was not touched either);
    # batch 3 never started.
    assert versions == {"node01": True, "node02": True, "node03": False, "node04": False, "node05": False}
    # The upgraded agents run the new release (the health gate saw it).
    for h in fleet.hosts[:2]:
        health = fleet.ssh(h, "python3 -c \"import urllib.request as u;"
                              "print(u.urlopen('http://127.0.0.1:8740/health').read().decode())\"")
        assert json.loads(health.stdout)["version"] == "9.9.9-fleettest"
