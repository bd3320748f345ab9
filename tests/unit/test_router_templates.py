"""Router mode's rendered files, checked by their real consumers where this host has them
(dnsmasq --test, nft -c), and the access point the stamp's Wi-Fi becomes."""

from __future__ import annotations

import shutil
import stat
import subprocess
import tomllib

import pytest
from idlewire.units import wpa_psk
from rolerender import render
from test_consume_stamp import make_card, run

ROUTER = "etc/idlewire/router/"


def test_networkd_files_put_the_wan_on_its_port_and_every_other_port_in_br_lan():
    v = {"agent_wan_interface": "enp1s0"}
    wan = render("base", ROUTER + "10-idlewire-wan.network.j2", v)
    assert "Name=enp1s0\n" in wan and "DHCP=yes\n" in wan and "PrefixDelegationHint=::/60\n" in wan
    ports = render("base", ROUTER + "11-idlewire-lan-ports.network.j2", v)
    assert "Name=!enp1s0\n" in ports and "Bridge=br-lan\n" in ports and "Type=ether wlan\n" in ports
    lan = render("base", ROUTER + "10-idlewire-br-lan.network.j2", {"base_router_lan_address": "10.4.0.1/22"})
    assert "Address=10.4.0.1/22\n" in lan and "IPv6SendRA=yes\n" in lan and "DHCPPrefixDelegation=yes\n" in lan
    assert "Kind=bridge" in render("base", ROUTER + "10-idlewire-br-lan.netdev.j2")


