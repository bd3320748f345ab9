"""A golden x86_64 image (built with no login key) stamped for two units, each booted once.

Each unit must: let the stamped SSH key log in, hold its node key in /etc/idlewire (0600, dir
0700) matching the public key `idlewire stamp` recorded, carry the stamped hostname and Wi-Fi
config (derived key only), run the agent with the unit's payout address (signed, in /health) and
caps, and leave no secret on the boot partition (checked from the host on
the raw bytes after a clean power-off). The two units differ in node key, SSH host key and
machine id (the x86_64 boot test boots one copy: these are its two).

unit-b is stamped `mode: router` and boots with two NICs (tests/routerbox.py: the WAN on an ISP
namespace, the LAN on the owner's laptop namespace, which is where its SSH comes from: a router
answers no SSH on the WAN). Besides the story above it must be the home router (issue 17): the
laptop's DHCP lease and DNS from the node, NAT to the internet with owner ports outside the
buyers' block, nothing unasked from the internet, a buyer over WireGuard kept off the LAN, the
owner keeping >= 90 % of line - floor with ping p95 + <= 20 ms while a buyer saturates its cap,
and the stamped Wi-Fi up as an access point on a mac80211_hwsim radio (WPA2 and, as stamped,
WPA3-SAE beside it). Then its WAN is switched to
PPPoE (as a playbook run with idlewire_wan: pppoe does it): pppd in the guest dials the lab's
access concentrator (tests/pppoelab.py), the laptop reaches the internet over ppp0 with TCP's MSS
clamped, and after the ISP drops the line pppd redials and the shaper takes ppp0 again. One boot
for all these stories (the project's rule), not a third VM.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from idlewire_agent import receipts
from netlab import Lab
from qemu import Vm, golden_image, why_no_qemu
from routerbox import RouterBox, pppoe_checks, router_checks

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
IDLEWIRE = [sys.executable, "-m", "idlewire"]


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    """IDLEWIRE_TEST_GOLDEN (a built x86_64 .img with no login key), else built here."""
    if not os.environ.get("IDLEWIRE_TEST_GOLDEN") and (why := why_no_qemu()):
        pytest.skip(why)
    return golden_image(tmp_path_factory.mktemp("golden"))


def _pub_of(node_key: str) -> str:
    """Public key of /etc/idlewire/node.key (the agent's format: base64 of the 32 raw bytes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(node_key.strip()))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def test_two_stamped_units_boot_consume_and_erase(golden, tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vendor", "-f", str(key)], check=True)
    pub = key.with_suffix(".pub").read_text().strip()
    units = tmp_path / "units.csv"
    with units.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["unit", "hostname", "ssh_authorized_keys", "wifi_country", "wifi_ssid", "wifi_psk",
                    "wifi_wpa3", "payout_address", "caps_monthly_gb", "caps_up_mbit", "mode"])
        w.writerow(["unit-a", "iw-a", pub, "DE", "Cafe Luna", "passphrase-a-123", "", "addr-aaaa", "500", "3", ""])
        w.writerow(["unit-b", "iw-b", pub, "FR", "Atelier", "passphrase-b-456", "true", "addr-bbbb", "900", "",
                    "router"])
    out = tmp_path / "stamped"
    res = subprocess.run([*IDLEWIRE, "stamp", str(golden), "--units", str(units), "--out", str(out), "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    stamped = json.loads(res.stdout)["units"]
    assert len({u["node_public_key"] for u in stamped}) == 2

    from idlewire import stamp as st

    layout = st.read_layout(golden)
    facts = {}
    secrets = {}
    for u in stamped:
        img = Path(u["image"])
        pem = st.read_boot_file(img, layout.boot_offset, "node.key").decode()
        toml = st.read_boot_file(img, layout.boot_offset, "stamp.toml").decode()
        secrets[u["unit"]] = ([ln.encode() for ln in pem.splitlines() if ln.strip()],
                              next(ln.split('"')[1] for ln in toml.splitlines() if ln.startswith("psk_hash")))
    # both units boot side by side (one boot each); unit-b as the home router of its namespaces
    lab = Lab()
    box = RouterBox(lab, tmp_path / "box")
    vms = {u["unit"]: Vm(Path(u["image"]), "amd64", tmp_path / f"vm-{u['unit']}", key)
           if u["unit"] == "unit-a" else
           Vm(Path(u["image"]), "amd64", tmp_path / f"vm-{u['unit']}", key, nics=box.nics(), netns=box.ns,
              ssh_host=box.gateway, ssh_netns=box.lan.name)
           for u in stamped}
    try:
        for vm in vms.values():
            vm.start()
        for u in stamped:
            vm = vms[u["unit"]]
            psk_hash = secrets[u["unit"]][1]
            if u["unit"] == "unit-b":
                box.dhcp(900)  # the laptop's lease comes from the node: nothing else on its LAN serves one
            vm.wait_ssh(600)  # no key in the golden image: only the stamp lets us in (two TCG boots at once)
            assert vm.ssh("hostname").stdout.strip() == u["hostname"]
            node_key = vm.ssh("sudo cat /etc/idlewire/node.key").stdout
            assert _pub_of(node_key) == u["node_public_key"]
            # the agent runs with the stamped key (it reads /etc/idlewire/node.key)
            assert vm.ssh("systemctl is-active idlewire-agent", check=False).stdout.strip() == "active"
            health = vm.ssh("python3 -c \"import urllib.request as u;"
                            "print(u.urlopen('http://127.0.0.1:8740/health').read().decode())\"").stdout
            health = json.loads(health)
            assert health["node_key"] == u["node_public_key"], health
            # … and with the unit's settings: payout address (signed by the node key), stamped caps
            payout = {"unit-a": "addr-aaaa", "unit-b": "addr-bbbb"}[u["unit"]]
            assert health["unit"] == {"unit": u["unit"], "hostname": u["hostname"], "payout_address": payout}
            assert receipts.payout_valid(health["payout"], u["node_public_key"])
            assert health["payout"]["address"] == payout
            caps = health["caps"]
            assert caps["monthly_gb"] == {"unit-a": 500, "unit-b": 900}[u["unit"]], caps
            if u["unit"] == "unit-a":
                assert caps["up_mbit"] == 3 and caps["from_unit"] == ["monthly_gb", "up_mbit"], caps
            else:
                assert caps["from_unit"] == ["monthly_gb"], caps
            checked = vm.ssh("sudo idlewire-agent check-config /etc/idlewire/node.toml").stdout
            assert f"/etc/idlewire/unit.toml: OK: unit {u['unit']}, payout address {payout}" in checked, checked
            modes = vm.ssh("sudo stat -c '%a %U' /etc/idlewire /etc/idlewire/node.key "
                           "/etc/wpa_supplicant/wpa_supplicant-wlan0.conf").stdout.split("\n")
            assert modes[0].split()[0] in ("700", "750") and modes[1] == "600 root" and modes[2] == "600 root"
            wpa = vm.ssh("sudo cat /etc/wpa_supplicant/wpa_supplicant-wlan0.conf").stdout
            assert f"psk={psk_hash}" in wpa and "passphrase" not in wpa
            unit_toml = vm.ssh("sudo cat /etc/idlewire/unit.toml").stdout
            assert f'unit = "{u["unit"]}"' in unit_toml and "monthly_gb" in unit_toml
            listing = vm.ssh("sudo ls /boot/efi/idlewire").stdout.split()
            assert listing == ["stamp.done"], listing
            hostkey = vm.ssh("cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[1]
            machine_id = vm.ssh("cat /etc/machine-id").stdout.strip()
            assert len(machine_id) == 32, machine_id
            facts[u["unit"]] = (hostkey, u["node_public_key"], machine_id)
            mode = vm.ssh("sudo idlewire-agent mode", check=False)
            assert mode.stdout.strip() == {"unit-a": "node", "unit-b": "router"}[u["unit"]], mode
            if u["unit"] == "unit-b":
                t0 = time.monotonic()
                router_checks(box, vm, wifi_ssid="Atelier", psk_hash=psk_hash, sae=True)
                print(f"router mode checks: {time.monotonic() - t0:.0f} s")  # what they add to the boot test
                t0 = time.monotonic()
                pppoe_checks(box, vm)  # last: the WAN is PPPoE from here on
                print(f"PPPoE checks: {time.monotonic() - t0:.0f} s")
            vm.ssh("sudo systemctl poweroff", check=False)
        for vm in vms.values():
            assert vm.proc is not None
            vm.proc.wait(timeout=120)
    except BaseException as exc:
        # A guest kernel that died shows here only as an SSH failure or a timeout: name its own
        # report (the serial log lives in a temporary directory that later runs rotate away).
        died = {name: vm.kernel_trouble() for name, vm in vms.items()}
        if said := "\n".join(f"{name}'s guest kernel ({vm.serial_log}):\n{died[name]}"
                              for name, vm in vms.items() if died[name]):
            raise AssertionError(f"{type(exc).__name__}: {exc}\n{said}") from exc
        raise
    finally:
        for vm in vms.values():
            vm.stop()
        lab.close()
    # After a clean power-off, the raw boot partition holds no trace of the secrets.
    for u in stamped:
        with Path(u["image"]).open("rb") as f:
            f.seek(layout.boot_offset)
            raw = f.read(layout.boot_size)
        key_lines, psk_hash = secrets[u["unit"]]
        for line in key_lines:
            assert line not in raw, "node key material left on the boot partition"
        assert psk_hash.encode() not in raw, "Wi-Fi key left on the boot partition"
        assert b"passphrase-b-456" not in raw, "the WPA3 passphrase left on the boot partition"
        assert b"consumed_at" in raw  # the stamp.done marker is there
    (a_host, a_node, a_id), (b_host, b_node, b_id) = facts.values()
    assert a_host != b_host, "two units share an SSH host key"
    assert a_node != b_node, "two units share a node key"
    assert a_id != b_id, "two units share a machine id"
