"""roles/firewall's nftables table rendered with StrictUndefined: the exact rules buyers meet."""

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
