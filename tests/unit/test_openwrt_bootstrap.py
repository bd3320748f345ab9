"""roles/base/files/openwrt-bootstrap.sh, run for real by dash and by busybox sh (OpenWrt's shell is
busybox ash) against fake /proc/meminfo and df output, with stand-in opkg/apk commands that record
what they are asked to do. The real opkg/apk are not available here: what is tested is the script's
logic (floors, messages, which packages it installs, check mode, apk-or-opkg detection)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / "roles/base/files/openwrt-bootstrap.sh").read_text()
SEE = 'see "OpenWrt budget" in roles/base/README.md'

SHELLS = [pytest.param(["sh"], id="dash")]
if shutil.which("busybox"):
    SHELLS.append(pytest.param(["busybox", "sh"], id="busybox"))
else:  # keep the id so a missing busybox shows up as a skip, not as a silently smaller test
    SHELLS.append(pytest.param(["busybox", "sh"], id="busybox",
                               marks=pytest.mark.skip(reason="busybox not installed (apt install busybox-static)")))

PKG_STUB = r"""#!/bin/sh
# Stand-in for opkg/apk: installed names in $STUB/installed, every call appended to $STUB/calls.
echo "$(basename "$0") $*" >> "$STUB/calls"
me=$(basename "$0")
case "$me $1" in
  "opkg list-installed") grep -qx "$2" "$STUB/installed" && echo "$2 - 1.0-1"; exit 0 ;;
  "apk info") grep -qx "$3" "$STUB/installed"; exit $? ;;
  "opkg update"|"apk update") [ -e "$STUB/fail-update" ] && { echo "wget: download error"; exit 4; }; exit 0 ;;
  "opkg install"|"apk add") shift; [ -e "$STUB/fail-install" ] && { echo "Collected errors: $*"; exit 255; }
      for p in "$@"; do echo "$p" >> "$STUB/installed"; done; exit 0 ;;
