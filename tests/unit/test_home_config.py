"""[home] settings, upnpc's output as Debian's miniupnpc 2.2.4 prints it, counter wrap, the role's
[home] block. The real router is in tests/net/test_home.py."""

import subprocess
import sys

import pytest
import rolerender
from idlewire_agent import policy, upnp

# `upnpc -s` against miniupnpd 2.3.1 in tests/homelab.py (trimmed banner)
STATUS = """upnpc : miniupnpc library test client, version 2.2.4.
List of UPNP devices found on the network :
 desc: http://192.168.1.1:41895/rootDesc.xml
 st: urn:schemas-upnp-org:device:InternetGatewayDevice:1

Found valid IGD : http://192.168.1.1:41895/ctl/IPConn
Local LAN ip address : 192.168.1.20
Connection Type : IP_Routed
Status : Connected, uptime=2s, LastConnectionError : ERROR_NONE
MaxBitRateDown : 40000000 bps (40.0 Mbps)   MaxBitRateUp 10000000 bps (10.0 Mbps)
ExternalIPAddress = 11.22.33.2
Bytes:   Sent:      516\tRecv:      4096
Packets: Sent:        6\tRecv:        6
"""


def test_igd_parsed_from_upnpc_status():
    igd = upnp.Igd.parse(STATUS)
    assert (igd.url, igd.lan_ip, igd.external_ip) == ("http://192.168.1.1:41895/rootDesc.xml", "192.168.1.20",
                                                      "11.22.33.2")
    assert upnp.Igd.parse("No IGD UPnP Device found on the network !\n") is None
    assert upnp.Igd.parse(STATUS.replace("Found valid IGD", "Found a (not connected?) IGD")) is None


def test_counter_wrap_and_reset():
    assert upnp.wrap_delta(100, 40) == 60
    assert upnp.wrap_delta(10, (1 << 32) - 6) == 16  # a 32-bit IGD v1 counter wrapped
    assert upnp.wrap_delta(10, 1 << 40) == 10  # a 64-bit counter went down: a reset, count the new value


def test_missing_upnpc_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setattr(upnp, "UPNPC", "/nonexistent/upnpc")
    monkeypatch.setattr(upnp, "NATPMPC", "/nonexistent/natpmpc")  # never to this host's real gateway
    igd, why = upnp.discover(timeout=2)
    assert igd is None and "miniupnpc" in why
    m = upnp.PortMapper(51820, discover_fn=lambda: (None, why))
    assert m.map_once() is False
    s = m.status()
    assert s["reachable"] is False and "forward UDP 51820 on your router to " in s["message"]


def test_home_defaults_and_errors_name_the_key():
    pol, problems = policy.parse_sections({})
    assert problems == [] and pol.home.mode == "node" and pol.home.source == "auto" and pol.home.upnp_map == "auto"
    pol, problems = policy.parse_sections({"home": {"mode": "bridge", "source": "snmp", "interval": 0,
                                                    "reflectors": ["1.1.1.1; rm -rf /"], "upnp_map": "yes",
                                                    "upnp_lease": 5, "margin": 3}})
    text = "\n".join(problems)
    for key in ("home.mode", "home.source", "home.interval", "home.reflectors", "home.upnp_map",
                "home.upnp_lease", "home.margin: unknown key"):
        assert key in text, text
    pol, problems = policy.parse_sections({"home": {"reflectors": ["10.0.0.1"], "upnp_map": True,
                                                    "interval": 1}})
    assert problems == [] and pol.home.reflectors == ("10.0.0.1",) and pol.home.upnp_map is True


@pytest.mark.parametrize("value", ["auto", True, False])
def test_role_renders_home_block_that_validates(tmp_path, value):
    f = tmp_path / "node.toml"
    f.write_text(rolerender.render("agent", "etc/idlewire/node.toml.j2",
                                   {"agent_upnp_map": value, "agent_mode": "router"}))
    expect = {"auto": 'upnp_map = "auto"', True: "upnp_map = true", False: "upnp_map = false"}[value]
    assert expect in f.read_text() and 'mode = "router"' in f.read_text()
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "check-config", str(f)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_what_a_router_says_is_cleaned_before_health_and_log():
    text = STATUS.replace("ExternalIPAddress = 11.22.33.2", "ExternalIPAddress = 10.0.0.1\x1b[2J")
    igd = upnp.Igd.parse(text)
    assert igd.external_ip == "10.0.0.1?[2J"
    m = upnp.PortMapper(51820, discover_fn=lambda: (igd, ""))
    assert m.map_once() is False  # not public: no mapping is even tried
    assert "not public" in m.status()["why"] and "\x1b" not in m.status()["why"]


