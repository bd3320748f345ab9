"""roles/firewall's nftables table rendered with StrictUndefined: the exact rules buyers meet."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml
from rolerender import ROLES, render, role_defaults

T = "etc/idlewire/firewall.nft.j2"


def test_default_table_exact_rules():
    text = render("firewall", T)
    lines = [x.strip() for x in text.splitlines()]
    assert lines[:2] == ["#!/usr/sbin/nft -f", "# Ansible managed"]
    # Replaced atomically, leaving every other table alone (no "flush ruleset").
    assert "flush ruleset" not in text
    i = lines.index("table inet idlewire")
    assert lines[i:i + 3] == ["table inet idlewire", "delete table inet idlewire", ""]
    assert ("elements = { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, "
            "192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/4, 240.0.0.0/4 }") in lines
    j = lines.index("chain input {")
    assert lines[j:j + 5] == [
        "chain input {",
        "type filter hook input priority filter - 10; policy accept;",
        'iifname "iw0" jump buyer_to_node',
        'tcp dport { 8740 } iifname != { "lo" } counter drop',
        "}",
    ]
    k = lines.index("chain buyer_out {")
    assert lines[k:k + 8] == [
        "chain buyer_out {",
        'oifname "iw0" counter drop',
        "meta nfproto ipv6 counter drop",
        "ip daddr @buyer_blocked_v4 counter drop",
        "ip6 daddr @buyer_blocked_v6 counter drop",
        "tcp dport { 25 } counter drop",
        "counter accept",
        "}",
    ]
    assert ('iifname "iw0" oifname != "iw0" meta l4proto { tcp, udp } masquerade to :61440-65535' in lines)
    assert 'oifname "iw0" ct state established,related accept' in lines


def test_allow_list_wan_ipv6_and_extra_blocks():
    text = render("firewall", T, {
        "firewall_tunnel_interface": "wgb", "firewall_wan_interface": "eth0",
        "firewall_admin_interfaces": ["eth1"], "firewall_admin_tcp_ports": [8740, 22],
        "firewall_tunnel_ipv6": True, "firewall_blocked_udp_ports": [53, 123],
        "firewall_allowed_networks": ["198.51.100.0/24", "2001:db8::/32"],
        "firewall_extra_blocked_networks": ["203.0.113.0/28", "2001:db8:1::/48"],
        "firewall_buyer_nat_ports": "49152-65535",
    })
    lines = [x.strip() for x in text.splitlines()]
    k = lines.index("chain buyer_out {")
    assert lines[k:k + 11] == [
        "chain buyer_out {",
        'oifname "wgb" counter drop',
        'oifname != "eth0" counter drop',
        "ip daddr @buyer_blocked_v4 counter drop",
        "ip6 daddr @buyer_blocked_v6 counter drop",
        "tcp dport { 25 } counter drop",
        "udp dport { 53, 123 } counter drop",
        "meta nfproto ipv4 ip daddr != @buyer_allowed_v4 counter drop",
        "meta nfproto ipv6 ip6 daddr != @buyer_allowed_v6 counter drop",
        "counter accept",
        "}",
    ]
    assert 'tcp dport { 8740, 22 } iifname != { "lo", "eth1" } counter drop' in lines
    assert "elements = { 198.51.100.0/24 }" in lines and "elements = { 2001:db8::/32 }" in lines
    assert any(x.endswith("240.0.0.0/4, 203.0.113.0/28 }") for x in lines)
    assert any(x.endswith("ff00::/8, 2001:db8:1::/48 }") for x in lines)
    assert 'iifname "wgb" oifname != "wgb" meta l4proto { tcp, udp } masquerade to :49152-65535' in lines


def test_undefined_variables_fail_the_render():
    with pytest.raises(jinja2.UndefinedError):
        render("firewall", T, {"firewall_table": jinja2.StrictUndefined(name="firewall_table")})


def test_unit_loads_and_removes_only_our_table():
    text = render("firewall", "etc/systemd/system/idlewire-firewall.service.j2")
    lines = text.splitlines()
    assert "ExecStart=/usr/sbin/nft -f /etc/idlewire/firewall.nft" in lines
    assert "ExecStop=-/usr/sbin/nft delete table inet idlewire" in lines
    assert "Before=network-pre.target idlewire-agent.service shutdown.target" in lines


def test_a_reload_replaces_the_table_and_follows_nftables_service():
    """The role's handler reloads (one nft -f: delete + add in one transaction), never restarts
    (ExecStop would delete the table first); nftables.service's flush ruleset is followed at once."""
    lines = render("firewall", "etc/systemd/system/idlewire-firewall.service.j2").splitlines()
    assert "ExecReload=/usr/sbin/nft -f /etc/idlewire/firewall.nft" in lines
    assert {"PartOf=nftables.service", "ReloadPropagatedFrom=nftables.service"} <= set(lines)
    handlers = yaml.safe_load((ROLES / "firewall/handlers/main.yml").read_text())
    states = {h["name"]: (h.get("ansible.builtin.systemd_service") or h.get("community.general.openwrt_init"))["state"]
              for h in handlers if h.get("listen") == "Reload firewall"}
    assert states == {"Reload firewall (systemd)": "reloaded", "Reload firewall (OpenWrt)": "reloaded"}
    text = render("firewall", T)
    assert text.index("table inet idlewire\ndelete table inet idlewire\n") < text.index("table inet idlewire {")