esac
echo "unexpected: $me $*" >&2; exit 99
"""

DF = """Filesystem           1024-blocks    Used Available Capacity Mounted on
overlayfs:/overlay        {size}     {used}    {free}  10% /overlay
"""

PACKAGES = "python3-light:15000 wireguard-tools:100 kmod-ifb:20 nftables-json:1100"


class Router:
    def __init__(self, tmp: Path, manager: str = "opkg"):
        self.dir = tmp
        (tmp / "bin").mkdir()
        stub = tmp / "bin" / manager
        stub.write_text(PKG_STUB)
        stub.chmod(0o755)
        (tmp / "installed").write_text("")
        (tmp / "calls").write_text("")
        self.meminfo(250000)
        self.df(free=60000)

    def meminfo(self, kib: int) -> None:
        (self.dir / "meminfo").write_text(f"MemTotal:       {kib} kB\nMemFree:        {kib // 2} kB\n")

    def df(self, free: int) -> None:
        (self.dir / "df.txt").write_text(DF.format(size=free + 9000, used=9000, free=free))
        (self.dir / "bin" / "fakedf").write_text(
            f'#!/bin/sh\necho "$*" >> "{self.dir}/df-args"\ncat "{self.dir}/df.txt"\n')
        (self.dir / "bin" / "fakedf").chmod(0o755)

    def have(self, *names: str) -> None:
        (self.dir / "installed").write_text("".join(f"{n}\n" for n in names))

    def calls(self) -> list[str]:
        return (self.dir / "calls").read_text().splitlines()

    def run(self, shell: list[str], **env: str) -> subprocess.CompletedProcess:
        full = {"PATH": f"{self.dir}/bin:/usr/bin:/bin", "STUB": str(self.dir), "IW_HOST": "router-7",
                "IW_PACKAGES": PACKAGES, "IW_RESERVE_KIB": "4096", "IW_MIN_RAM_KIB": "112640",
                "IW_MEMINFO": str(self.dir / "meminfo"), "IW_FLASH": "/overlay", "IW_DF": "fakedf", **env}
        return subprocess.run([*shell, "-c", SCRIPT], env=full, capture_output=True, text=True, timeout=30)


@pytest.fixture
def router(tmp_path):
    return Router(tmp_path)


@pytest.mark.parametrize("shell", SHELLS)
def test_ram_below_floor_is_refused_with_one_line(shell, router):
    router.meminfo(60000)
    r = router.run(shell)
    assert r.returncode == 2
    assert r.stdout == ("error: router-7: 60000 KiB RAM (MemTotal), below idlewire's floor of 112640 KiB on "
                        f"OpenWrt; {SEE}\n")
    assert router.calls() == []  # nothing asked of the package manager


@pytest.mark.parametrize("shell", SHELLS)
def test_flash_below_what_the_missing_packages_need_is_refused(shell, router):
    router.have("nftables-json")  # what fw4 images already have
    router.df(free=9216)
    r = router.run(shell)
    assert r.returncode == 2
    # 15000 + 100 + 20 missing + 4096 reserve = 19216; the fresh-router floor counts all four.
    assert r.stdout == ("error: router-7: 9216 KiB free flash on /overlay, below the 19216 KiB the missing "
                        f"packages need (floor on a fresh router: 20316 KiB); {SEE}\n")
    assert not any(c.startswith("opkg install") for c in router.calls())
    assert (router.dir / "df-args").read_text() == "/overlay\n"


@pytest.mark.parametrize("shell", SHELLS)
def test_above_the_floors_installs_only_what_is_missing(shell, router):
    router.have("nftables-json", "kmod-ifb")
    r = router.run(shell)
    assert (r.returncode, r.stdout) == (0, "installed: python3-light wireguard-tools (opkg)\n"), r.stderr
    assert [c for c in router.calls() if not c.startswith("opkg list-installed")] == [
        "opkg update", "opkg install python3-light wireguard-tools"]
    # A second run finds everything and changes nothing, although the flash is now fuller.
    router.df(free=100)
    r = router.run(shell)
    assert (r.returncode, r.stdout) == (0, "ok: router-7: 4 packages present (opkg)\n")


@pytest.mark.parametrize("shell", SHELLS)
def test_exactly_at_the_floor_is_enough(shell, router):
    router.meminfo(112640)
    router.df(free=20316)
    r = router.run(shell)
    assert r.returncode == 0 and r.stdout.startswith("installed: "), r.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_check_mode_reports_and_installs_nothing(shell, router):
    r = router.run(shell, IW_CHECK="1")
    assert (r.returncode, r.stdout) == (0, "would install: python3-light wireguard-tools kmod-ifb nftables-json "
                                           "(opkg)\n")
    assert all(c.startswith("opkg list-installed") for c in router.calls())


@pytest.mark.parametrize("shell", SHELLS)
def test_enforce_off_goes_on_below_the_floors(shell, router):
    router.meminfo(60000)
    router.df(free=100)
    r = router.run(shell, IW_ENFORCE="0")
    assert r.returncode == 0 and r.stdout.startswith("installed: "), r.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_apk_is_used_on_openwrt_25(shell, tmp_path):
    router = Router(tmp_path, manager="apk")
    router.have("python3-light")
    r = router.run(shell)
    assert (r.returncode, r.stdout) == (0, "installed: wireguard-tools kmod-ifb nftables-json (apk)\n"), r.stderr
    assert [c for c in router.calls() if not c.startswith("apk info")] == [
        "apk update", "apk add wireguard-tools kmod-ifb nftables-json"]


@pytest.mark.parametrize("shell", SHELLS)
def test_package_manager_failure_is_one_line_with_its_last_words(shell, router):
    (router.dir / "fail-install").touch()
    r = router.run(shell)
    assert r.returncode == 3
    assert r.stdout == ("error: router-7: opkg failed (exit 255): Collected errors: python3-light wireguard-tools "
                        "kmod-ifb nftables-json; full log in /tmp/idlewire-bootstrap.log\n")


@pytest.mark.parametrize("shell", SHELLS)
def test_no_package_manager_and_bad_inputs(shell, tmp_path):
    router = Router(tmp_path)
    (tmp_path / "bin" / "opkg").unlink()
    r = router.run(shell)
    assert (r.returncode, r.stdout) == (2, "error: router-7: neither apk nor opkg found: not an OpenWrt system?\n")
    router = Router(tmp_path / "b") if (tmp_path / "b").mkdir() is None else None
    (router.dir / "meminfo").write_text("garbage\n")
    r = router.run(shell)
    assert (r.returncode, r.stdout) == (2, f"error: router-7: cannot read MemTotal from {router.dir}/meminfo\n")
    router.meminfo(250000)
    r = router.run(shell, IW_PACKAGES="python3-light:lots")
    assert (r.returncode, r.stdout) == (2, "error: router-7: package size of python3-light is not a number of KiB: "
                                           "python3-light:lots\n")


# roles/base/files/uci-ensure.sh against a stand-in `uci` keeping KEY=VALUE lines in a file (the
# real uci is not available here): what is tested is which options it sets and commits, and that
# --check changes nothing.
UCI_ENSURE = (ROOT / "roles/base/files/uci-ensure.sh").read_text()
UCI_STUB = r"""#!/bin/sh
echo "uci $*" >> "$STUB/calls"
[ "$1" = -q ] && shift
case "$1" in
  get) line=$(grep -F "$2=" "$STUB/uci.db" | head -n 1); [ -n "$line" ] || exit 1; echo "${line#*=}" ;;
  set) key=${2%%=*}; grep -vF "$key=" "$STUB/uci.db" > "$STUB/uci.tmp"; echo "$2" >> "$STUB/uci.tmp"
       mv "$STUB/uci.tmp" "$STUB/uci.db" ;;
  commit) echo "$2" >> "$STUB/commits" ;;
  *) exit 99 ;;
