"""Hostile buyers against the real agent, the role's real firewall and the reference client
(issue 14: addresses and flows, isolation as a precondition of every open session, fair admission).

The node's WAN neighbour is a home router (the lab's "inet" namespace): its LAN address is the
node's default gateway; the "internet" beyond it is 198.51.100.10 on its loopback, and in the
home-router test its public side 203.0.113.2 faces an ISP namespace. The role's table drops
private destinations, so buyers reach only these public-looking addresses.
"""

import json
import subprocess
import sys
import time

import pytest
from agentlab import NodeLab
from rolerender import render
from shapelab import listen, tcp_reachable
from test_agent import wait_for

pytestmark = pytest.mark.net
INTERNET = "198.51.100.10"
ROUTER_PUBLIC = "203.0.113.2"
ISP = "203.0.113.1"
POLL = 0.5


class Node(NodeLab):
    """NodeLab with the role's firewall loaded, the isolation required, and a default route."""

    def __init__(self, lab, tmp, n, firewall=True, **overrides):
        super().__init__(lab, tmp, n, firewall__required=firewall, metering__poll_interval=POLL, **overrides)
        self.inet.run("ip", "addr", "add", f"{INTERNET}/32", "dev", "lo")
        self.node.run("ip", "route", "add", "default", "via", f"{self.wan}.2")
        self.fw = tmp / "firewall.nft"
        self.fw.write_text(render("firewall", "etc/idlewire/firewall.nft.j2", {
            "firewall_tunnel_interface": self.wg, "firewall_wan_interface": "v2a",
            "firewall_admin_interfaces": ["v1a"], "firewall_admin_tcp_ports": [self.api_port]}))
        if firewall:
            self.load_firewall()
        self.buyers = 0

    def load_firewall(self) -> None:
        self.node.run("nft", "-f", str(self.fw))

    def buyer_client(self, key: str = "buyer", *args: str) -> subprocess.Popen:
        """`idlewire client connect` with its own buyer key, routing the public test networks."""
        return self.buyer.popen("env", "--default-signal=INT", sys.executable, "-m", "idlewire", "client", "connect",
                                f"http://{self.lan}.1:{self.api_port}", "--key", str(self.tmp / f"{key}.key"),
                                "--interface", self.buyer_wg, "--json", "--interval", "1",
                                "--route", "198.51.100.0/24", "--route", "203.0.113.0/24", *args,
                                stdout=subprocess.PIPE, stderr=open(self.tmp / "client.log", "a"), text=True)

    def wait_internet(self, timeout: float = 15) -> None:
        try:
            wait_for(lambda: self.buyer.run("ping", "-c1", "-W1", INTERNET, check=False).returncode == 0, timeout)
        except AssertionError:
            raise AssertionError("tunnel did not come up: " + (self.tmp / "client.log").read_text()[-2000:]
                                 + self.log.read_text()[-2000:]) from None

    def peers(self) -> list[str]:
        return self.node.run("wg", "show", self.wg, "peers").stdout.split()

    def api_buyer(self, name: str):
        from idlewire.cmd_client import Buyer, load_key

        return Buyer(f"http://127.0.0.1:{self.fwd.port}", load_key(self.tmp / f"{name}.key"))


@pytest.fixture
def make_node(lab, tmp_path):
    made = []

    def make(n=170, **overrides):
        node = Node(lab, tmp_path, n, **overrides)
        made.append(node)
        node.start()
        return node

    yield make
    for node in made:
        node.stop()


def nft_counter_bytes(ns, table: str, chain: str) -> int:
    rules = json.loads(ns.run("nft", "-j", "list", "chain", "inet", table, chain).stdout)["nftables"]
    return sum(e["counter"]["bytes"] for r in rules if "rule" in r for e in r["rule"]["expr"] if "counter" in e)


def conntrack_lines(ns, address: str) -> list[str]:
    """The namespace's conntrack entries naming `address` (from the kernel's own table)."""
    text = ns.run("cat", "/proc/net/nf_conntrack").stdout
    return [ln for ln in text.splitlines() if f"={address} " in ln]


# --- 1. addresses and flows ----------------------------------------------------------------------
BLASTER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(({host!r}, 9999))
_, peer = s.recvfrom(100)
end = time.time() + {seconds}
while time.time() < end:   # the answers of the first buyer's flow, 1000 B every 2 ms
    try:
        s.sendto(b"x" * 1000, peer)
    except OSError:
        pass
    time.sleep(0.002)
