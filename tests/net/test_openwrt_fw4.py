"""roles/firewall on OpenWrt with real packets: the isolation table inet idlewire beside a stand-in
for fw4's table inet fw4, which includes the role's three drop-ins the way fw4 does (`include`
lines at the top of its chains). The stand-in is written after fw4's ruleset.uc for OpenWrt's
default zones (lan: accept; wan: input/forward reject, masquerade); fw4 itself (ucode, UCI) is not
here. Namespaces: buyer --iw0-- node --wan-- inet, and node --br-lan-- lan; addresses are the
lab's own (203.0.113.0/24 stands for the internet), traffic stays inside them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from rolerender import render

pytestmark = pytest.mark.net

NODE_WAN, INET = "203.0.113.1", "203.0.113.2"
FW4 = """\
table inet fw4
flush table inet fw4

table inet fw4 {{
\tchain input {{
\t\ttype filter hook input priority filter; policy drop;
\t\tiifname "lo" accept
\t\tct state established,related accept
\t\ticmp type echo-request accept
\t\tiifname "br-lan" jump input_lan
\t\tiifname "wan" jump input_wan
\t\tjump handle_reject
\t}}

\tchain forward {{
\t\ttype filter hook forward priority filter; policy drop;
{forward}
\t\tct state established,related accept
\t\tiifname "br-lan" jump forward_lan
\t\tiifname "wan" jump forward_wan
\t\tjump handle_reject
\t}}

\tchain output {{
\t\ttype filter hook output priority filter; policy accept;
\t}}

\tchain handle_reject {{
\t\tmeta l4proto tcp reject with tcp reset
\t\treject
\t}}

\tchain input_lan {{
\t\taccept
\t}}

\tchain input_wan {{
{input_wan}
\t\tjump handle_reject
\t}}

\tchain forward_lan {{
\t\toifname "wan" accept
\t}}

\tchain forward_wan {{
\t\tjump handle_reject
\t}}

\tchain srcnat {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
{srcnat}
\t\toifname "wan" jump srcnat_wan
\t}}

\tchain srcnat_wan {{
\t\tmeta nfproto ipv4 masquerade
\t}}
}}
"""

ACCEPT_ONE = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(); s.settimeout(10)
print("ready", flush=True)
c, peer = s.accept(); print(peer[0], peer[1], flush=True)
"""
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close(); print("connected")
except OSError as e:
    print(type(e).__name__)
"""
UDP_RECV = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 51820)); s.settimeout(3)
print("ready", flush=True)
try:
    print(s.recvfrom(100)[0].decode())
except OSError:
    print("nothing")
"""


@pytest.fixture
def router(lab, tmp_path):
    node, buyer, inet, lan = lab.ns("node"), lab.ns("buyer"), lab.ns("inet"), lab.ns("lan")
    lab.link(node, "10.99.0.1/16", buyer, "10.99.0.2/16", names=("iw0", "eth0"))
    lab.link(node, f"{NODE_WAN}/24", inet, f"{INET}/24", names=("wan", "eth0"))
    lab.link(node, "192.168.1.1/24", lan, "192.168.1.2/24", names=("br-lan", "eth0"))
    buyer.run("ip", "route", "add", "default", "via", "10.99.0.1")
    lan.run("ip", "route", "add", "default", "via", "192.168.1.1")
    node.run("sysctl", "-qw", "net.ipv4.ip_forward=1")

    over = {"firewall_wan_interface": "wan", "firewall_admin_interfaces": ["br-lan"], "firewall_platform": "openwrt"}
    dropins = {}
    for chain in ("input_wan", "forward", "srcnat"):
        f = tmp_path / f"{chain}.nft"
        f.write_text(render("firewall", f"usr/share/nftables.d/chain-pre/{chain}/idlewire.nft.j2", over))
        dropins[chain] = f
    table = tmp_path / "firewall.nft"
    table.write_text(render("firewall", "etc/idlewire/firewall.nft.j2", over))

    def load(without: tuple[str, ...] = (), fw4_last: bool = False) -> None:
        """At boot fw4 loads first (S19firewall before S19idlewire-firewall); after
        `service firewall restart` (fw4 deletes and re-creates its table) it comes last. Base
        chains of equal priority run newest first, so the order decides whose NAT sees buyers first."""
        fw4 = tmp_path / "fw4.nft"
        fw4.write_text(FW4.format(**{c: "" if c in without else f'\t\tinclude "{p}"' for c, p in dropins.items()}))
        node.run("nft", "flush", "ruleset")
        for f in (table, fw4) if fw4_last else (fw4, table):
            node.run("nft", "-f", str(f))

    return {"node": node, "buyer": buyer, "inet": inet, "lan": lan, "load": load}


