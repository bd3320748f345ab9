"""The repository as the Ansible collection idlewire.node, for real: `ansible-galaxy collection build`
into a temporary directory, `ansible-galaxy collection install` of the tarball, then the playbooks
run by their collection names from a directory outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def run(*argv: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("collection")
    r = run("ansible-galaxy", "collection", "build", "--output-path", str(tmp / "dist"), str(ROOT), cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    tarball = tmp / "dist" / f"idlewire-node-{VERSION}.tar.gz"
    assert tarball.exists(), r.stdout
    r = run("ansible-galaxy", "collection", "install", str(tarball), "-p", str(tmp / "collections"), cwd=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    outside = tmp / "elsewhere"  # an operator's own repository: no roles/, no ansible.cfg of ours
    outside.mkdir()
    (outside / "ansible.cfg").write_text("[defaults]\nretry_files_enabled = False\n")
    (outside / "inventory.yml").write_text(
        "all:\n  children:\n    idlewire:\n      hosts:\n        node-1: {ansible_host: 192.0.2.1}\n")
    env = {"ANSIBLE_COLLECTIONS_PATH": str(tmp / "collections"), "ANSIBLE_CONFIG": str(outside / "ansible.cfg")}
    return {"tarball": tarball, "cwd": outside, "env": env,
            "root": tmp / "collections" / "ansible_collections" / "idlewire" / "node"}


def test_version_is_the_project_version():
    assert yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"] == VERSION


def test_tarball_has_roles_playbooks_and_the_agent_sources_only(installed):
    with tarfile.open(installed["tarball"]) as tar:
        names = set(tar.getnames())
    agent = {p.name for p in (ROOT / "agent/idlewire_agent").glob("*.py")}
    assert {n.rpartition("/")[2] for n in names if n.startswith("agent/idlewire_agent/")} == agent
    for must in ("roles/agent/tasks/main.yml", "roles/base/files/openwrt-bootstrap.sh", "playbooks/site.yml",
                 "playbooks/upgrade.yml", "playbooks/bake.yml", "meta/runtime.yml", "README.md",
                 "inventory/example.yml", "inventory/group_vars/openwrt.yml"):
        assert must in names
    assert not [n for n in names if n.split("/")[0] in ("tests", "tools", "bench", "image", ".venv", "out", "dist",
                                                        "setup.py", "MANIFEST.in")
                or "__pycache__" in n or n.endswith(".pyc") or ".egg-info" in n]


@pytest.mark.parametrize("playbook", ["site", "bake", "upgrade"])
def test_playbooks_by_collection_name_from_elsewhere(installed, playbook):
    r = run("ansible-playbook", "-i", "inventory.yml", f"idlewire.node.{playbook}", "--syntax-check",
            cwd=installed["cwd"], env=installed["env"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ansible_collections/idlewire/node/playbooks/{playbook}.yml" in r.stdout


def test_syntax_check_does_resolve_roles(installed):
    """The check above would catch a role name the collection cannot resolve."""
    broken = installed["root"] / "playbooks" / "broken.yml"
    broken.write_text("- hosts: all\n  roles:\n    - role: no_such_role\n")
    try:
        r = run("ansible-playbook", "-i", "inventory.yml", "idlewire.node.broken", "--syntax-check",
                cwd=installed["cwd"], env=installed["env"])
    finally:
        broken.unlink()
    assert r.returncode != 0 and "no_such_role" in r.stdout + r.stderr


def test_agent_role_finds_its_sources_in_the_installed_collection(installed, tmp_path):
    """agent_source_dir defaults to ROLE/../../agent/idlewire_agent: run the role in check mode on
    this machine (nothing is changed) and see it pack every agent module from the collection."""
    (installed["cwd"] / "agent.yml").write_text(yaml.safe_dump([{
        "name": "Agent role from the collection", "hosts": "localhost", "gather_facts": True,
        "gather_subset": ["min"],
        "roles": [{"role": "idlewire.node.agent", "agent_install_dir": str(tmp_path / "lib"),
                   "agent_config_dir": str(tmp_path / "etc")}]}]))
    r = run("ansible-playbook", "-c", "local", "-i", "localhost,", "agent.yml", "--check", "-e", "idlewire_baking=true",
            "-e", json.dumps({"ansible_python_interpreter": sys.executable}), cwd=installed["cwd"],
            env={**installed["env"], "ANSIBLE_STDOUT_CALLBACK": "json"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    plays = json.loads(r.stdout)["plays"]
    task = next(t for t in plays[0]["tasks"] if t["task"]["name"].endswith("modules into the archive"))
    argv = task["hosts"]["localhost"]["cmd"]
    sources = installed["root"] / "agent" / "idlewire_agent"
    assert Path(argv[argv.index("--directory") + 1]).resolve() == sources.resolve()
    packed = set(argv[argv.index("--") + 1:])
    assert packed == {p.name for p in sources.glob("*.py")} and "agent.py" in packed
    task = next(t for t in plays[0]["tasks"] if t["task"]["name"].endswith("Install the agent's Python package"))
    assert task["hosts"]["localhost"]["changed"]  # check mode: it would be installed
    assert not (tmp_path / "lib").exists()  # check mode: nothing written