"""


@pytest.mark.parametrize("rest", [600, 0], ids=["addresses-rest", "same-address-at-once"])
def test_a_closed_sessions_flows_never_reach_the_next_buyer(make_node, rest):
    """Buyer A starts a UDP flow whose answers keep coming after A closes; buyer B opens right after.
    Resting addresses give B another address; with rest 0 B gets A's address at once, and only the
    deletion of A's flows keeps their answers away. Figure: bytes of A's flow seen by B (must be 0)."""
    node = make_node(sessions__address_rest=rest)
    node.inet.popen(sys.executable, "-c", BLASTER.format(host=INTERNET, seconds=40))
    # What arrives through the buyers' tunnel from the flow's server, counted by the buyer's kernel.
    probe = f"type filter hook prerouting priority -300\n ip saddr {INTERNET} udp sport 9999 counter"
    node.buyer.run("nft", "-f", "-", input=f"table inet probe {{\n chain pre {{\n {probe}\n }}\n}}\n")
    a = node.buyer_client("buyer-a")
    node.wait_internet()
    (sa,) = node.open_sessions()
    addr_a = sa["address"].split("/")[0]
    node.buyer.run(sys.executable, "-c", f"import socket; socket.socket(2, 2).sendto(b'go', ({INTERNET!r}, 9999))")
    wait_for(lambda: nft_counter_bytes(node.buyer, "probe", "pre") > 100_000)  # A receives its flow
    assert conntrack_lines(node.node, addr_a), "A's flow is tracked while A is connected"
    node.stop_client(a)
    assert node.session(sa["session"])["state"] == "closed"
    # The flow's answers still arrive at the node; none of them may be tracked for A's address.
    assert conntrack_lines(node.node, addr_a) == []
    seen_before_b = nft_counter_bytes(node.buyer, "probe", "pre")
    b = node.buyer_client("buyer-b")
    node.wait_internet()
    sb = next(s for s in node.open_sessions() if s["session"] != sa["session"])
    time.sleep(3)  # 1.5 MB of A's answers are sent meanwhile
    leaked = nft_counter_bytes(node.buyer, "probe", "pre") - seen_before_b
    ses_b = node.session(sb["session"])
    print(f"rest {rest}: A {addr_a}, B {sb['address']}; bytes of A's flow seen by B: {leaked}; "
          f"B metered down {ses_b['down']}")
    if rest:
        assert sb["address"] != sa["address"]
    else:
        assert sb["address"] == sa["address"]
    assert leaked == 0
    assert ses_b["down"] < 20_000  # handshakes and keepalives, not 1.5 MB of someone else's flow
    node.stop_client(b)


# --- 2. isolation as a precondition of every open session -------------------------------------------
LOSSES = {
    "nft flush ruleset": "flush ruleset",
    # what `systemctl reload nftables` does: /etc/nftables.conf starts with flush ruleset
    "systemctl reload nftables": "flush ruleset\ntable inet filter {\n chain input { type filter hook input "
                                 "priority 0; policy accept; }\n}",
    # the old restart handler: ExecStop deleted the table, ExecStart loaded it again
    "restart handler (stop)": "delete table inet idlewire",
    "buyer_out flushed": "flush chain inet idlewire buyer_out",
    "private range deleted": "delete element inet idlewire buyer_blocked_v4 { 192.168.0.0/16 }",
    "accept inserted first": "insert rule inet idlewire buyer_out accept",
    "learned table deleted": "delete table inet idlewire_learned",
}


def test_isolation_loss_removes_every_buyer_peer_within_a_poll(make_node):
    """Each way the table goes missing or changes: every buyer peer is gone within one poll, it is
    logged, new sessions are refused, and the buyer is back once the table is. An atomic reload
    of the role's table (its reload handler) removes nobody. Figure: table loss -> peers removed."""
    from idlewire.errors import UserError
    from idlewire_agent import keys

    node = make_node()
    client = node.buyer_client()
    node.wait_internet()
    assert node.peers()
    # The role's reload: one nft -f of the rendered file (delete + add in one transaction), 5 times.
    lines = node.log.read_text().count("isolation lost")
    for _ in range(5):
        node.node.run(*node_reload_command(node))
        time.sleep(POLL * 1.5)
        assert node.peers()
    assert node.log.read_text().count("isolation lost") == lines
    assert node.buyer.run("ping", "-c1", "-W2", INTERNET, check=False).returncode == 0
    figures = {}
    for name, script in LOSSES.items():
        t0 = time.monotonic()
        node.node.run("nft", "-f", "-", input=script + "\n")
        wait_for(lambda: not node.peers(), timeout=POLL * 4, step=0.02)
        figures[name] = time.monotonic() - t0
        if name == "learned table deleted":  # the agent's own table: it loads it again itself
            wait_for(node.peers, timeout=POLL * 4, step=0.02)
            continue
        assert node.buyer.run("ping", "-c1", "-W1", INTERNET, check=False).returncode != 0
        with pytest.raises(UserError, match="isolation"):
            node.api_buyer("other").open(keys.wg_keypair()[1])
        assert not node.peers()  # not back while the table is not
        node.load_firewall()
        node.wait_internet(20)
        assert node.peers()
    log = node.log.read_text()
    assert log.count("buyer isolation lost") >= len(LOSSES) and "isolation is back" in log
    assert node.open_sessions()[0]["state"] == "open"  # the session survived; only its peer went
    print("table loss -> peers removed: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in figures.items()),
          f"(poll {POLL} s)")
    assert max(figures.values()) <= POLL + 1.0
    node.stop_client(client)


