"""The OpenWrt package list (roles/base defaults, base_openwrt_packages) is enough Python for the
agent and for the Ansible modules the roles run on a router, checked with this machine's CPython
restricted to the modules those OpenWrt packages install (tests/openwrtlab.py). Not a router: no
musl, no MIPS/ARM build, no real opkg; what this proves is which python3-* packages are needed."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import rolerender
import yaml
from openwrtlab import cryptography_only, light_python, package_of

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {p["name"] for p in yaml.safe_load((ROOT / "roles/base/defaults/main.yml").read_text())[
    "base_openwrt_packages"]}
AGENT_MODULES = sorted(p.stem for p in (ROOT / "agent/idlewire_agent").glob("*.py") if p.stem != "__init__")


def agent_python(tmp: Path, packages: set[str]) -> tuple[Path, Path]:
    return light_python(tmp, packages, [str(ROOT / "agent"), str(cryptography_only(tmp))])


def test_every_agent_module_imports_with_the_package_list(tmp_path):
    py, log = agent_python(tmp_path, PACKAGES)
    code = f"import importlib\nfor m in {AGENT_MODULES!r}: importlib.import_module('idlewire_agent.' + m)\nprint('ok')"
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr[-2000:]
    refused = {package_of(m) for m in log.read_text().split()}
    assert not refused - {"python3-ctypes"}, refused  # an optional import only


def test_the_stand_in_bites_without_a_needed_package(tmp_path):
    py, log = agent_python(tmp_path, PACKAGES - {"python3-logging"})
    r = subprocess.run([str(py), "-c", "import idlewire_agent.agent"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "No module named 'logging' (not in the OpenWrt packages)" in r.stderr
    assert "logging" in log.read_text().split()


def test_agent_checks_its_rendered_config_with_the_package_list(tmp_path):
    conf = tmp_path / "node.toml"
    conf.write_text(rolerender.render("agent", "etc/idlewire/node.toml.j2", {"agent_state_dir": "/etc/idlewire-agent",
                                                                            "agent_wan_interface": "wan"}))
    py, _ = agent_python(tmp_path, PACKAGES)
    r = subprocess.run([str(py), "-m", "idlewire_agent", "check-config", str(conf)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


PLAY = """
- hosts: all
  gather_facts: true
  gather_subset: [min]
  tasks:
    - ansible.builtin.file: {path: "{{ d }}", state: directory, mode: "0755"}
    - ansible.builtin.copy: {content: "x\\n", dest: "{{ d }}/f", mode: "0644"}
    - ansible.builtin.template: {src: "{{ playbook_dir }}/t.j2", dest: "{{ d }}/t", mode: "0644",
                                 validate: "test -s %s"}
    - ansible.builtin.stat: {path: "{{ d }}/f"}
    - ansible.builtin.command: "true"
      changed_when: false
    - ansible.builtin.slurp: {src: "{{ d }}/f"}
    - ansible.builtin.assert: {that: ansible_facts.python.version.major == 3}
    - ansible.builtin.uri: {url: "{{ url }}", return_content: true}
      register: health
    - ansible.builtin.assert: {that: health.json.version == "9.9"}
    - community.general.openwrt_init: {name: idlewire-no-such-service, enabled: true}
      register: init
      ignore_errors: true
    - ansible.builtin.assert: {that: init.msg == "service idlewire-no-such-service does not exist"}
"""


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"ok": True, "version": "9.9"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_ansible_modules_the_roles_use_run_with_the_package_list(tmp_path):
    """setup (facts), file, copy, template, stat, command, slurp, uri (upgrade.yml's health gate)
    and community.general.openwrt_init, run by ansible-playbook with the stand-in interpreter."""
    py, log = light_python(tmp_path, PACKAGES)
    (tmp_path / "t.j2").write_text("{{ 1 + 1 }}\n")
    (tmp_path / "play.yml").write_text(PLAY)
    (tmp_path / "ansible.cfg").write_text("[defaults]\n")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = subprocess.run(
            [str(Path(sys.executable).parent / "ansible-playbook"), "-c", "local", "-i", "localhost,",
             "-e", json.dumps({"ansible_python_interpreter": str(py), "d": str(tmp_path / "out"),
                               "url": f"http://127.0.0.1:{server.server_port}/health"}),
             str(tmp_path / "play.yml")],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
            env={"ANSIBLE_CONFIG": str(tmp_path / "ansible.cfg"), "PATH": "/usr/bin:/bin",
                 "ANSIBLE_LOCAL_TEMP": str(tmp_path / "atmp"), "ANSIBLE_REMOTE_TEMP": str(tmp_path / "rtmp")})
    finally:
        server.shutdown()
    # 13 tasks: 12 ok, openwrt_init's expected failure ignored (and asserted on just after).
    assert re.search(r"localhost\s+: ok=12 .* failed=0 .* ignored=1", r.stdout), r.stdout[-3000:]
    refused = {package_of(m) for m in log.read_text().split()}
    assert not refused - {"python3-ctypes"}, refused  # an optional import only


def test_ansible_modules_need_more_than_python3_light(tmp_path):
    """Why the list has python3-codecs, -decimal, -logging and -multiprocessing: without them the
    facts module (Ansible 2.19's module_utils) does not even start."""
    py, log = light_python(tmp_path, {"python3-light"})
    (tmp_path / "ansible.cfg").write_text("[defaults]\n")
    r = subprocess.run([str(Path(sys.executable).parent / "ansible"), "-c", "local", "-i", "localhost,", "localhost",
                        "-m", "ansible.builtin.setup", "-a", "gather_subset=min",
                        "-e", f"ansible_python_interpreter={py}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={"ANSIBLE_CONFIG": str(tmp_path / "ansible.cfg"), "PATH": "/usr/bin:/bin",
                            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "atmp")})
    assert r.returncode != 0
    assert {package_of(m) for m in log.read_text().split()} & {"python3-codecs", "python3-decimal"}