def test_firewall_and_agent_defaults_agree():
    """The firewall isolates the interface the agent really uses, and shares its NAT port block."""
    fw, agent = role_defaults("firewall"), role_defaults("agent")
    assert fw["firewall_tunnel_interface"] == agent["agent_tunnel_interface"]
    assert fw["firewall_buyer_nat_ports"] == agent["agent_buyer_nat_ports"]
    assert fw["firewall_table"] == agent["agent_firewall_table"]
    assert int(fw["firewall_tunnel_port"]) == agent["agent_tunnel_port"]
    assert agent["agent_api_port"] in fw["firewall_admin_tcp_ports"]


def test_firewall_follows_the_agents_variables():
    """One variable per fact: setting the agent's moves the firewall's (site.yml runs both roles)."""
    fw = role_defaults("firewall", {"agent_tunnel_interface": "wg7", "agent_tunnel_port": 4500,
                                    "agent_buyer_nat_ports": "49152-65535", "agent_firewall_table": "iwx"})
    assert (fw["firewall_tunnel_interface"], fw["firewall_tunnel_port"], fw["firewall_buyer_nat_ports"],
            fw["firewall_table"]) == ("wg7", "4500", "49152-65535", "iwx")


@pytest.mark.parametrize(("extra", "ok"), [
    ({}, True),
    ({"agent_tunnel_interface": "wg7"}, True),  # the firewall's follows it
    ({"firewall_tunnel_interface": "wg7"}, False),  # a copy set by hand to something else
    ({"firewall_tunnel_port": 4500}, False),
    ({"firewall_buyer_nat_ports": "49152-65535"}, False),
    ({"firewall_table": "other"}, False),
    ({"firewall_admin_tcp_ports": [22]}, False),
    ({"firewall_admin_tcp_ports": []}, True),
])
def test_the_play_fails_when_the_roles_copies_differ(tmp_path, extra, ok):
    root = Path(__file__).resolve().parents[2]
    play = tmp_path / "play.yml"
    play.write_text(f"""- hosts: localhost
  gather_facts: false
  vars: {json.dumps(extra)}
  roles:
    - role: firewall
      when: false
  tasks:
    - ansible.builtin.include_role: {{name: agent, tasks_from: shared_facts}}
""")
    r = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
                        str(play)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "ANSIBLE_ROLES_PATH": str(root / "roles")})
    assert (r.returncode == 0) == ok, r.stdout[-2000:]
    if not ok:
        assert "roles firewall and agent disagree" in r.stdout and "set the agent_* variable only" in r.stdout