def buyer_seen_from_internet(r) -> tuple[str, int] | str:
    server = r["inet"].popen(sys.executable, "-c", ACCEPT_ONE, stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    out = r["buyer"].run(sys.executable, "-c", CONNECT, INET, "8080").stdout.strip()
    if out != "connected":
        server.kill()
        return out
    addr, port = server.stdout.readline().split()
    server.wait(timeout=10)
    return addr, int(port)


def connect(ns, addr: str, port: int) -> str:
    return ns.run(sys.executable, "-c", CONNECT, addr, str(port)).stdout.strip()


@pytest.mark.parametrize("fw4_last", [False, True], ids=["boot", "after-firewall-restart"])
def test_buyers_reach_the_internet_masqueraded_into_the_port_block(router, fw4_last):
    router["load"](fw4_last=fw4_last)
    addr, port = buyer_seen_from_internet(router)
    assert addr == NODE_WAN and 61440 <= port <= 65535, (addr, port)


def test_without_the_srcnat_dropin_fw4_masquerades_buyers_after_a_firewall_restart(router):
    """The control: with fw4's NAT chain newer than ours, its masquerade takes the buyers' flows
    and keeps their own source ports (outside the block the shaper matches)."""
    router["load"](without=("srcnat",), fw4_last=True)
    addr, port = buyer_seen_from_internet(router)
    assert addr == NODE_WAN and port < 61440, (addr, port)


def test_without_the_forward_dropin_fw4_rejects_buyers(router):
    router["load"](without=("forward",))
    assert buyer_seen_from_internet(router) == "ConnectionRefusedError"  # fw4's handle_reject: tcp reset


def test_buyers_do_not_reach_the_lan_or_the_node(router):
    router["load"]()
    server = router["lan"].popen(sys.executable, "-c", ACCEPT_ONE, stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    assert connect(router["buyer"], "192.168.1.2", 8080) == "TimeoutError"  # dropped by table inet idlewire
    server.kill()
    assert connect(router["buyer"], "10.99.0.1", 8740) == "TimeoutError"  # the node itself: buyer_to_node
    # The owner's LAN still gets out (fw4's forwarding and masquerade untouched).
    server = router["inet"].popen(sys.executable, "-c", ACCEPT_ONE, stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    assert connect(router["lan"], INET, 8080) == "connected"
    assert server.stdout.readline().split()[0] == NODE_WAN
    server.wait(timeout=10)


@pytest.mark.parametrize(("port", "expected"), [(51820, "hello"), (51821, "nothing")])
def test_only_the_wireguard_port_is_open_on_the_wan(router, port, expected):
    router["load"]()
    udp = UDP_RECV.replace("51820", str(port))
    recv = router["node"].popen(sys.executable, "-c", udp, stdout=subprocess.PIPE, text=True)
    assert recv.stdout.readline().strip() == "ready"
    router["inet"].run(sys.executable, "-c", f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                                             f".sendto(b'hello', ('{NODE_WAN}', {port}))")
    assert recv.stdout.readline().strip() == expected
    recv.wait(timeout=10)
