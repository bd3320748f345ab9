"""A golden image with no SSH key, reached only through its serial console; then verified.

One boot of the x86_64 image built with --allow-no-login. QEMU waits for the console client
(`server=on,wait=on`), so `idlewire console --log` records the boot from the firmware on. The
console logs in (serial autologin, roles/base), installs a key, prints the addresses; then SSH
with that key works, and `idlewire verify` passes on the node and names the one broken check
when the agent is stopped or sshd accepts passwords again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu import Vm, copy_image, golden_image, why_no_qemu

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
IDLEWIRE = [sys.executable, "-m", "idlewire"]


def idlewire(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*IDLEWIRE, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    if why := why_no_qemu():
        pytest.skip(why)
    return golden_image(tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="module")
def console_node(golden, test_key, tmp_path_factory):
    d = tmp_path_factory.mktemp("console-vm")
    vm = Vm(copy_image(golden, d / "unit.img"), "amd64", d / "vm", test_key, memory=512, console=True)
    vm.start()
    try:
        time.sleep(0.5)  # QEMU is listening: the firmware starts when the console connects
        t0 = time.monotonic()
        res = idlewire("console", vm.console_url, "--bootstrap", "--key", str(test_key.with_suffix(".pub")),
                       "--log", str(d / "boot.log"), "--timeout", "400", "--json")
        vm.bootstrap = res
        vm.bootstrap_seconds = time.monotonic() - t0
        vm.boot_log = d / "boot.log"
        yield vm
    finally:
        vm.stop()


def test_console_bootstraps_a_key_then_ssh_works(console_node):
    node = console_node
    res = node.bootstrap
    assert res.returncode == 0, f"console bootstrap failed ({node.bootstrap_seconds:.0f}s): {res.stderr[-1500:]}"
    out = json.loads(res.stdout)
    assert out["login"] == "shell" and out["uid"] == 0  # the serial autologin shell
    assert out["key"] == "installed" and out["key_user"] == "idlewire"
    assert any(a["address"].startswith("10.0.2.15/") for a in out["addresses"]), out["addresses"]
    node.wait_ssh(120)
    assert node.ssh("id -un").stdout.strip() == "idlewire"
    keys = node.ssh("stat -c '%a %U' .ssh/authorized_keys .ssh").stdout.split("\n")
    assert keys[:2] == ["600 idlewire", "700 idlewire"]
    # The boot log holds the whole boot, firmware to autologin.
    log = node.boot_log.read_bytes()
    assert b"BdsDxe" in log and b"ttyS0" in log and b"(automatic login)" in log
    # Kernel messages were silenced on the console.
    assert node.ssh("cat /proc/sys/kernel/printk").stdout.split()[0] == "1"
    # A second bootstrap finds the key already there and leaves authorized_keys alone.
    again = idlewire("console", node.console_url, "--bootstrap", "--key", str(node.key.with_suffix(".pub")),
                     "--json", "--timeout", "60")
    assert again.returncode == 0 and json.loads(again.stdout)["key"] == "already present"
    assert node.ssh("wc -l < .ssh/authorized_keys").stdout.strip() == "1"


def test_console_run_returns_output_and_status(console_node):
    node = console_node
    res = idlewire("console", node.console_url, "--run", "systemctl is-active idlewire-agent",
                   "--run", "echo out; echo err >&2; exit 4", "--json", "--timeout", "60")
    assert res.returncode == 4, res.stderr
    r = json.loads(res.stdout)["results"]
    assert (r[0]["exit_status"], r[0]["output"]) == (0, "active\n")
    assert r[1]["exit_status"] == 4 and "out\n" in r[1]["output"] and "err\n" in r[1]["output"]


def _verify(node, inv: Path) -> dict:
    res = idlewire("verify", "-i", str(inv), "--junit", str(inv.with_suffix(".xml")), "--json", timeout=300)
    assert res.returncode in (0, 1), res.stderr[-2000:]
    return json.loads(res.stdout)["hosts"][0]


def test_verify_passes_then_names_what_broke(console_node, tmp_path):
    node = console_node
    inv = tmp_path / "inventory.yml"
    inv.write_text(f"all:\n  hosts:\n    unit1:\n      ansible_host: 127.0.0.1\n      ansible_port: {node.ssh_port}\n"
                   f"      ansible_user: idlewire\n      ansible_ssh_private_key_file: {node.key}\n")
    node.wait_ssh(120)
    ok = _verify(node, inv)
    assert ok["status"] == "ok", ok["failed"]
    assert "test_no_account_with_usable_password" in ok["passed"]

    node.ssh("sudo systemctl stop idlewire-agent")
    try:
        broken = _verify(node, inv)
    finally:
        node.ssh("sudo systemctl start idlewire-agent")
    failed = {f["test"] for f in broken["failed"]}
    assert "test_agent_service_active_and_enabled" in failed
    assert failed <= {"test_agent_service_active_and_enabled", "test_api_listens_on_management_only",
                      "test_api_health_ok"}, failed

    node.ssh("echo 'PasswordAuthentication yes' | sudo tee /etc/ssh/sshd_config.d/00-broken.conf >/dev/null"
             " && sudo systemctl reload ssh")
    try:
        broken = _verify(node, inv)
    finally:
        node.ssh("sudo rm /etc/ssh/sshd_config.d/00-broken.conf && sudo systemctl reload ssh")
    assert [f["test"] for f in broken["failed"]] == ["test_ssh_password_authentication_off"]
    assert "passwordauthentication" in broken["failed"][0]["message"]


def test_verify_names_flushed_nft_table_and_changed_cap(console_node, tmp_path):
    """Where the image deploys isolation and shaping (their role variables exist), break each by hand."""
    sys.path.insert(0, str(ROOT / "tests" / "infra"))
    from iwnode import expected_vars, feature

    v = expected_vars("unit1", {}, None)
    _, table = feature(v, "nft_table")
    _, shaping = feature(v, "shaping")
    if table is None and not shaping:
        pytest.skip("the image deploys neither the nftables isolation table (firewall_table) nor WAN "
                    "shaping (agent_shaping_enabled): nothing to break yet")
    node = console_node
    inv = tmp_path / "inventory.yml"
    inv.write_text(f"all:\n  hosts:\n    unit1:\n      ansible_host: 127.0.0.1\n      ansible_port: {node.ssh_port}\n"
                   f"      ansible_user: idlewire\n      ansible_ssh_private_key_file: {node.key}\n")
    node.wait_ssh(120)
    if table is not None:
        node.ssh(f"sudo nft flush table inet {table}")
        try:
            broken = _verify(node, inv)
        finally:
            node.ssh("sudo systemctl restart idlewire-firewall idlewire-agent", check=False)
        assert "test_nft_isolation_table_loaded" in {f["test"] for f in broken["failed"]}
    if shaping:
        _, wan = feature(v, "wan_interface")
        # The root class of the WAN tree runs at the line rate (agent_line_up_mbit).
        node.ssh(f"sudo tc class change dev {wan} classid 1:1 htb rate 1mbit ceil 1mbit", check=False)
        try:
            broken = _verify(node, inv)
        finally:
            node.ssh("sudo systemctl restart idlewire-agent", check=False)
        assert "test_tc_tree_on_wan_with_configured_caps" in {f["test"] for f in broken["failed"]}
