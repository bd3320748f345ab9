"""Every OpenWrt template rendered with StrictUndefined (tests/rolerender.py) against its exact text,
with the settings of inventory/group_vars/openwrt.yml; the UCI output parsed back with
tests/infra/uci.py; the init scripts parsed by dash and busybox sh, and their start logic run
against stand-ins for OpenWrt's /lib/functions.sh and procd.sh (which do not exist here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import rolerender
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "infra"))  # the UCI reader ships with the node suite

from uci import parse  # noqa: E402

OPENWRT_VARS = yaml.safe_load((ROOT / "inventory/group_vars/openwrt.yml").read_text())
SHELLS = [pytest.param(["sh"], id="dash"),
          pytest.param(["busybox", "sh"], id="busybox",
                       marks=pytest.mark.skipif(not shutil.which("busybox"), reason="busybox not installed"))]


def render(role: str, template: str, **over) -> str:
    variables = {k: v for k, v in OPENWRT_VARS.items() if k.startswith(f"{role}_")}
    return rolerender.render(role, template, {f"{role}_platform": "openwrt", **variables, **over})


AGENT_INIT = """\
#!/bin/sh /etc/rc.common
# Ansible managed
# idlewire node agent under OpenWrt's procd: respawned, logged to logd, restarted when
# /etc/config/idlewire or the agent's configuration change.

START=95
STOP=10
USE_PROCD=1

PROG=/usr/bin/idlewire-agent

start_service() {
\tlocal enabled conf
\tconfig_load idlewire
\tconfig_get_bool enabled agent enabled 1
\t[ "$enabled" -eq 1 ] || return 0
\tconfig_get conf agent config /etc/idlewire/node.toml
\tmkdir -p /etc/idlewire-agent
\tchmod 0700 /etc/idlewire-agent
\tmkdir -p /etc/idlewire
\tchmod 0750 /etc/idlewire
\t"$PROG" check-config "$conf" || return 1
\tprocd_open_instance idlewire-agent
\tprocd_set_param command "$PROG" run --config "$conf"
\tprocd_set_param file "$conf"
\tprocd_set_param respawn 3600 5 0
\tprocd_set_param stdout 1
\tprocd_set_param stderr 1
\tprocd_set_param umask 0077
\tprocd_set_param env MALLOC_ARENA_MAX=1
\t# open files, soft and hard: the agent bounds its API connections to half of this (less a reserve)
\tprocd_set_param limits nofile="1024 1024"
\tprocd_close_instance
}

service_triggers() {
\tprocd_add_reload_trigger idlewire
}
"""

AGENT_UCI = """\
# Ansible managed
# Read by /etc/init.d/idlewire-agent (procd); the agent's own settings are in /etc/idlewire/node.toml.
# `uci set idlewire.agent.enabled=0; uci commit idlewire` stops the agent until the next Ansible run.

config agent 'agent'
\toption enabled '1'
\toption config '/etc/idlewire/node.toml'
"""

KEEP = """\
# Ansible managed
# Kept by sysupgrade: the agent's service settings, configuration, keys and metering ledger.
# (The packages are not kept: run playbooks/site.yml again after a sysupgrade.)
/etc/config/idlewire
/etc/idlewire/
/etc/idlewire-agent/
"""

FIREWALL_INIT = """\
#!/bin/sh /etc/rc.common
# Ansible managed
# Buyer isolation on OpenWrt: idlewire's nftables table inet idlewire, beside fw4's table
# inet fw4 (fw4 flushes only its own table on reload, so this one stays loaded). Loading replaces
# the table atomically; `running` says whether it is loaded.

START=19
STOP=91
EXTRA_COMMANDS="running"
EXTRA_HELP="\trunning\tExit 0 when table inet idlewire is loaded"

start() {
\tnft -f /etc/idlewire/firewall.nft
}

stop() {
\tnft delete table inet idlewire 2>/dev/null
\treturn 0
}

reload() {
\tstart
}

running() {
\tnft list table inet idlewire >/dev/null 2>&1
}
"""

DROPINS = {
    "input_wan": """\
# Ansible managed
# Included by fw4 at the top of chain input_wan (roles/firewall): buyers reach the WireGuard port.
udp dport 51820 counter accept comment "idlewire: buyers' WireGuard port"
""",
    "forward": """\
# Ansible managed
# Included by fw4 at the top of chain forward (roles/firewall): table inet idlewire's forward chain
# runs first (priority filter - 10) and drops what buyers may not reach; what it let through passes here.
iifname "iw0" counter accept comment "idlewire: buyers, filtered by table inet idlewire"
""",
    "srcnat": """\