esac
"""


def uci_ensure(shell, tmp: Path, db: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str], str]:
    (tmp / "bin").mkdir(exist_ok=True)
    (tmp / "bin" / "uci").write_text(UCI_STUB)
    (tmp / "bin" / "uci").chmod(0o755)
    (tmp / "uci.db").write_text(db)
    for f in ("calls", "commits"):
        (tmp / f).write_text("")
    r = subprocess.run([*shell, "-c", UCI_ENSURE, "uci-ensure", *args], capture_output=True, text=True,
                       env={"PATH": f"{tmp}/bin:/usr/bin:/bin", "STUB": str(tmp)}, timeout=30)
    return r, (tmp / "commits").read_text().split(), (tmp / "uci.db").read_text()


@pytest.mark.parametrize("shell", SHELLS)
def test_uci_ensure_sets_what_differs_and_commits_once(shell, tmp_path):
    db = "system.@system[0].hostname=OpenWrt\ndropbear.@dropbear[0].PasswordAuth=off\n"
    r, commits, after = uci_ensure(shell, tmp_path, db, "--apply", "system.@system[0].hostname=node 7's",
                                   "dropbear.@dropbear[0].PasswordAuth=off",
                                   "dropbear.@dropbear[0].RootPasswordAuth=off")
    assert (r.returncode, r.stdout) == (0, "changed: system.@system[0].hostname\n"
                                           "changed: dropbear.@dropbear[0].RootPasswordAuth\n"), r.stderr
    assert commits == ["system", "dropbear"]
    assert "system.@system[0].hostname=node 7's\n" in after
    assert "dropbear.@dropbear[0].RootPasswordAuth=off\n" in after
    # Again: nothing differs, nothing is set or committed.
    r, commits, _ = uci_ensure(shell, tmp_path, after, "--apply", "system.@system[0].hostname=node 7's")
    assert (r.returncode, r.stdout, commits) == (0, "", [])


@pytest.mark.parametrize("shell", SHELLS)
def test_uci_ensure_check_changes_nothing(shell, tmp_path):
    db = "system.@system[0].hostname=OpenWrt\n"
    r, commits, after = uci_ensure(shell, tmp_path, db, "--check", "system.@system[0].hostname=node7")
    assert (r.returncode, r.stdout, commits, after) == (0, "changed: system.@system[0].hostname\n", [], db)
    r, _, _ = uci_ensure(shell, tmp_path, db, "--apply", "no-equals-sign")
    assert (r.returncode, r.stderr) == (2, "error: no-equals-sign: expected PACKAGE.SECTION.OPTION=VALUE\n")


def test_documented_floors_are_the_defaults():
    """The budget table in roles/base/README.md and the floors in README.md are the role's defaults."""
    import yaml

    d = yaml.safe_load((ROOT / "roles/base/defaults/main.yml").read_text())
    packages = {p["name"]: p["kib"] for p in d["base_openwrt_packages"]}
    total = sum(packages.values())
    floor = total + d["base_openwrt_flash_reserve_kib"]
    role_readme = (ROOT / "roles/base/README.md").read_text()
    rows = {name: int(kib) for name, kib in re.findall(r"^\| ([a-z0-9-]+) \| (\d+) \|", role_readme, re.M)}
    assert rows == packages
    assert f"| **sum** | **{total}** | + reserve {d['base_openwrt_flash_reserve_kib']} = **{floor} KiB**" in role_readme
    assert f"**{floor} KiB" in role_readme and f"= **{d['base_openwrt_min_ram_kib']} KiB" in role_readme
    main = (ROOT / "README.md").read_text()
    assert f"{floor} KiB" in main and f"{d['base_openwrt_min_ram_kib']} KiB" in main
