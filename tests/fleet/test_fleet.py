"""site.yml and upgrade.yml on a fleet of booted Debian hosts, the way Molecule/dev-sec do it.

check mode → converge → idempotence (changed=0 on every host, from the recap) → verify (the
testinfra suite through `idlewire verify`) → a rolling upgrade that stops at an unhealthy batch.
The tests share one fleet and run in file order.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from fleet import ROOT, Fleet, why_no_fleet
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


def test_verify_suite(fleet):
    res = fleet.run(sys.executable, "-m", "idlewire", "verify", "-i", str(fleet.inventory), "--json",
                    "--identity", str(fleet.key), "--junit", str(fleet.workdir / "verify.xml"),
                    check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    hosts = {h["host"]: h for h in json.loads(res.stdout)["hosts"]}
    assert set(hosts) == {h.name for h in fleet.hosts}
    for name, h in hosts.items():
        assert h["status"] == "ok" and not h["failed"], (name, h["failed"])
        assert len(h["passed"]) >= 5, (name, h)


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
