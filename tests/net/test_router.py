"""Router mode with the roles' rendered files and real parts: dnsmasq as the unit runs it, the
firewall role's two nftables tables, wireguard-go for a buyer.

    inet (203.0.113.1, "the internet": a TCP server that reports who connected)
      │ WAN (203.0.113.2)
    router ── br-lan (the LAN's .1) ── lan-port ── lan host (DHCP from dnsmasq: udhcpc)
      │ WireGuard tunnel (10.99.0.1)           127.0.0.53: an upstream resolver (a second
    buyer (10.99.0.2)                                      dnsmasq), as systemd-resolved is

The LAN host gets a lease (address, router, DNS server) and an answer from the router's DNS,
reaches the internet through NAT with a source port outside the buyers' block (so the shaper
never counts its traffic as a buyer's), and the internet cannot reach it unasked. The buyer
reaches the internet and not the LAN, also when the LAN's addresses are public (a delegated
prefix is; the lists of private networks alone would let a buyer in there).

What this does not cover: networkd's part (the bridge and DHCPv6-PD/RA are networkd's own, set
up here by hand as its files describe them) and hostapd: the booted image does
(tests/image/test_stamp_firstboot.py boots a unit stamped mode: router with two NICs and a
mac80211_hwsim radio, tests/routerbox.py); see README "Router mode".
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import routerbox
from netlab import Lab, have_netns
from rolerender import render
from shapelab import _keypair, listen, tcp_reachable

pytestmark = [pytest.mark.net, pytest.mark.skipif(bool(have_netns()), reason=have_netns() or "")]

INET, WAN = routerbox.INET, routerbox.WAN_ADDR
BUYER_BLOCK, UDHCPC_SCRIPT, WHO = routerbox.BUYER_BLOCK, routerbox.UDHCPC_SCRIPT, routerbox.WHO
CONNECT = ("import socket,sys\n"
           "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
           "s.bind(('0.0.0.0',int(sys.argv[2]))); s.settimeout(3)\n"
           "s.connect((sys.argv[1],8080)); print(s.recv(100).decode().strip())\n")


def unit_command(unit_text: str, key: str) -> list[str]:
    """The command line of ExecStart= / ExecStartPre= in a rendered unit."""
    for line in unit_text.splitlines():
        if line.startswith(key + "="):
            return shlex.split(line.split("=", 1)[1])
    raise AssertionError(f"no {key} in the unit")


def seen_by_internet(ns, source_port: int) -> tuple[str, int]:
    r = ns.run(sys.executable, "-c", CONNECT, INET, str(source_port), check=False, timeout=20)
    assert r.returncode == 0, r.stderr
    addr, port = r.stdout.split()
    return addr, int(port)


def drops(router, *needles: str) -> int:
    """Packets dropped by the router table's rule that names all of `needles` (interface names); -1 when
    there is no such rule (the reachability checks then say what it lets through)."""
    data = json.loads(router.run("nft", "-j", "list", "table", "inet", "idlewire_router").stdout)
    for item in data["nftables"]:
        rule = item.get("rule")
        text = json.dumps(rule["expr"]) if rule else ""
        if rule and '"drop"' in text and all(f'"{n}"' in text for n in needles):
            return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return -1


@pytest.mark.parametrize("lan_net", ["192.168.8", "198.51.100"], ids=["private-lan", "public-lan"])
def test_router_mode_lan_gets_dhcp_dns_nat_and_buyers_stay_out(tmp_path: Path, lan_net: str):
    with Lab() as lab:
        inet, router, lan, buyer = lab.ns("inet"), lab.ns("router"), lab.ns("lan"), lab.ns("buyer")
        tun, buyer_tun = lab.ifname("iw"), lab.ifname("iwb")
        lab.link(router, f"{WAN}/24", inet, f"{INET}/24", names=("wan0", "up0"))
        router.run("ip", "route", "add", "default", "via", INET)
        router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        # br-lan and one LAN port, as 10-idlewire-br-lan.* and 11-idlewire-lan-ports.network make them.
        router.run("ip", "link", "add", "br-lan", "type", "bridge")
        router.run("ip", "addr", "add", f"{lan_net}.1/24", "dev", "br-lan")
        router.run("ip", "link", "set", "br-lan", "up")
        lab.link(router, None, lan, None, names=("lan1", "eth0"))
        router.run("ip", "link", "set", "lan1", "master", "br-lan")

        # The roles' files, for this lab's interface names and LAN.
        wan_vars = {"agent_wan_interface": "wan0", "agent_tunnel_interface": tun}
        fw = tmp_path / "firewall.nft"
        fw.write_text(render("firewall", "etc/idlewire/firewall.nft.j2", wan_vars))
        rt = tmp_path / "router.nft"
        rt.write_text(render("firewall", "etc/idlewire/router.nft.j2", wan_vars))
        for f in (fw, rt):
            router.run("nft", "-f", str(f))
        base_vars = {"base_router_lan_address": f"{lan_net}.1/24", "base_router_dhcp_first": f"{lan_net}.100",
                     "base_router_dhcp_last": f"{lan_net}.150"}
        conf = tmp_path / "dnsmasq.conf"
        conf.write_text(render("base", "etc/idlewire/router/dnsmasq.conf.j2", base_vars).replace(
            "dhcp-leasefile=/run/idlewire/dnsmasq.leases", f"dhcp-leasefile={tmp_path}/leases"))
        unit = render("base", "etc/systemd/system/idlewire-dnsmasq.service.j2")
        check = unit_command(unit, "ExecStartPre")
        assert router.run(*[str(conf) if a == "/etc/idlewire/router/dnsmasq.conf" else a for a in check],
                          check=False).returncode == 0
        cmd = [f"--conf-file={conf}" if a.startswith("--conf-file=") else a for a in unit_command(unit, "ExecStart")]
        # The upstream resolver dnsmasq forwards to (server=127.0.0.53: systemd-resolved on the node).
        router.popen("dnsmasq", "--keep-in-foreground", "--pid-file=", "--conf-file=/dev/null", "--no-resolv",
                     "--no-hosts", "--listen-address=127.0.0.53", "--bind-interfaces",
                     "--address=/internet.test/203.0.113.1", stderr=subprocess.DEVNULL)
        with open(tmp_path / "dnsmasq.log", "w") as log:
            router.popen(*cmd, stderr=log)
        inet.popen(sys.executable, "-c", WHO, "4", "8080")
        for _ in range(50):
            if inet.run("ss", "-ltn", "sport = :8080").stdout.count("LISTEN"):
                break
            time.sleep(0.05)

        # 1. A LAN host's lease: an address of the pool, the router and its DNS.
        script = tmp_path / "udhcpc.sh"
        out = tmp_path / "lease"
        script.write_text(UDHCPC_SCRIPT.format(out=out))
        script.chmod(0o755)
        r = lan.run("busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "8", "-T", "1", "-s", str(script),
                    check=False, timeout=60)
        assert r.returncode == 0 and out.exists(), r.stdout + r.stderr + (tmp_path / "dnsmasq.log").read_text()
        ip, mask, gw, dns = out.read_text().split()
        assert ip.startswith(f"{lan_net}.") and 100 <= int(ip.rsplit(".", 1)[1]) <= 150
        assert (mask, gw, dns) == ("24", f"{lan_net}.1", f"{lan_net}.1")
        assert ip in (tmp_path / "leases").read_text()

        # 2. DNS from the router, answered through its upstream.
        # (busybox asks for AAAA too, which the lab's upstream has no answer for: only A is checked)
        r = lan.run("busybox", "nslookup", "-type=a", "internet.test", dns, check=False, timeout=20)
        assert f"Address: {INET}" in r.stdout.splitlines() and f"Server:\t\t{dns}" in r.stdout, r.stdout + r.stderr

        # 3. The internet sees the router's WAN address, and an owner port outside the buyers' block
        #    even when the host picked one inside it (Windows and macOS pick 49152-65535).
        for port in (40000, 62000, 65000):
            addr, seen = seen_by_internet(lan, port)
            assert addr == WAN and not BUYER_BLOCK[0] <= seen <= BUYER_BLOCK[1], (port, addr, seen)

        # 4. The internet cannot open a connection to the LAN host (no port forward).
        listen(lan, 8081)
        inet.run("ip", "route", "add", f"{lan_net}.0/24", "via", WAN)
        assert not tcp_reachable(inet, ip, 8081)
        assert drops(router, "wan0", "br-lan") > 0

        # 5. A buyer over WireGuard reaches the internet (in the buyers' port block) and not the LAN.
        lab.link(router, "10.250.0.1/30", buyer, "10.250.0.2/30", names=("under0", "under0"))
        router.wireguard(tun)
        buyer.wireguard(buyer_tun)
        (rpriv, rpub), (bpriv, bpub) = _keypair(router), _keypair(buyer)
        (tmp_path / "r.key").write_text(rpriv)
        (tmp_path / "b.key").write_text(bpriv)
        router.run("wg", "set", tun, "listen-port", "51820", "private-key", str(tmp_path / "r.key"),
                   "peer", bpub, "allowed-ips", "10.99.0.2/32")
        buyer.run("wg", "set", buyer_tun, "private-key", str(tmp_path / "b.key"), "peer", rpub,
                  "allowed-ips", "0.0.0.0/1,128.0.0.0/1", "endpoint", "10.250.0.1:51820")
        router.run("ip", "addr", "add", "10.99.0.1/16", "dev", tun)
        buyer.run("ip", "addr", "add", "10.99.0.2/16", "dev", buyer_tun)
        router.run("ip", "link", "set", tun, "up")
        buyer.run("ip", "link", "set", buyer_tun, "up")
        buyer.run("ip", "route", "add", "default", "dev", buyer_tun)
        addr, seen = seen_by_internet(buyer, 40000)
        assert addr == WAN and BUYER_BLOCK[0] <= seen <= BUYER_BLOCK[1], (addr, seen)
        before = drops(router, tun, "br-lan")
        assert not tcp_reachable(buyer, ip, 8081)
        assert not tcp_reachable(buyer, f"{lan_net}.1", 53)
        if lan_net != "192.168.8":
            # Public LAN addresses pass the buyers' blocked lists: router.nft is what keeps them out.
            assert drops(router, tun, "br-lan") > before
        # The LAN host itself still reaches everything (the buyer's test did not break the owner's path).
        assert seen_by_internet(lan, 40001)[0] == WAN


def test_a_router_behind_another_router_maps_its_port_there_over_upnp(tmp_path: Path):
    """A unit in router mode behind the home's own router (double NAT, the e2e walk's home): with
    the router table loaded, its UPnP search still hears the home router's IGD (SSDP answers come
    from port 1900 of the router's address, which conntrack does not take for replies) and the
    WireGuard port gets mapped to it; a packet from port 1900 of an internet address stays out."""
    from homelab import HomeLab, have_homelab

    if why := have_homelab():
        pytest.skip(why)
    with Lab() as lab:
        home = HomeLab(lab, tmp_path / "home", line_down_mbit=100, line_up_mbit=100, queue_ms=20)
        unit, tun = home.node, lab.ifname("iw")  # the unit's WAN is its eth0 on the home LAN
        wan_vars = {"agent_wan_interface": "eth0", "agent_tunnel_interface": tun}
        for name in ("firewall.nft", "router.nft"):
            (tmp_path / name).write_text(render("firewall", f"etc/idlewire/{name}.j2", wan_vars))
            unit.run("nft", "-f", str(tmp_path / name))
        r = unit.run("upnpc", "-s", check=False, timeout=60)
        assert "Found valid IGD" in r.stdout and f"ExternalIPAddress = {home.public}" in r.stdout, r.stdout + r.stderr
        r = unit.run("upnpc", "-e", "idlewire", "-r", "51820", "UDP", check=False, timeout=60)
        assert r.returncode == 0 and f"{home.node_ip}:51820" in home.nat_rules(), r.stdout + home.nat_rules()
        # the rule lets in only private senders: a home LAN host's port 1900 reaches the unit, the
        # internet's (through a forward on the home router) does not
        home.router.run("nft", "add", "rule", "inet", "filter", "prerouting_miniupnpd", "udp", "dport", "40123",
                        "dnat", "ip", "to", f"{home.node_ip}:40123")
        home.router.run("nft", "add", "rule", "inet", "filter", "miniupnpd", "ip", "daddr", home.node_ip,
                        "udp", "dport", "40123", "accept")
        listen_udp = ("import socket\n"
                      "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0',40123)); s.settimeout(5)\n"
                      "try:\n    print(s.recvfrom(100)[1][0])\nexcept OSError:\n    print('none')\n")
        send = ("import socket,sys\n"
                "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('0.0.0.0',1900))\n"
                "[s.sendto(b'x',(sys.argv[1],40123)) for _ in range(5)]\n")
        for sender, to, heard in ((home.owner, home.node_ip, home.owner_ip), (home.server, home.public, "none")):
            got = unit.popen(sys.executable, "-c", listen_udp, stdout=subprocess.PIPE, text=True)
            for _ in range(100):
                if ":40123" in unit.run("ss", "-lun", "sport = :40123").stdout:
                    break
                time.sleep(0.05)
            sender.run(sys.executable, "-c", send, to)
            assert got.communicate(timeout=10)[0].strip() == heard, (sender.name, heard)


def test_tcp_through_a_pppoe_line_fits_its_mtu_only_with_the_mss_clamp(tmp_path: Path):
    """A PPPoE line carries 1492-byte packets while the LAN's hosts and the internet's servers
    think 1500, and many ISPs drop the ICMP that would tell them: a download stalls at its first
    full-size segment. router.nft clamps TCP's MSS through ppp0 (a veth of that name and MTU here:
    this host's kernel has no PPP; the booted image dials for real). Without the clamp, the same
    download stalls (so the lab does reproduce the black hole)."""
    with Lab() as lab:
        inet, router, lan = lab.ns("inet"), lab.ns("router"), lab.ns("lan")
        lab.link(router, "100.64.7.2/24", inet, "100.64.7.1/24", names=("ppp0", "up0"))
        router.run("ip", "link", "set", "ppp0", "mtu", "1492")
        # one wire packet per TCP segment, as on a real line (veth would pass a 64 KB GSO packet whole)
        inet.run("ip", "link", "set", "up0", "gso_max_segs", "1")
        router.run("ip", "route", "add", "default", "via", "100.64.7.1")
        router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        lab.link(router, "192.168.8.1/24", lan, "192.168.8.100/24", names=("br-lan", "eth0"))
        lan.run("ip", "route", "add", "default", "via", "192.168.8.1")
        inet.popen(sys.executable, "-c", routerbox.SENDER, "5300", str(1 << 20))
        for _ in range(50):
            if inet.run("ss", "-ltn", "sport = :5300").stdout.count("LISTEN"):
                break
            time.sleep(0.05)
        table = render("firewall", "etc/idlewire/router.nft.j2", {"agent_wan_interface": "wan0"})
        chain = table[table.index("    chain mss {"):table.index("    chain input {")]
        got = {}
        for name, text in (("without the clamp", table.replace(chain, "")), ("with it", table)):
            f = tmp_path / "router.nft"
            f.write_text(text)
            router.run("nft", "-f", str(f))
            r = lan.run(sys.executable, "-c", routerbox.COUNT.replace("timeout=20", "timeout=4"), "100.64.7.1",
                        "5300", check=False, timeout=30)
            got[name] = int(r.stdout) if r.returncode == 0 else r.stderr.strip().splitlines()[-1]
        assert got["with it"] == 1 << 20, got
        assert got["without the clamp"] != 1 << 20, f"the lab has no black hole to show the clamp by: {got}"
