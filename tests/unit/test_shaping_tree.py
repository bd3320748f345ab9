"""The tc trees the shaper builds, line by line (what `tc -batch` receives), and their sizing rules."""

from idlewire_agent.policy import MBIT, Firewall, Shaping
from idlewire_agent.shaping import (
    Session,
    htb_sizes,
    ifb_name,
    leaf_spec,
    line_tree,
    parse_classes,
    tunnel_tree,
)

SH = Shaping(enabled=True, wan_interface="eth0", tunnel_interface="wg0", tunnel_port=51820, tunnel_mtu=1420,
             line_up=20 * MBIT, line_down=100 * MBIT, overhead=18, floor_up=1 * MBIT, floor_down=5 * MBIT,
             cap_up=10 * MBIT, cap_down=50 * MBIT)


def test_line_tree_upload_exact_lines():
    objs = line_tree(SH, Firewall(), "eth0", SH.line_up, SH.cap_up + SH.cap_down, SH.floor_up, "fq_codel", "src")
    assert [o.command("add") for o in objs] == [
        "qdisc add dev eth0 root handle 1: htb default 10",
        "class add dev eth0 parent 1: classid 1:1 htb rate 20000000bit ceil 20000000bit burst 3064 cburst 3064 "
        "quantum 2500 prio 0 overhead 18 linklayer ethernet",
        "class add dev eth0 parent 1:1 classid 1:10 htb rate 19000000bit ceil 20000000bit burst 3064 cburst 3064 "
        "quantum 2375 prio 0 overhead 18 linklayer ethernet",
        "class add dev eth0 parent 1:1 classid 1:20 htb rate 1000000bit ceil 20000000bit burst 3064 cburst 3064 "
        "quantum 1532 prio 1 overhead 18 linklayer ethernet",
        "qdisc add dev eth0 parent 1:10 handle 10: fq_codel",
        "qdisc add dev eth0 parent 1:20 handle 20: fq_codel",
        "filter add dev eth0 parent 1: protocol ip prio 10 u32 match ip protocol 17 0xff match ip sport 51820 0xffff "
        "flowid 1:20",
        "filter add dev eth0 parent 1: protocol ip prio 11 u32 match ip protocol 6 0xff match ip sport 0xf000 0xf000 "
        "flowid 1:20",
        "filter add dev eth0 parent 1: protocol ipv6 prio 12 u32 match ip6 protocol 17 0xff match ip6 sport 51820 "
        "0xffff flowid 1:20",
        "filter add dev eth0 parent 1: protocol ipv6 prio 13 u32 match ip6 protocol 6 0xff match ip6 sport 0xf000 "
        "0xf000 flowid 1:20",
        "filter add dev eth0 parent 1: protocol ip prio 14 u32 match ip protocol 17 0xff match ip sport 0xf000 0xf000 "
        "flowid 1:20",
        "filter add dev eth0 parent 1: protocol ipv6 prio 15 u32 match ip6 protocol 17 0xff match ip6 sport 0xf000 "
        "0xf000 flowid 1:20",
    ]


def test_line_tree_download_matches_destination_ports_and_caps_shared_at_wire_bytes():
    objs = line_tree(SH, Firewall(), "ifb4eth0", SH.line_down, 10 * MBIT, SH.floor_down, "bfifo", "dst")
    by_key = {o.key: o.spec for o in objs}
    # 10 Mbit/s of tunnel MTU packets cost (1420 + 76 + 14 + 18) / 1420 on the wire.
    assert "classid 1:20 htb rate 5000000bit ceil 10760563bit" in by_key["1:20"]
    assert by_key["leaf:1:10"] == "parent 1:10 handle 10: bfifo limit 125000"  # 10 ms at 100 Mbit/s
    assert by_key["1::10"].endswith("match ip protocol 17 0xff match ip dport 51820 0xffff flowid 1:20")
    assert by_key["1::11"].endswith("match ip protocol 6 0xff match ip dport 0xf000 0xf000 flowid 1:20")
    assert by_key["1::14"].endswith("match ip protocol 17 0xff match ip dport 0xf000 0xf000 flowid 1:20")


