"""Bad input to `idlewire build` gets one line that names the file/field and the fix, exit 2,
and leaves nothing under a final artifact name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOOD_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx6d0v1dF8xS3nVg6f5n3m0l3gxYy3Q2w9Yt2wJk3aa t@h"


def idlewire(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "idlewire", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=120)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_target_lists_the_real_ones(tmp_path):
    msg = one_line_error(idlewire("build", "--target", "pi5", "--out", str(tmp_path)))
    assert "unknown target 'pi5'" in msg and "rpi4-arm64" in msg and "x86_64" in msg


@pytest.mark.parametrize(("yaml_text", "expect"), [
    ("name: t\nsuite: [1\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ("name: t\nsuite: trixie\narchitecture: mips\n", "field 'architecture': expected one of amd64, arm64"),
    ("name: t\nsuite: trixie\narchitecture: arm64\npackages: vim\n", "field 'packages': expected a list"),
    ("name: t\nsuite: trixie\narchitecture: arm64\npackages: [a]\nsize: 3\n", "field 'size': unknown setting"),
])
def test_malformed_target_names_file_and_field(tmp_path, yaml_text, expect):
    target = write(tmp_path / "bad.yml", yaml_text)
    msg = one_line_error(idlewire("build", "--target", str(target), "--out", str(tmp_path / "o")))
    assert str(target) in msg and expect in msg


def test_bad_partition_size_names_the_field(tmp_path):
    text = (ROOT / "image/targets/x86_64.yml").read_text().replace("size: 256MiB", "size: 256 MB")
    msg = one_line_error(idlewire("build", "--target", str(write(tmp_path / "t.yml", text))))
    assert "layout.partitions[0].size" in msg and "256MiB or 2GiB" in msg


@pytest.mark.parametrize(("site", "expect"), [
    ("hostname: Bad_Host\n", "field 'hostname'"),
    ("ssh_authorized_keys: ['hunter2']\n", "field 'ssh_authorized_keys'[0]: expected an OpenSSH public key"),
    ("vars: {password: x}\n", "'password' is not a role variable"),
    ("hostnme: x\n", "field 'hostnme': unknown setting"),
])
def test_malformed_site_names_file_and_field(tmp_path, site, expect):
    path = write(tmp_path / "site.yml", site)
    msg = one_line_error(idlewire("build", "--target", "x86_64", "--config", str(path), "--out", str(tmp_path)))
    assert str(path) in msg and expect in msg


def test_missing_site_file(tmp_path):
    msg = one_line_error(idlewire("build", "--config", str(tmp_path / "nope.yml")))
    assert "nope.yml: no such file" in msg


def test_no_login_key_refuses_unless_allowed(tmp_path):
    msg = one_line_error(idlewire("build", "--target", "x86_64", "--out", str(tmp_path)))
    assert "no SSH key" in msg and "--allow-no-login" in msg
    assert not list(tmp_path.glob("*.img*"))


@pytest.mark.skipif(os.geteuid() != 0, reason="the checks below run after the root check")
def test_unreachable_mirror(tmp_path):
    text = (ROOT / "image/targets/x86_64.yml").read_text().replace(
        "mirror: http://deb.debian.org/debian", "mirror: http://127.0.0.1:9/debian")
    target = write(tmp_path / "x86_64.yml", text)
    site = write(tmp_path / "site.yml", f"ssh_authorized_keys: ['{GOOD_KEY}']\n")
    out = tmp_path / "out"
    msg = one_line_error(idlewire("build", "--target", str(target), "--config", str(site), "--out", str(out),
                                  env={"IDLEWIRE_CACHE": str(tmp_path / "cache")}))
    assert "cannot reach the Debian mirror http://127.0.0.1:9/debian" in msg
    assert not [p for p in out.iterdir() if p.is_file()]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_missing_tool_without_root_install(tmp_path):
    site = write(tmp_path / "site.yml", f"ssh_authorized_keys: ['{GOOD_KEY}']\n")
    bindir = tmp_path / "bin"  # every tool the build uses but mmdebstrap
    bindir.mkdir()
    for tool in ("tar", "unshare", "mount", "dpkg-query", "sfdisk", "mkfs.vfat", "mcopy", "mkfs.ext4",
                 "faketime", "xz", "zstd", "du", "ssh-keygen", "debugfs"):
        (bindir / tool).symlink_to(shutil.which(tool))
    msg = one_line_error(idlewire("build", "--target", "x86_64", "--config", str(site), "--out", str(tmp_path / "o"),
                                  env={"IDLEWIRE_CACHE": str(tmp_path / "cache"), "PATH": str(bindir)}))
    assert "missing tool: mmdebstrap" in msg and "apt-get install mmdebstrap" in msg


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        site = write(tmp_path / "site.yml", f"ssh_authorized_keys: ['{GOOD_KEY}']\n")
        msg = one_line_error(idlewire("build", "--target", "x86_64", "--config", str(site),
                                      "--out", str(small / "out"), env={"IDLEWIRE_CACHE": str(small / "cache")}))
        assert "MiB free; a build needs" in msg and "IDLEWIRE_CACHE" in msg
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_targets_listing_json():
    import json

    res = idlewire("targets", "--json")
    assert res.returncode == 0
    names = {t["name"]: t["architecture"] for t in json.loads(res.stdout)}
    assert names == {"rpi4-arm64": "arm64", "x86_64": "amd64"}