# Ansible managed
# Included by fw4 at the top of chain srcnat (roles/firewall): no NAT here for buyers, so table inet
# idlewire masquerades them into the source-port block the shaper matches (61440-65535).
iifname "iw0" counter accept comment "idlewire: NAT by table inet idlewire"
""",
}


def test_agent_init_script_exact():
    assert render("agent", "etc/init.d/idlewire-agent.j2") == AGENT_INIT


def test_agent_uci_config_exact_and_parsed_back():
    text = render("agent", "etc/config/idlewire.j2")
    assert text == AGENT_UCI
    cfg = parse(text, "/etc/config/idlewire")
    assert [(s.type, s.name, s.options) for s in cfg.sections] == [
        ("agent", "agent", {"enabled": "1", "config": "/etc/idlewire/node.toml"})]


def test_uci_config_follows_the_config_dir():
    cfg = parse(render("agent", "etc/config/idlewire.j2", agent_config_dir="/srv/iw"))
    assert cfg.get("agent.config") == "/srv/iw/node.toml"


def test_sysupgrade_keeps_config_and_ledger():
    assert render("agent", "lib/upgrade/keep.d/idlewire-agent.j2") == KEEP


def test_firewall_init_script_exact():
    assert render("firewall", "etc/init.d/idlewire-firewall.j2") == FIREWALL_INIT


@pytest.mark.parametrize("chain", sorted(DROPINS))
def test_fw4_dropins_exact(chain):
    assert render("firewall", f"usr/share/nftables.d/chain-pre/{chain}/idlewire.nft.j2") == DROPINS[chain]


def test_dropins_follow_port_interface_and_zone():
    assert render("firewall", "usr/share/nftables.d/chain-pre/input_wan/idlewire.nft.j2",
                  firewall_tunnel_port=443, firewall_openwrt_wan_zone="wan6").splitlines()[1:] == [
        "# Included by fw4 at the top of chain input_wan6 (roles/firewall): buyers reach the WireGuard port.",
        "udp dport 443 counter accept comment \"idlewire: buyers' WireGuard port\""]
    assert render("firewall", "usr/share/nftables.d/chain-pre/forward/idlewire.nft.j2",
                  firewall_tunnel_interface="wgb").splitlines()[-1].startswith('iifname "wgb" counter accept')


def test_sysctl_template_is_shared_with_debian():
    text = render("base", "etc/sysctl.d/60-idlewire.conf.j2")
    assert text.splitlines() == ["# Ansible managed", "net.ipv4.conf.all.rp_filter = 2",
                                 "net.ipv4.ip_forward = 1", "net.ipv4.tcp_congestion_control = cubic",
                                 "net.ipv6.conf.all.forwarding = 1"]


def test_strict_undefined_catches_a_missing_variable():
    env = rolerender._environment(jinja2.FileSystemLoader(ROOT / "roles/agent/templates"))
    with pytest.raises(jinja2.UndefinedError, match="agent_config_dir"):
        env.get_template("etc/config/idlewire.j2").render(ansible_managed="x")


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("template", [("agent", "etc/init.d/idlewire-agent.j2"),
                                      ("firewall", "etc/init.d/idlewire-firewall.j2")], ids=["agent", "firewall"])
def test_init_scripts_parse(shell, template):
    r = subprocess.run([*shell, "-n"], input=render(*template), text=True, capture_output=True)
    assert r.returncode == 0, r.stderr


# Stand-ins for what rc.common brings into an init script: /lib/functions.sh (config_load,
# config_get, config_get_bool with OpenWrt's truth values) answering from the parsed UCI file, and
# procd.sh's procd_* calls, printed instead of sent to procd.
HARNESS = r"""
config_load() { [ "$1" = idlewire ] || echo "config_load $1"; }
config_get() { eval "_v=\${UCI_$2_$3-\$4}"; eval "$1=\$_v"; }
config_get_bool() {
	eval "_v=\${UCI_$2_$3-\$4}"
	case "$_v" in 1|on|true|yes|enabled) _v=1 ;; *) _v=0 ;; esac
	eval "$1=\$_v"
}
procd_open_instance() { echo "open $*"; }
procd_set_param() { echo "param $*"; }
procd_close_instance() { echo "close"; }
mkdir() { echo "mkdir $*"; }
chmod() { echo "chmod $*"; }
. "$INIT"
PROG=$STUB_AGENT
start_service
echo "rc=$?"
"""


def run_start(shell, tmp_path, uci_text: str, check_ok: bool = True) -> list[str]:
    init = tmp_path / "idlewire-agent"
    init.write_text(render("agent", "etc/init.d/idlewire-agent.j2"))
    stub = tmp_path / "agent-stub"
    stub.write_text(f'#!/bin/sh\necho "agent $*"\nexit {0 if check_ok else 2}\n')
    stub.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "INIT": str(init), "STUB_AGENT": str(stub)}
    for s in parse(uci_text).sections:
        for k, v in s.options.items():
            env[f"UCI_{s.name}_{k}"] = v
    r = subprocess.run([*shell, "-c", HARNESS], env=env, capture_output=True, text=True, timeout=30)
    assert r.stderr == ""
    return r.stdout.splitlines()


@pytest.mark.parametrize("shell", SHELLS)
def test_agent_start_reads_uci(shell, tmp_path):
    out = run_start(shell, tmp_path, render("agent", "etc/config/idlewire.j2"))
    stub = tmp_path / "agent-stub"
    assert out == [
        "mkdir -p /etc/idlewire-agent", "chmod 0700 /etc/idlewire-agent", "mkdir -p /etc/idlewire",
        "chmod 0750 /etc/idlewire", "agent check-config /etc/idlewire/node.toml", "open idlewire-agent",
        f"param command {stub} run --config /etc/idlewire/node.toml", "param file /etc/idlewire/node.toml",
        "param respawn 3600 5 0", "param stdout 1", "param stderr 1", "param umask 0077",
        "param env MALLOC_ARENA_MAX=1", "param limits nofile=1024 1024", "close",
        "rc=0"]


@pytest.mark.parametrize("shell", SHELLS)
def test_agent_disabled_in_uci_does_not_start(shell, tmp_path):
    text = render("agent", "etc/config/idlewire.j2").replace("option enabled '1'", "option enabled 'off'")
    assert run_start(shell, tmp_path, text) == ["rc=0"]


@pytest.mark.parametrize("shell", SHELLS)
def test_agent_with_a_bad_config_does_not_start(shell, tmp_path):
    out = run_start(shell, tmp_path, render("agent", "etc/config/idlewire.j2"), check_ok=False)
    assert out[-2:] == ["agent check-config /etc/idlewire/node.toml", "rc=1"]
