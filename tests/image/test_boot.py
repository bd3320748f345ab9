"""Boot the images we build, as a user would: log in over SSH, look at what matters.

Each image boots from a copy "flashed" to a bigger card: it must reach multi-user.target with the
agent running and no usable password, and grow its root to the card. Two rpi4-arm64 copies boot
side by side and must not share SSH host keys or machine id; for x86_64 one copy boots (and then
takes an initrd update through a reboot): its two stamped units (tests/image/test_stamp_firstboot.py)
are the two copies that must differ, one TCG boot fewer in make test.
"""

from __future__ import annotations

import pytest
from qemu import Vm, copy_image

pytestmark = pytest.mark.image

BOOT_TIMEOUT = {"x86_64": 600, "rpi4-arm64": 1200}
ARCH = {"x86_64": "amd64", "rpi4-arm64": "arm64"}
CARD = 3 << 30  # the copies are "flashed" to a 3 GiB card: first boot grows the root fs


COPIES = {"x86_64": 1, "rpi4-arm64": 2}


@pytest.mark.parametrize("target", ["x86_64", "rpi4-arm64"])
def test_boot_copies(target, build_image, test_key, tmp_path):
    built = build_image(target)
    vms = [Vm(copy_image(built.image, tmp_path / f"unit{i}.img", CARD), ARCH[target],
              tmp_path / f"vm{i}", test_key, boot_offset=built.manifest["layout"]["boot_offset"])
           for i in range(1, COPIES[target] + 1)]
    try:
        for vm in vms:
            vm.start()
        facts = []
        for vm in vms:
            vm.wait_ssh(BOOT_TIMEOUT[target])
            state = vm.ssh("systemctl is-system-running --wait", check=False, timeout=600).stdout.strip()
            failed = vm.ssh("systemctl --failed --no-legend --plain", check=False).stdout.strip()
            assert state == "running", f"{target}: system is {state!r}; failed units:\n{failed}"
            assert vm.ssh("systemctl is-active multi-user.target").stdout.strip() == "active"
            assert vm.ssh("systemctl is-active idlewire-agent").stdout.strip() == "active"
            assert vm.ssh("systemctl is-enabled idlewire-agent").stdout.strip() == "enabled"
            health = vm.ssh("python3 -c \"import urllib.request as u;"
                            "print(u.urlopen('http://127.0.0.1:8740/health').read().decode())\"").stdout
            assert '"status": "ok"' in health
            # No account can log in with a password: every hash field is locked ('!' or '*').
            usable = vm.ssh("sudo awk -F: '$2 !~ /^[!*]/ {print $1}' /etc/shadow").stdout.split()
            assert usable == [], f"accounts with a usable or empty password: {usable}"
            sshd = vm.ssh("sudo sshd -T").stdout
            assert "passwordauthentication no" in sshd and "permitrootlogin no" in sshd
            assert vm.ssh("hostname").stdout.strip() == "iw-test"
            # First boot grew the root filesystem to the card.
            root_bytes = int(vm.ssh("df -B1 --output=size / | tail -1").stdout)
            assert root_bytes > 2.5 * (1 << 30), f"root not grown: {root_bytes} bytes"
            facts.append({
                "hostkey": vm.ssh("cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[1],
                "machine_id": vm.ssh("cat /etc/machine-id").stdout.strip(),
            })
        assert all(len(f["machine_id"]) == 32 for f in facts)
        if len(facts) == 2:
            assert facts[0]["hostkey"] != facts[1]["hostkey"], "two units share an SSH host key"
            assert facts[0]["machine_id"] != facts[1]["machine_id"], "two units share a machine id"
        if target == "x86_64":
            initrd_update_reaches_the_esp(vms[0], BOOT_TIMEOUT[target])
    finally:
        for vm in vms:
            vm.stop()


ENTRY = "/boot/efi/loader/entries/idlewire.conf"
#: systemd-boot tells the booted OS which entry it started, in this EFI variable (UTF-16).
LOADER_ENTRY = "/sys/firmware/efi/efivars/LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"


def initrd_update_reaches_the_esp(vm: Vm, timeout: float) -> None:
    """A new initrd (as a kernel or initramfs update writes one) is what the next boot loads."""
    before = vm.ssh(f"sudo cat {ENTRY}").stdout
    vm.ssh("sudo update-initramfs -u", timeout=900)
    after = vm.ssh(f"sudo cat {ENTRY}").stdout
    assert after != before, f"update-initramfs did not switch the ESP entry:\n{after}"
    same = vm.ssh(f"sudo cmp /boot/initrd.img-$(uname -r) /boot/efi$(sudo sed -n 's/^initrd //p' {ENTRY})",
                  check=False)
    assert same.returncode == 0, f"the ESP's initrd is not the one /boot has: {same.stdout}{same.stderr}"
    previous = vm.ssh(f"sudo cat {ENTRY.replace('idlewire.conf', 'idlewire-previous.conf')}").stdout
    assert previous.splitlines()[1:3] == before.splitlines()[1:3], "the previous entry must boot the old files"
    boot_id = vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout
    vm.ssh("sudo systemctl reboot", check=False)
    vm.proc.wait(timeout=180)  # -no-reboot: QEMU exits when the guest reboots
    vm.start()
    vm.wait_ssh(timeout)
    assert vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout != boot_id
    res = vm.ssh("sudo python3 -c \"import sys; b = open(sys.argv[1], 'rb').read();"
                 f" print(b[4:].decode('utf-16-le').rstrip(chr(0)))\" {LOADER_ENTRY}", check=False)
    assert res.stdout.strip() == "idlewire.conf", f"systemd-boot started {res.stdout!r} {res.stderr}"
