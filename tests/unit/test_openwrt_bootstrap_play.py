"""The base role's bootstrap entry point run by ansible-playbook, the way playbooks/site.yml's first
play runs it, through the chroot connection into a directory that looks like a router without
Python: busybox (static) as the only userland, /etc/openwrt_release, a fake /proc/meminfo and
/proc/mounts (plain files), a small tmpfs mounted as /overlay (busybox df measures it) and a
stand-in `opkg`. What this shows for real: the raw command Ansible sends (variables, quoting of the
script, busybox sh), the changed/ok/failed outcomes and the one-line refusal as the task's message.
Not shown: real opkg, an overlayfs on flash, SSH."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = shutil.which("busybox")


def _static(path: str | None) -> bool:
    """A busybox that runs alone in a chroot: an ELF file without a PT_INTERP (dynamic loader)."""
    return bool(path) and b"ld-linux" not in Path(path).read_bytes()[:4096]


pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not _static(BUSYBOX) or not shutil.which("chroot"),
                                reason="needs root, chroot and a static busybox (apt install busybox-static)")

OPKG = r"""#!/bin/sh
echo "opkg $*" >> /var/opkg-calls
case "$1" in
  list-installed) grep -qx "$2" /var/opkg-installed && echo "$2 - 1.0-1"; exit 0 ;;
  update) exit 0 ;;
  install) shift; for p in "$@"; do echo "$p" >> /var/opkg-installed; done; exit 0 ;;
esac
exit 99
"""
PLAY = """\
- name: Bootstrap (as the first play of playbooks/site.yml)
  hosts: all
  become: false
  gather_facts: false
  tasks:
    - name: Budget check and packages
      ansible.builtin.import_role:
        name: base
        tasks_from: bootstrap
"""


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    yield root
    if (root / "overlay").is_mount():
        subprocess.run(["umount", str(root / "overlay")], check=True)


def make_root(root: Path, openwrt: bool = True, mem_kib: int = 250000, free_kib: int = 60000) -> None:
    for d in ("bin", "dev", "usr/bin", "etc", "proc", "var", "tmp", "overlay"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    subprocess.run(["chroot", str(root), "/bin/busybox", "--install", "-s", "/bin"], check=True)
    if openwrt:
        (root / "etc/openwrt_release").write_text("DISTRIB_ID='OpenWrt'\nDISTRIB_RELEASE='23.05.5'\n")
        (root / "bin/opkg").write_text(OPKG)
        (root / "bin/opkg").chmod(0o755)
    (root / "proc/meminfo").write_text(f"MemTotal:       {mem_kib} kB\n")
    (root / "proc/mounts").write_text("rootfs / rootfs rw 0 0\ntmpfs /overlay tmpfs rw 0 0\n")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={free_kib}k", "iwtest", str(root / "overlay")], check=True)
    (root / "var/opkg-installed").write_text("nftables-json\n")
    (root / "var/opkg-calls").write_text("")


def play(tmp: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp / "play.yml").write_text(PLAY)
    inventory = tmp / "inventory.yml"
    inventory.write_text(f"all:\n  hosts:\n    router-7:\n      ansible_connection: community.general.chroot\n"
                         f"      ansible_host: {root}\n")
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
           "PATH": f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
                           str(tmp / "play.yml"), *args], capture_output=True, text=True, env=env, timeout=300)


def recap(out: str) -> dict[str, int]:
    m = re.search(r"router-7\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)", out)
    assert m, out[-3000:]
    return dict(zip(("ok", "changed", "unreachable", "failed", "skipped"), map(int, m.groups()), strict=True))


def test_fresh_router_gets_the_missing_packages_then_nothing_changes(tmp_path, root):
    make_root(root)
    r = play(tmp_path, root)
    assert recap(r.stdout) == {"ok": 3, "changed": 1, "unreachable": 0, "failed": 0, "skipped": 2}, r.stdout[-3000:]
    calls = (root / "var/opkg-calls").read_text().splitlines()
    installs = [c for c in calls if c.startswith("opkg install")]
    assert len(installs) == 1 and "python3-light" in installs[0] and "nftables-json" not in installs[0]
    r = play(tmp_path, root)
    assert recap(r.stdout)["changed"] == 0 and recap(r.stdout)["failed"] == 0, r.stdout[-3000:]


def test_router_below_the_ram_floor_fails_with_the_one_line(tmp_path, root):
    make_root(root, mem_kib=60000)
    r = play(tmp_path, root)
    assert recap(r.stdout)["failed"] == 1
    assert ("error: router-7: 60000 KiB RAM (MemTotal), below idlewire's floor of 112640 KiB on OpenWrt; "
            'see "OpenWrt budget" in roles/base/README.md') in r.stdout
    assert not [c for c in (root / "var/opkg-calls").read_text().splitlines() if c.startswith("opkg install")]


def test_router_without_the_flash_fails_with_the_one_line(tmp_path, root):
    make_root(root, free_kib=20000)
    r = play(tmp_path, root)
    assert recap(r.stdout)["failed"] == 1
    assert "error: router-7: 20000 KiB free flash on /overlay, below the 41636 KiB the missing packages need " \
           "(floor on a fresh router: 42736 KiB)" in r.stdout


def test_check_mode_reports_and_stops(tmp_path, root):
    make_root(root)
    r = play(tmp_path, root, "--check")
    assert recap(r.stdout)["failed"] == 1
    assert "router-7: check mode: would install: python3-light python3-logging" in r.stdout
    assert "the rest needs Python on the router, so run once without --check" in r.stdout
    assert (root / "var/opkg-installed").read_text() == "nftables-json\n"


def test_other_systems_only_answer_the_probe(tmp_path, root):
    make_root(root, openwrt=False)
    r = play(tmp_path, root, "--check")
    assert recap(r.stdout) == {"ok": 2, "changed": 0, "unreachable": 0, "failed": 0, "skipped": 3}, r.stdout[-3000:]