def test_tunnel_tree_one_leaf_per_session_exact_lines():
    sessions = {"a": Session(0, ["10.213.0.2"]), "b": Session(5, ["10.213.0.9", "fd00:213::9"])}
    sh = Shaping(**{**SH.__dict__, "session_cap_down": 30 * MBIT})
    objs = tunnel_tree(sh, "wg0", 50 * MBIT, sh.session_cap_down, 10, sessions, "bfifo", "dst")
    assert [o.command("add") for o in objs] == [
        "qdisc add dev wg0 root handle 1: htb default 2",
        "class add dev wg0 parent 1: classid 1:1 htb rate 50000000bit ceil 50000000bit burst 62500 cburst 62500 "
        "quantum 6250 prio 0",
        "class add dev wg0 parent 1:1 classid 1:2 htb rate 500000bit ceil 50000000bit burst 2840 cburst 62500 "
        "quantum 1420 prio 7",
        "qdisc add dev wg0 parent 1:2 handle 2: bfifo limit 625000",
        "class add dev wg0 parent 1:1 classid 1:100 htb rate 5000000bit ceil 30000000bit burst 6250 cburst 37500 "
        "quantum 1420 prio 1",
        "qdisc add dev wg0 parent 1:100 handle 100: bfifo limit 375000",
        "filter add dev wg0 parent 1: protocol ip prio 100 u32 match ip dst 10.213.0.2/32 flowid 1:100",
        "class add dev wg0 parent 1:1 classid 1:105 htb rate 5000000bit ceil 30000000bit burst 6250 cburst 37500 "
        "quantum 1420 prio 1",
        "qdisc add dev wg0 parent 1:105 handle 105: bfifo limit 375000",
        "filter add dev wg0 parent 1: protocol ip prio 105 u32 match ip dst 10.213.0.9/32 flowid 1:105",
        "filter add dev wg0 parent 1: protocol ipv6 prio 5005 u32 match ip6 dst fd00:213::9/128 flowid 1:105",
    ]
    up = tunnel_tree(sh, "ifb4wg0", 10 * MBIT, 0, 10, sessions, "cake", "src")
    assert up[-1].spec == "parent 1: protocol ipv6 prio 5005 u32 match ip6 src fd00:213::9/128 flowid 1:105"
    assert "parent 1:100 handle 100: cake unlimited besteffort" in [o.spec for o in up]


def test_bursts_are_explicit_and_never_below_two_packets():
    # tc's default burst at low rates is below one full packet: HTB then cannot send at its rate.
    assert htb_sizes(64_000, 64_000, 1532) == {"burst": 3064, "cburst": 3064, "quantum": 1532}
    assert htb_sizes(1_000 * MBIT, 1_000 * MBIT, 1532) == {"burst": 125000, "cburst": 125000, "quantum": 60000}
    assert leaf_spec("bfifo", 1 * MBIT, 1532) == "bfifo limit 6128"  # 4 packets at the least


def test_ifb_is_named_after_its_interface():
    assert ifb_name("eth0") == "ifb4eth0"
    assert ifb_name("wg0") == "ifb4wg0"
    long = ifb_name("enx001122334455")
    assert len(long) <= 15 and long.startswith("ifb4") and long != ifb_name("enx001122334456")


def test_class_text_is_parsed():
    text = """class htb 1:10 parent 1:1 leaf 10: prio 0 rate 19Mbit overhead 18 ceil 20Mbit burst 3064b cburst 3064b
 Sent 1234 bytes 5 pkt (dropped 1, overlimits 2 requeues 0)
 backlog 0b 0p requeues 0
class htb 1:1 root rate 20Mbit ceil 20Mbit burst 3064b cburst 3064b
 Sent 99 bytes 1 pkt (dropped 0, overlimits 0 requeues 0)
 backlog 1514b 1p requeues 0
"""
    c = parse_classes(text)
    assert c["1:10"]["parent"] == "1:1" and c["1:10"]["rate"] == "19Mbit" and c["1:10"]["bytes"] == 1234
    assert c["1:10"]["dropped"] == 1 and c["1:1"]["parent"] == "root" and c["1:1"]["backlog"] == "1514b"