@pytest.mark.skipif(not shutil.which("dnsmasq"), reason="needs dnsmasq (dnsmasq-base)")
def test_dnsmasq_accepts_the_rendered_config(tmp_path):
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(render("base", ROUTER + "dnsmasq.conf.j2"))
    lines = conf.read_text().splitlines()
    assert "interface=br-lan" in lines and "dhcp-range=192.168.8.100,192.168.8.250,12h" in lines
    assert "server=127.0.0.53" in lines and "no-resolv" in lines
    r = subprocess.run(["dnsmasq", "--test", "-C", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    conf.write_text(conf.read_text().replace("dhcp-range=192.168.8.100", "dhcp-range=192.168.8.300"))
    r = subprocess.run(["dnsmasq", "--test", "-C", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0  # the check the unit's ExecStartPre runs does refuse a broken file


@pytest.mark.parametrize(("block", "owner"), [("61440-65535", "1024-61439"), ("49152-65535", "1024-49151"),
                                              ("4096-8191", "8192-65535")])
def test_router_nft_keeps_the_owners_ports_out_of_the_buyers_block(tmp_path, block, owner):
    text = render("firewall", "etc/idlewire/router.nft.j2",
                  {"agent_buyer_nat_ports": block, "agent_wan_interface": "enp1s0"})
    assert ('iifname "br-lan" oifname { "enp1s0", "ppp0" } meta nfproto ipv4 meta l4proto { tcp, udp } '
            f'masquerade to :{owner}') in text
    assert 'iifname "iw0" oifname "br-lan" counter drop' in text
    assert 'iifname "iw0" oifname != { "enp1s0", "ppp0" } counter drop' in text
    if shutil.which("nft") and subprocess.run(["nft", "list", "tables"], capture_output=True).returncode == 0:
        f = tmp_path / "router.nft"
        f.write_text(text)
        r = subprocess.run(["nft", "-c", "-f", str(f)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr


def test_the_firewall_unit_loads_router_nft_only_in_router_mode():
    unit = render("firewall", "etc/systemd/system/idlewire-firewall.service.j2")
    assert "After=local-fs.target nftables.service idlewire-mode.service" in unit
    load = ("/bin/sh -c 'if [ -e /run/idlewire/router ]; then exec /usr/sbin/nft -f /etc/idlewire/router.nft; "
            "else /usr/sbin/nft delete table inet idlewire_router 2>/dev/null || true; fi'")
    assert f"ExecStart={load}" in unit.splitlines() and f"ExecReload={load}" in unit.splitlines()
    assert "ExecStop=-/usr/sbin/nft delete table inet idlewire_router" in unit.splitlines()


def test_a_stamped_router_gets_an_access_point_from_the_stamped_wifi(tmp_path):
    boot, root, _, _ = make_card(tmp_path, 'unit: r-1\nmode: router\n'
                                 'wifi: {country: de, ssid: "Café Luna", psk: "correct horse", hidden: true}\n')
    r = run(boot, root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert tomllib.loads((root / "etc/idlewire/unit.toml").read_text())["mode"] == "router"
    ap = root / "etc/idlewire/hostapd.conf"
    assert stat.S_IMODE(ap.stat().st_mode) == 0o600
    lines = ap.read_text().splitlines()
    for want in ("interface=wlan0", "bridge=br-lan", "country_code=DE", f"ssid2={'Café Luna'.encode().hex()}",
                 "wpa=2", "wpa_key_mgmt=WPA-PSK", f"wpa_psk={wpa_psk('Café Luna', 'correct horse')}",
                 "ignore_broadcast_ssid=1"):
        assert want in lines, (want, lines)
    assert not any("correct horse" in line for line in lines)  # the passphrase never lands


@pytest.mark.parametrize(("wan", "want"), [("lo", "router"), ("nosuchwan9", "node")])
def test_router_mode_is_refused_when_the_wan_port_is_missing(tmp_path, wan, want):
    """A WAN name that names no port would bridge the WAN line into the owner's LAN (every other
    port is bridged): idlewire-mode refuses router mode then, saying which ports there are and the
    fix, and the unit runs as a node. Run for real with sh, its paths pointed into tmp_path."""
    script = render("base", "usr/local/sbin/idlewire-mode.j2",
                    {"agent_wan_interface": wan, "base_router_wan_wait": 1})
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "10-idlewire-wan.network").write_text("wan\n")
    (tmp_path / "router" / "10-idlewire-br-lan.netdev").write_text("bridge\n")
    agent = tmp_path / "idlewire-agent"
    agent.write_text('#!/bin/sh\ncase "$*" in *--wan*) echo dhcp ;; *) echo router ;; esac\n')
    agent.chmod(0o755)
    script = (script.replace("/usr/bin/idlewire-agent", str(agent))
              .replace("/etc/idlewire/router/", f"{tmp_path}/router/").replace("/run/", f"{tmp_path}/run/"))
    assert "/run/" not in script.replace(f"{tmp_path}/run/", "")
    (tmp_path / "mode").write_text(script)
    r = subprocess.run(["sh", str(tmp_path / "mode")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"idlewire-mode: {want}" + (" (WAN: dhcp)" if want == "router" else "")
    copied = sorted(p.name for p in (tmp_path / "run" / "systemd" / "network").iterdir())
    if want == "router":
        assert copied == ["10-idlewire-br-lan.netdev", "10-idlewire-wan.network"] and r.stderr == ""
        assert (tmp_path / "run" / "idlewire" / "router").exists()
    else:
        assert copied == [] and not (tmp_path / "run" / "idlewire" / "router").exists()
        (line,) = r.stderr.splitlines()
        assert "router mode refused: no WAN port 'nosuchwan9'" in line and "lo" not in line.split("ports here:")[1]
        assert "agent_wan_interface" in line


def test_a_pppoe_router_takes_the_wan_file_without_dhcp_and_switches_pppd_on(tmp_path):
    """`idlewire-agent mode --wan` says pppoe: the WAN port's file comes from router/pppoe (no DHCP
    on the port) and /run/idlewire/pppoe starts idlewire-pppoe; dhcp again: both are gone."""
    script = render("base", "usr/local/sbin/idlewire-mode.j2", {"agent_wan_interface": "lo", "base_router_wan_wait": 1})
    for d, text in (("router", "dhcp\n"), ("router/pppoe", "pppoe\n")):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "10-idlewire-wan.network").write_text(text)
    (tmp_path / "router" / "10-idlewire-br-lan.netdev").write_text("bridge\n")
    agent = tmp_path / "idlewire-agent"
    script = (script.replace("/usr/bin/idlewire-agent", str(agent))
              .replace("/etc/idlewire/router/", f"{tmp_path}/router/").replace("/run/", f"{tmp_path}/run/"))
    (tmp_path / "mode").write_text(script)
    wan = tmp_path / "run" / "systemd" / "network" / "10-idlewire-wan.network"
    for line in ("pppoe", "dhcp"):
        agent.write_text(f'#!/bin/sh\ncase "$*" in *--wan*) echo {line} ;; *) echo router ;; esac\n')
        agent.chmod(0o755)
        r = subprocess.run(["sh", str(tmp_path / "mode")], capture_output=True, text=True, timeout=30)
        assert (r.returncode, r.stdout.strip()) == (0, f"idlewire-mode: router (WAN: {line})"), r.stderr
        assert wan.read_text() == f"{line}\n"
        assert (tmp_path / "run" / "idlewire" / "pppoe").exists() == (line == "pppoe")


def test_wpa3_is_asked_for_and_then_the_access_point_offers_sae_beside_wpa2(tmp_path):
    """SAE has no derived key: with wifi.wpa3 the stamp carries the passphrase, which lands only in
    the AP's 0600 hostapd.conf (transition mode: WPA2 clients join as before, with PMF optional)."""
    passphrase = 'correct "horse" #1 '
    boot, root, _, _ = make_card(tmp_path, 'unit: r-1\nmode: router\n'
                                 f'wifi: {{country: DE, ssid: Atelier, psk: {passphrase!r}, wpa3: true}}\n')
    r = run(boot, root)
    assert r.returncode == 0, r.stdout + r.stderr
    ap = root / "etc/idlewire/hostapd.conf"
    assert stat.S_IMODE(ap.stat().st_mode) == 0o600
    lines = ap.read_text().splitlines()
    for want in ("wpa_key_mgmt=WPA-PSK SAE", f"sae_password={passphrase}", "ieee80211w=1", "sae_require_mfp=1",
                 f"wpa_psk={wpa_psk('Atelier', passphrase)}"):
        assert want in lines, (want, lines)
    assert "wpa_key_mgmt=WPA-PSK" not in lines
    client = (root / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf").read_text()
    assert passphrase.strip() not in client  # the client side keeps the derived key only
    assert not (boot / "idlewire" / "stamp.toml").exists()


@pytest.mark.parametrize(("psk", "says"), [("ab" * 32, "needs the passphrase"), ("pass|id=x1", "without '|'")])
def test_wpa3_refuses_what_sae_cannot_take(tmp_path, psk, says):
    from idlewire.errors import UserError
    from idlewire.units import load_unit

    f = tmp_path / "unit.yml"
    f.write_text(f"unit: r-1\nwifi: {{country: DE, ssid: Atelier, psk: '{psk}', wpa3: true}}\n")
    with pytest.raises(UserError) as exc:
        load_unit(f)
    assert says in str(exc.value) and psk not in str(exc.value), exc.value


def test_units_csv_asks_for_wpa3_in_its_own_column(tmp_path):
    from idlewire.units import load_units

    f = tmp_path / "units.csv"
    f.write_text("unit,wifi_country,wifi_ssid,wifi_psk,wifi_wpa3\nr-1,DE,Atelier,passphrase-1,true\n"
                 "r-2,DE,Atelier,passphrase-2,\n")
    r1, r2 = load_units(f)
    assert r1.wifi is not None and r1.wifi.wpa3 and r2.wifi is not None and not r2.wifi.wpa3
