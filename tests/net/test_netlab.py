"""The lab itself: namespaces reach each other over veth, and a WireGuard tunnel carries traffic."""

import subprocess

import pytest

pytestmark = pytest.mark.net


def keypair(ns):
    priv = ns.run("wg", "genkey").stdout.strip()
    pub = subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True,
                         check=True).stdout.strip()
    return priv, pub


def test_veth_and_wireguard(lab, tmp_path):
    a, b = lab.ns("a"), lab.ns("b")
    lab.link(a, "10.201.0.1/24", b, "10.201.0.2/24")
    assert b.run("ping", "-c1", "-W2", "10.201.0.1").returncode == 0
    keys, wg = {}, {a.name: lab.ifname("wg"), b.name: lab.ifname("wg")}
    for ns, addr, port in ((a, "10.202.0.1/24", 51820), (b, "10.202.0.2/24", 51821)):
        ns.wireguard(wg[ns.name])
        priv, pub = keypair(ns)
        key = tmp_path / f"{ns.name}.key"
        key.write_text(priv)
        ns.run("wg", "set", wg[ns.name], "private-key", str(key), "listen-port", str(port))
        ns.run("ip", "addr", "add", addr, "dev", wg[ns.name])
        ns.run("ip", "link", "set", wg[ns.name], "up")
        keys[ns.name] = pub
    a.run("wg", "set", wg[a.name], "peer", keys[b.name], "allowed-ips", "10.202.0.2/32",
          "endpoint", "10.201.0.2:51821")
    b.run("wg", "set", wg[b.name], "peer", keys[a.name], "allowed-ips", "10.202.0.1/32",
          "endpoint", "10.201.0.1:51820")
    assert b.run("ping", "-c2", "-W3", "10.202.0.1").returncode == 0
    dump = a.run("wg", "show", wg[a.name], "transfer").stdout.split()
    assert int(dump[1]) > 0 and int(dump[2]) > 0  # rx and tx counted per peer
