"""image/boot/idlewire-esp-sync: kernel and initrd updates on a node reach the x86_64 image's ESP.

The script runs for real under /bin/sh against a /boot and an ESP made of plain directories,
the way the node's kernel and initramfs hooks (and the bake) call it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "image/boot/idlewire-esp-sync"
OPTIONS = "root=PARTUUID=0000 rootfstype=ext4 console=ttyS0,115200 rw quiet"


@pytest.fixture
def node(tmp_path):
    boot, esp = tmp_path / "boot", tmp_path / "esp"
    boot.mkdir()
    (esp / "loader/entries").mkdir(parents=True)
    (esp / "loader/entries/idlewire.conf").write_text(f"title idlewire\noptions {OPTIONS}\n")
    return boot, esp


def sync(boot: Path, esp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", str(SCRIPT)], capture_output=True, text=True, check=True,
                          env={**os.environ, "IDLEWIRE_BOOT": str(boot), "IDLEWIRE_ESP": str(esp)})


def install(boot: Path, version: str, kernel: bytes, initrd: bytes | None) -> None:
    (boot / f"vmlinuz-{version}").write_bytes(kernel)
    if initrd is not None:
        (boot / f"initrd.img-{version}").write_bytes(initrd)


def entry(esp: Path, name: str = "idlewire.conf") -> dict[str, str]:
    lines = (esp / "loader/entries" / name).read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines)


def booted(esp: Path, name: str = "idlewire.conf") -> tuple[bytes, bytes]:
    e = entry(esp, name)
    assert e["options"] == OPTIONS
    return (esp / e["linux"].lstrip("/")).read_bytes(), (esp / e["initrd"].lstrip("/")).read_bytes()


def files(esp: Path) -> set[str]:
    return {p.name for p in esp.iterdir() if p.is_file()}


def test_first_sync_boots_the_installed_kernel_and_a_second_changes_nothing(node):
    boot, esp = node
    install(boot, "6.12.1+deb13-amd64", b"K1", b"I1")
    out = sync(boot, esp).stdout
    assert "6.12.1+deb13-amd64" in out
    assert booted(esp) == (b"K1", b"I1")
    assert not (esp / "loader/entries/idlewire-previous.conf").exists()
    before = {p: p.stat().st_mtime_ns for p in esp.rglob("*")}
    assert sync(boot, esp).stdout == ""
    assert {p: p.stat().st_mtime_ns for p in esp.rglob("*")} == before


def test_a_new_kernel_waits_for_its_initrd_then_the_old_one_stays_bootable(node):
    boot, esp = node
    install(boot, "6.9.0-amd64", b"K9", b"I9")
    sync(boot, esp)
    install(boot, "6.10.0-amd64", b"K10", None)  # the kernel's postinst runs before its initrd exists
    sync(boot, esp)
    assert booted(esp) == (b"K9", b"I9")
    (boot / "initrd.img-6.10.0-amd64").write_bytes(b"I10")
    sync(boot, esp)
    assert booted(esp) == (b"K10", b"I10"), "6.10 sorts after 6.9 (version order, not text order)"
    assert booted(esp, "idlewire-previous.conf") == (b"K9", b"I9")
    assert entry(esp, "idlewire-previous.conf")["title"] == "idlewire (previous kernel)"


def test_a_rebuilt_initrd_of_the_same_kernel_gets_a_name_of_its_own(node):
    boot, esp = node
    install(boot, "6.12.1+deb13-amd64", b"K1", b"I1")
    sync(boot, esp)
    first = entry(esp)["initrd"]
    (boot / "initrd.img-6.12.1+deb13-amd64").write_bytes(b"I1-rebuilt")  # update-initramfs -u
    sync(boot, esp)
    assert booted(esp) == (b"K1", b"I1-rebuilt")
    assert entry(esp)["initrd"] != first, "the entry must switch by rename, never rewrite a file in use"
    assert booted(esp, "idlewire-previous.conf") == (b"K1", b"I1")


def test_files_no_entry_uses_are_removed(node):
    boot, esp = node
    for n in (1, 2, 3):
        install(boot, f"6.{n}.0-amd64", f"K{n}".encode(), f"I{n}".encode())
        sync(boot, esp)
    assert booted(esp) == (b"K3", b"I3")
    assert booted(esp, "idlewire-previous.conf") == (b"K2", b"I2")
    assert len(files(esp)) == 4, files(esp)  # kernel + initrd of the two entries
    assert not any(name.endswith(".new") for name in files(esp))


def test_without_the_esp_mounted_nothing_is_written(tmp_path):
    boot, esp = tmp_path / "boot", tmp_path / "esp"
    boot.mkdir()
    esp.mkdir()
    install(boot, "6.12.1+deb13-amd64", b"K1", b"I1")
    res = sync(boot, esp)
    assert "not found" in res.stderr and "mounted" in res.stderr
    assert list(esp.iterdir()) == []
