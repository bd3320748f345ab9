"""idlewire installed from its wheel, outside the checkout, as a user gets it.

`python -m build` makes the sdist and then the wheel from that sdist (so MANIFEST.in and setup.py
are both exercised); the wheel goes with `pip install --no-deps` into a new virtual environment in
a temporary directory; every command runs from another temporary directory with nothing of the
checkout on sys.path. The wheel's dependencies (ansible alone is ~40,000 files) are installed
once per set of requirements into a venv cached under ~/.cache/idlewire/wheel-test/ and joined to
each new venv by a .pth file; that venv holds no idlewire (checked), so whatever idlewire runs
comes from the wheel. Measured here: ~3 min cold (the first run on a machine, installing ansible),
~1 min warm (a third of it the isolated sdist and wheel build).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from idlewire import bmap
from idlewire.paths import SHIPPED, cache_dir
from imagelab import make_image

ROOT = Path(__file__).resolve().parents[2]
PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICCwTJHb49C0zwb8vi6tjbdXa2mX9kiOu2khkhPP5LMu vendor@desk"

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("mcopy", "sfdisk", "mkfs.vfat", "mkfs.ext4")),
                                reason="needs mtools, fdisk, dosfstools, e2fsprogs")


def _run(cmd: list, *, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy: setuptools writes idlewire.egg-info/ and build/ into the source tree, which
    # other tests read at the same time (make test runs tests/unit on two workers)
    src = tmp_path_factory.mktemp("src") / "idlewire"
    top = {".git", ".venv", "out", "build", ".pytest_cache", ".ruff_cache", ".ansible"}  # at the top only

    def ignore(d: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        return skip | (top & set(names) if Path(d) == ROOT else set())

    shutil.copytree(ROOT, src, symlinks=True, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", out, src], cwd=out)
    (whl,) = out.glob("idlewire-*.whl")
    return whl


def _requirements(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
    return sorted(r for r in reqs if "extra ==" not in r)


def _deps_venv(reqs: list[str]) -> Path:
    """A venv with exactly the wheel's runtime requirements, cached by them and by the Python."""
    key = hashlib.sha256(json.dumps([reqs, sys.version, platform.machine()]).encode()).hexdigest()[:16]
    base = cache_dir() / "wheel-test"
    base.mkdir(parents=True, exist_ok=True)
    venv = base / f"deps-{key}"
    done = venv / ".complete"
    with (base / f"deps-{key}.lock").open("w") as lock:  # another checkout's test may be making it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(venv, ignore_errors=True)  # a half-made one from an interrupted run
            _run([sys.executable, "-m", "venv", venv])
            _run([venv / "bin/python", "-m", "pip", "install", "-q", *reqs], timeout=1200)
            done.write_text("\n".join(reqs) + "\n")
        done.touch()  # last used: what _prune goes by
    _prune(base, keep=venv)
    return venv


def _prune(base: Path, keep: Path, days: int = 7) -> None:
    """Drop dependency venvs (~0.6 GB each) of requirement sets no run has used for `days`."""
    for old in base.glob("deps-*.lock"):
        venv = old.with_suffix("")
        done = venv / ".complete"
        if venv == keep or not done.exists() or time.time() - done.stat().st_mtime < days * 86400:
            continue
        with old.open("w") as lock, contextlib.suppress(BlockingIOError):  # in use right now: next time
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(venv, ignore_errors=True)


@pytest.fixture(scope="module")
def env(wheel, tmp_path_factory) -> dict:
    """A new venv holding the wheel; the environment and working directory to run it from."""
    tmp = tmp_path_factory.mktemp("installed")
    deps = _deps_venv(_requirements(wheel))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    site = venv / "lib" / PYVER / "site-packages"
    (site / "idlewire-test-deps.pth").write_text(f"{deps / 'lib' / PYVER / 'site-packages'}\n")
    _run([sys.executable, "-m", "pip", "--python", venv / "bin/python", "install", "-q", "--no-deps",
          "--no-index", wheel])
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    path = f"{venv / 'bin'}:{deps / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return {"venv": venv, "deps": deps, "site": site, "cwd": elsewhere,
            "env": {**clean, "PATH": path, "PYTHONDONTWRITEBYTECODE": "1"}}