class ScriptedIgd:
    """WAN counters as a router would report them: `rx` grows by what the test says per second."""

    def __init__(self):
        self.rx = self.tx = 0

    def counters(self):
        return self.rx, self.tx


def test_cap_is_line_minus_owner_minus_margin_and_never_above_the_schedule(monkeypatch):
    from idlewire_agent import idle

    monkeypatch.setattr(idle, "iface_bytes", lambda dev: (0, 0))  # this node moves nothing here

    sh = policy.Shaping(enabled=True, line_up=10_000_000, line_down=40_000_000, floor_up=500_000,
                        floor_down=2_000_000, cap_up=8_000_000, cap_down=30_000_000)
    applied = []
    igd = ScriptedIgd()
    now = [0.0]
    meter = idle.IdleMeter(policy.Home(source="upnp", margin_percent=10), sh, lambda u, d: applied.append((u, d)),
                           "eth0", igd=lambda: igd, clock=lambda: now[0])

    def second(owner_down_mbit):
        now[0] += 1
        igd.rx += int(owner_down_mbit * 1e6 / 8)
        meter.tick()
        return applied[-1][1] / 1e6

    second(0)
    assert second(0) == 30  # idle line: the configured cap (40 - 4 margin is above it)
    assert second(20) == 16  # 40 - 20 - 4
    meter.set_base(8_000_000, 10_000_000)  # the schedule says 10 now: the lower wins
    assert second(20) == 10
    assert second(39) == 2  # owner takes the line: the floor
    assert meter.figures()["source"] == "upnp" and meter.figures()["owner_down_mbit"] == 39


def test_router_public_address_is_blocked_for_buyers(monkeypatch):
    """The address UPnP reports for the router reaches isolation.Guard (blocked for buyers like the
    configured public_addresses); a private one (double NAT) is not reported."""
    import threading
    import types

    from idlewire_agent import idle, isolation

    monkeypatch.setattr(upnp, "UPNPC", "/nonexistent/upnpc")  # no router here: the mapping itself fails
    monkeypatch.setattr(upnp, "NATPMPC", "/nonexistent/natpmpc")
    guard = isolation.Guard("idlewire", "iw0", [])
    stop = threading.Event()
    stop.set()  # the mapper's thread ends at once; the test drives map_once itself
    cfg = types.SimpleNamespace(policy=policy.Policy(home=policy.Home(upnp_map=True)), marketplace="",
                                tunnel=types.SimpleNamespace(port=51820))
    home = idle.Home(cfg, stop, report=guard.report)
    home.close()
    home.mapper.discover = lambda: (upnp.Igd.parse(STATUS.replace("11.22.33.2", "10.0.0.1")), "")
    assert home.mapper.map_once() is False and guard.reported == {}
    home.mapper.igd = None  # as after the router's WAN came up public: discovered again
    home.mapper.discover = lambda: (upnp.Igd.parse(STATUS), "")
    assert home.mapper.map_once() is False  # upnpc is missing: not mapped, but the address is known
    assert guard.reported == {"upnp": {"11.22.33.2"}}


@pytest.mark.parametrize(("market", "endpoint", "maps"), [("", "", False), ("http://hub.example", "", True),
                                                          ("http://hub.example", "203.0.113.7", False)])
def test_auto_maps_a_market_node_without_a_public_endpoint(monkeypatch, market, endpoint, maps):
    """upnp_map = "auto": a node selling through a hub maps its port, unless its owner gave the
    public address ([tunnel] endpoint: forwarded by hand); the mapping is the endpoint buyers get."""
    import threading
    import types

    from idlewire_agent import idle

    monkeypatch.setattr(upnp, "UPNPC", "/nonexistent/upnpc")
    monkeypatch.setattr(upnp, "NATPMPC", "/nonexistent/natpmpc")
    stop = threading.Event()
    stop.set()
    cfg = types.SimpleNamespace(policy=policy.Policy(), marketplace=market,
                                tunnel=types.SimpleNamespace(port=51820, endpoint=endpoint))
    home = idle.Home(cfg, stop)
    home.close()
    assert (home.mapper is not None) is maps
    if maps:
        assert home.endpoint() is None
        home.mapper.igd, home.mapper.ext_port = upnp.Igd.parse(STATUS), 61000  # the router gave another port
        assert home.endpoint() == ("11.22.33.2", 61000)
        assert home.health()["reachability"]["endpoint"] == "11.22.33.2:61000"