def node_reload_command(node) -> list[str]:
    """The ExecReload of the role's rendered unit that reloads the buyers' table, pointed at the
    lab's file (the unit's other ExecReload is router mode's table, absent in node mode)."""
    unit = render("firewall", "etc/systemd/system/idlewire-firewall.service.j2", {})
    (line,) = [ln for ln in unit.splitlines()
               if ln.startswith("ExecReload=") and ln.endswith("/etc/idlewire/firewall.nft")]
    argv = line.split("=", 1)[1].split()
    return [str(node.fw) if a == "/etc/idlewire/firewall.nft" else a for a in argv]


def home_router(node, lab) -> None:
    """The lab's inet namespace as a home router: LAN 10.N.2.2 (the node's gateway), public
    203.0.113.2 towards an ISP namespace; NAT with hairpin; its admin page (80) and SSH (22) on
    every address, and a port forward public:8080 -> LAN 10.N.2.2:80."""
    r = node.inet
    isp = lab.ns("isp")
    wan_if, _ = lab.link(r, f"{ROUTER_PUBLIC}/24", isp, f"{ISP}/24")
    isp.run("ip", "addr", "add", "192.0.2.80/32", "dev", "lo")  # a web server on the internet
    isp.run("ip", "route", "add", "default", "via", ROUTER_PUBLIC)
    r.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    r.run("ip", "route", "add", "192.0.2.0/24", "via", ISP)
    lan = f"{node.wan}.0/24"
    r.run("nft", "-f", "-", input=f"""
table ip router {{
    chain pre {{
        type nat hook prerouting priority dstnat
        ip daddr {ROUTER_PUBLIC} tcp dport 8080 dnat to {node.wan}.2:80
    }}
    chain post {{
        type nat hook postrouting priority srcnat
        oifname "{wan_if}" masquerade
        ip saddr {lan} ip daddr {node.wan}.2 ct status dnat masquerade
    }}
    chain input {{
        type filter hook input priority 0
        iifname "{wan_if}" tcp dport {{ 22, 80 }} drop
    }}
}}
""")
    for port in (22, 80):
        listen(r, port)
    listen(isp, 80, "192.0.2.80")


def test_a_buyer_reaches_neither_the_home_router_nor_its_public_address(make_node, lab):
    """Behind a home router with hairpin NAT the router's public address leads to its admin page,
    SSH and port forwards. Unless the node knows that address ([firewall] public_addresses, later
    the hub or UPnP) a buyer reaches them; then none of them, while the internet still answers."""
    node = make_node(n=172)
    home_router(node, lab)
    targets = {"router public admin": (ROUTER_PUBLIC, 80), "router public ssh": (ROUTER_PUBLIC, 22),
               "hairpin port forward": (ROUTER_PUBLIC, 8080), "router LAN admin": (f"{node.wan}.2", 80),
               "router LAN ssh": (f"{node.wan}.2", 22)}
    # The owner's LAN side reaches them all (the lab is right); the internet's side none.
    assert all(tcp_reachable(node.node, h, p) for h, p in targets.values())
    client = node.buyer_client("buyer", "--route", "192.0.2.0/24")
    node.wait_internet()
    assert tcp_reachable(node.buyer, "192.0.2.80", 80)  # the internet through the home router
    open_before = {k for k, (h, p) in targets.items() if tcp_reachable(node.buyer, h, p)}
    assert open_before == {"router public admin", "router public ssh", "hairpin port forward"}, open_before
    node.stop_client(client)
    node.stop()
    node.fwd = None  # a new forwarder with the new agent
    # The owner tells the node its public address (the hub or UPnP will report it later).
    cfg = node.cfg.read_text().replace("[firewall]", f'[firewall]\npublic_addresses = ["{ROUTER_PUBLIC}"]')
    node.cfg.write_text(cfg)
    node.start()
    client = node.buyer_client("buyer", "--route", "192.0.2.0/24")
    node.wait_internet()
    assert tcp_reachable(node.buyer, "192.0.2.80", 80)
    reached = {k for k, (h, p) in targets.items() if tcp_reachable(node.buyer, h, p)}
    print(f"buyer reached {len(reached)} of {len(targets)} home-router targets: {sorted(reached)}")
    assert reached == set()
    learned = node.node.run("nft", "list", "table", "inet", "idlewire_learned").stdout
    assert ROUTER_PUBLIC in learned and f"{node.wan}.2" in learned  # the configured and the gateway
    node.stop_client(client)