def iw(env: dict, *args, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([str(env["venv"] / "bin/idlewire"), *map(str, args)], capture_output=True, text=True,
                       cwd=env["cwd"], env=env["env"], timeout=timeout)
    if check:
        assert r.returncode == 0, f"idlewire {args}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_wheel_holds_the_two_packages_and_the_shipped_tree_only(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        modes = {n: z.getinfo(n).external_attr >> 16 for n in names}
    tops = {n.split("/")[0] for n in names}
    assert tops == {"idlewire", "idlewire_agent", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "idlewire/uci.py" not in names  # test-only code lives in tests/
    data = sorted(n.removeprefix("idlewire/data/") for n in names if n.startswith("idlewire/data/"))
    # exactly the checkout's files below SHIPPED: a path MANIFEST.in forgot would be missing here
    want = []
    for rel in SHIPPED:
        src = ROOT / rel
        files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
        want += [str(f.relative_to(ROOT)) for f in files if "__pycache__" not in f.parts and f.suffix != ".pyc"]
    assert data == sorted(want)
    tests = {n for n in data if n.startswith("tests/")}
    assert tests and all(n.startswith("tests/infra/") for n in tests)  # the node suite, nothing else of tests/
    assert modes["idlewire/data/image/boot/idlewire-esp-sync"] & 0o111  # run by the bake as it is


def test_nothing_of_the_checkout_is_used(env):
    probe = ("import json, sys, idlewire, idlewire_agent, idlewire.paths as p; print(json.dumps("
             "[idlewire.__file__, idlewire_agent.__file__, str(p.data_dir()), sys.path]))")
    r = _run([env["venv"] / "bin/python", "-c", probe], cwd=env["cwd"], env=env["env"])
    iw_file, agent_file, data, syspath = json.loads(r.stdout)
    for f in (iw_file, agent_file, data):
        assert f.startswith(str(env["site"])), f
    assert data == str(env["site"] / "idlewire" / "data")
    assert not [p for p in syspath if p.startswith(str(ROOT))]
    deps_site = env["deps"] / "lib" / PYVER / "site-packages"
    assert not list(deps_site.glob("idlewire*")) and not list(deps_site.glob("__editable__*idlewire*"))
    # the wheel's declared requirements are all there is, and they are met
    _run([sys.executable, "-m", "pip", "--python", env["venv"] / "bin/python", "check"], env=env["env"])


def test_targets(env):
    out = iw(env, "targets").stdout
    assert re.search(r"^rpi4-arm64\s+arm64\s", out, re.M) and re.search(r"^x86_64\s+amd64\s", out, re.M)
    assert {t["name"] for t in json.loads(iw(env, "targets", "--json").stdout)} == {"rpi4-arm64", "x86_64"}
    bad = iw(env, "build", "--target", "nosuch", check=False)
    assert bad.returncode == 2 and "available: rpi4-arm64, x86_64" in bad.stderr


def test_stamp_and_flash_verify_only(env, tmp_path):
    golden = make_image(tmp_path / "idlewire-test-1.img", data_mib=1)
    unit = tmp_path / "unit.yml"
    unit.write_text(f"unit: shop-1\nhostname: iw-1\nssh_authorized_keys: ['{KEY}']\n")
    out = tmp_path / "one.img"
    unit_id, pub, path = iw(env, "stamp", golden, "--unit", unit, "--out", out).stdout.strip().split("\t")
    assert (unit_id, path) == ("shop-1", str(out)) and len(pub) == 44
    card = tmp_path / "card.img"
    iw(env, "flash", out, card, timeout=300)
    assert iw(env, "flash", out, card, "--verify-only").returncode == 0
    plan = bmap.parse(tmp_path / "one.bmap")
    first, last, _ = max(plan.ranges, key=lambda r: r[1] - r[0])
    victim = (first + last) // 2 * plan.block_size  # inside data the image maps
    with card.open("r+b") as f:  # one byte flipped behind the flasher's back
        f.seek(victim)
        byte = f.read(1)
        f.seek(victim)
        f.write(bytes([byte[0] ^ 1]))
    assert iw(env, "flash", out, card, "--verify-only", check=False).returncode == 1


def test_verify_runs_the_installed_suite(env):
    """A node on a closed loopback port: the suite from the wheel runs and reports it unreachable."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    (env["cwd"] / "inv.yml").write_text(
        f"all:\n  hosts:\n    node-1: {{ansible_host: 127.0.0.1, ansible_port: {port}, ansible_user: idlewire}}\n")
    r = iw(env, "verify", "-i", "inv.yml", "--json", "-n", "1", check=False, timeout=180)
    assert r.returncode == 1, r.stderr
    (host,) = json.loads(r.stdout)["hosts"]
    assert host["host"] == "node-1" and host["status"] == "unreachable" and host["failed"]
    assert (env["cwd"] / "idlewire-verify.xml").exists()


def test_build_finds_roles_and_playbooks(env):
    """What `idlewire build` hands Ansible resolves in the installed tree: its ansible.cfg finds
    the roles, and the agent role's sources (ROLE/../../agent/idlewire_agent) are there."""
    data = env["site"] / "idlewire" / "data"
    books = [data / "playbooks" / f"{name}.yml" for name in ("bake", "site", "upgrade")]
    r = _run([env["deps"] / "bin/ansible-playbook", "-i", "localhost,", "--syntax-check", *books], cwd=data,
             env={**env["env"], "ANSIBLE_CONFIG": str(data / "ansible.cfg")})
    assert all(f"playbook: {book}" in r.stdout for book in books), r.stdout
    assert (data / "roles/agent/../../agent/idlewire_agent/agent.py").is_file()
    probe = "from idlewire.build import bake; print(bake.tree_hash(), bake.ESP_SYNC)"
    r = _run([env["venv"] / "bin/python", "-c", probe], cwd=env["cwd"], env=env["env"])
    assert r.stdout.split()[1] == str(data / "image/boot/idlewire-esp-sync")
    assert os.access(data / "image/boot/idlewire-esp-sync", os.X_OK)  # the bake runs it as it is


def _commands(help_text: str) -> list[str]:
    """The command names an argparse `commands:` section lists."""
    section = help_text.partition("\ncommands:\n")[2]
    return re.findall(r"^ {4}(\S+)\s", section, re.M)


def test_every_help_from_the_installed_wheel(env):
    todo, seen = [[]], []
    while todo:
        words = todo.pop()
        r = iw(env, *words, "--help")
        assert r.stdout.startswith(f"usage: idlewire {' '.join(words)}".rstrip()), r.stdout[:200]
        seen.append(" ".join(words))
        todo += [[*words, c] for c in _commands(r.stdout)]
    assert {"targets", "build", "stamp", "flash", "verify", "console", "client connect", "receipts verify"} <= set(seen)


def test_paths_choose_the_checkout_here():
    """Run from the checkout (an editable install), the same code reads the repository's tree."""
    from idlewire.paths import data_dir

    assert data_dir() == ROOT