# --- 4. fair admission ---------------------------------------------------------------------------
def test_fair_admission_with_real_buyers(make_node, tmp_path):
    """One key cannot take every slot; sessions never connected are closed at the handshake
    deadline while a connected one stays; a statement beyond what was carried is refused."""
    from idlewire.cmd_client import NodeError
    from idlewire_agent import keys

    node = make_node(n=173, sessions__max_per_buyer=2, sessions__handshake_timeout=5, sessions__max=4)
    client = node.buyer_client("honest")
    node.wait_internet()
    hog = node.api_buyer("hog")
    ghosts = [hog.open(keys.wg_keypair()[1])["session"] for _ in range(2)]
    with pytest.raises(NodeError) as e:
        hog.open(keys.wg_keypair()[1])
    assert e.value.status == 429 and "maximum of 2 sessions" in str(e.value)
    t0 = time.monotonic()
    wait_for(lambda: all(node.session(s)["state"] == "closed" for s in ghosts), timeout=15)
    closed_after = time.monotonic() - t0
    assert {node.session(s)["reason"] for s in ghosts} == {"no_handshake"}
    honest = [s for s in node.open_sessions() if s["session"] not in ghosts]
    assert len(honest) == 1 and honest[0]["up"] > 0  # connected: its handshake counted
    hog.open(keys.wg_keypair()[1])  # the slots are free again
    # A statement claiming more than the node carried for this session is refused and not paid.
    from idlewire_agent import receipts

    sid = honest[0]["session"]
    key = node.api_buyer("honest").key
    with pytest.raises(NodeError) as e:
        node.api_buyer("honest").request("POST", f"/sessions/{sid}/usage",
                                         receipts.sign_usage(key, sid, 10**12, 0, int(time.time())))
    assert e.value.status == 409
    assert node.session(sid)["paid_up"] < 10**9
    print(f"ghost sessions closed {closed_after:.1f} s after the hog's open (deadline 5 s)")
    node.stop_client(client)


STOPS_PAYING = """
import sys, time
from pathlib import Path
from idlewire.cmd_client import Buyer, load_key, bring_up, counters
from idlewire_agent import keys
b = Buyer('http://{lan}.1:{port}', load_key(Path('{key}')))
priv, pub = keys.wg_keypair()
s = b.open(pub)
bring_up('{wg}', priv, s, '{lan}.1', ['198.51.100.0/24'])
print(s['session'], flush=True)
time.sleep(60)   # never co-signs
"""


def test_a_key_cut_off_for_unpaid_usage_waits_longer_each_time(make_node, tmp_path):
    """A buyer that stops co-signing is cut off; its key is refused for unpaid_backoff seconds, then
    admitted, and after the next unpaid close refused twice as long."""
    node = make_node(n=174, metering__unpaid_cap_mb=2, sessions__unpaid_backoff=4, sessions__unpaid_backoff_max=60)
    for port in (5301, 5302):  # one per round: a server whose client was killed stays busy for a while
        node.inet.popen("iperf3", "-s", "-B", INTERNET, "-p", str(port), stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    from idlewire.cmd_client import NodeError
    from idlewire_agent import keys

    waits = []
    for port in (5301, 5302):
        p = node.buyer.popen(sys.executable, "-c", STOPS_PAYING.format(
            lan=node.lan, port=node.api_port, key=tmp_path / "cheat.key", wg=node.buyer_wg),
            stdout=subprocess.PIPE, text=True)
        sid = p.stdout.readline().strip()
        node.wait_internet()
        iperf = node.buyer.popen("iperf3", "-c", INTERNET, "-p", str(port), "-n", "6M", "-b", "50M",
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # beyond the 2 MB cap
        wait_for(lambda: node.session(sid)["state"] == "closed", timeout=30)  # noqa: B023
        assert node.session(sid)["reason"] == "unpaid"
        iperf.kill()
        p.kill()
        p.wait()
        node.buyer.run("ip", "link", "del", node.buyer_wg, check=False)
        t0 = time.monotonic()
        with pytest.raises(NodeError) as e:
            node.api_buyer("cheat").open(keys.wg_keypair()[1])
        assert e.value.status == 429 and "unpaid" in str(e.value)
        wait_s = int(str(e.value).rsplit("in ", 1)[1].split()[0])
        waits.append(wait_s)
        wait_for(lambda: time.monotonic() - t0 >= wait_s, timeout=wait_s + 2)  # noqa: B023
    print(f"back-off after unpaid closes: {waits} s")
    assert waits[0] in (3, 4) and waits[1] in (7, 8)
