"""The lab's PPPoE access concentrator (tests/pppoelab.py) against a scripted client, without pppd.

    home: Client (AF_PACKET) ── veth ── isp: pppoelab ── isp-ppp0 (tun, 100.64.7.1) ── ping

The client does, step by step, what pppd with plugin pppoe.so does (PADI with an empty
Service-Name and a Host-Uniq, LCP with MRU 1492 and a magic number, CHAP-MD5 or PAP, IPCP asking
for 0.0.0.0, DNS and VJ compression) and checks every answer; IPv4 crosses the session both
ways (an echo to the tun's address answered by the ISP namespace's kernel, a ping from that
namespace answered by the client). What it cannot show is a real pppd's exact sequence: that
takes a booted guest (QEMU), where pppd dials this AC.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pppoelab as po
import pytest
from netlab import have_netns

pytestmark = [pytest.mark.net, pytest.mark.skipif(bool(have_netns()), reason=have_netns() or ""),
              pytest.mark.skipif(not Path("/dev/net/tun").exists(), reason="needs /dev/net/tun")]

PPPOELAB = Path(__file__).resolve().parent.parent / "pppoelab.py"
LOCAL, PEER, DNS = "100.64.7.1", "100.64.7.2", ("100.64.7.53", "100.64.7.54")
USER, PASSWORD = "alice@isp.test", "s3cret"
IPV6CP, VJ = 0x8057, 2
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def inside(netns: str):
    """This thread in a network namespace for a while: sockets made meanwhile stay in it."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{netns}") as there:
        if libc.setns(there.fileno(), CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            libc.setns(home.fileno(), CLONE_NEWNET)


def checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(src: bytes, dst: bytes, kind: int, ident: int, seq: int, data: bytes) -> bytes:
    """An IPv4 packet carrying an ICMP echo request (kind 8) or reply (kind 0)."""
    body = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + data
    body = body[:2] + checksum(body).to_bytes(2) + body[4:]
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), seq, 0, 64, 1, 0, src, dst)
    return head[:10] + checksum(head).to_bytes(2) + head[12:] + body


class AC(po.Running):
    """pppoelab in the ISP's namespace with this file's login and addresses."""

    def __init__(self, ns, iface: str, tmp: Path, *options: str) -> None:
        super().__init__(ns, tmp / "events.jsonl", "--iface", iface, "--user", USER, "--password", PASSWORD,
                         "--local-ip", LOCAL, "--peer-ip", PEER, "--dns", DNS[0], "--dns", DNS[1], *options)
        self.mac = bytes.fromhex(self.ready["mac"].replace(":", ""))


class Client:
    """The client's side (pppd's), scripted: each step sends and waits for the AC's answer.

    Frames a step does not wait for stay in a backlog for the next; po.LCP echoes and ICMP echo
    requests to the client's address are answered on the way, as pppd and the kernel would.
    """

    def __init__(self, ns, iface: str) -> None:
        with inside(ns.name):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(po.ETH_P_ALL))
            self.sock.bind((iface, 0))
        self.sock.settimeout(0.1)
        self.mac, self.ac, self.session, self.ident = self.sock.getsockname()[4], po.BROADCAST, 0, 0
        self.magic, self.address, self.backlog = 0x1D1E1A7E, bytes(4), []
        self.echoes_answered, self.answers_echoes = 0, True

    def next_id(self) -> int:
        self.ident = (self.ident + 1) % 256
        return self.ident

    def send_discovery(self, code: int, tags: list[tuple[int, bytes]], session: int = 0) -> None:
        self.sock.send(po.Frame(self.ac, self.mac, po.ETH_DISCOVERY, code, session, po.encode_tags(tags)).encode())

    def send_ppp(self, proto: int, info: bytes) -> None:
        self.sock.send(po.Frame(self.ac, self.mac, po.ETH_SESSION, 0, self.session, proto.to_bytes(2) + info).encode())

    def poll(self) -> po.Frame | None:
        """One PPPoE frame for this client, unless it was an echo (answered here) or none came."""
        try:
            data, addr = self.sock.recvfrom(65535)
        except TimeoutError:
            return None
        f = po.Frame.decode(data)
        if f is None or addr[2] == po.PACKET_OUTGOING or f.dst not in (self.mac, po.BROADCAST):
            return None
        return None if f.stage == po.ETH_SESSION and self.answer(int.from_bytes(f.payload[:2]), f.payload[2:]) else f

    def answer(self, proto: int, info: bytes) -> bool:
        """Whether this was an LCP Echo-Request or an ICMP echo request to us, answered now."""
        if proto == po.LCP and info[:1] == bytes([po.ECHO_REQ]) and self.answers_echoes:
            _, ident, data = po.decode_control(info)
            self.send_ppp(po.LCP, po.control(po.ECHO_REPLY, ident, self.magic.to_bytes(4) + data[4:]))
            self.echoes_answered += 1
            return True
        if proto == po.IPV4 and len(info) >= 28 and info[9] == 1 and info[16:20] == self.address and info[20] == 8:
            ident, seq = struct.unpack_from("!HH", info, 24)
            self.send_ppp(po.IPV4, icmp_echo(self.address, info[12:16], 0, ident, seq, info[28:]))
            return True
        return False

    def recv(self, match: Callable[[po.Frame], bool], timeout: float = 5) -> po.Frame:
        for f in self.backlog:
            if match(f):
                self.backlog.remove(f)
                return f
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            f = self.poll()
            if f and match(f):
                return f
            if f:
                self.backlog.append(f)
        raise AssertionError(f"nothing expected came in {timeout} s; backlog: {self.backlog}")

    def pump(self, done: Callable[[], bool], timeout: float = 5) -> None:
        """Answer echoes, keeping other frames for later, until done() or the timeout."""
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            if f := self.poll():
                self.backlog.append(f)

    def discovery(self, code: int, timeout: float = 5) -> po.Frame:
        return self.recv(lambda f: f.stage == po.ETH_DISCOVERY and f.code == code, timeout)

    def expect(self, proto: int, *codes: int) -> tuple[int, int, bytes]:
        def wanted(f: po.Frame) -> bool:
            if f.stage != po.ETH_SESSION or f.session != self.session or int.from_bytes(f.payload[:2]) != proto:
                return False
            return po.decode_control(f.payload[2:])[0] in codes
        return po.decode_control(self.recv(wanted).payload[2:])

    def discover(self, tags: list[tuple[int, bytes]]) -> tuple[dict, int]:
        """po.PADI → po.PADO → po.PADR → po.PADS with these tags: the po.PADO's tags and the session id."""
        self.ac, self.session, self.backlog = po.BROADCAST, 0, []
        self.send_discovery(po.PADI, tags)
        pado = self.discovery(po.PADO)
        self.ac = pado.src
        self.send_discovery(po.PADR, tags)
        pads = self.discovery(po.PADS)
        assert dict(po.decode_tags(pads.payload)).items() >= dict(tags).items()
        self.session = pads.session
        return dict(po.decode_tags(pado.payload)), pads.session

    def negotiate(self, proto: int, options: dict[int, bytes]) -> tuple[dict, dict, list]:
        """Configure-Request until acked, acking the AC's: (what we got, what the AC asked, Rejected)."""
        ours, theirs, acked, rejected = dict(options), None, False, []
        self.send_ppp(proto, po.control(po.CONF_REQ, self.next_id(), po.encode_options(ours.items())))
        while not (acked and theirs is not None):
            code, ident, data = self.expect(proto, po.CONF_REQ, po.CONF_ACK, po.CONF_NAK, po.CONF_REJ)
            if code == po.CONF_REQ:
                theirs = dict(po.decode_options(data))
                self.send_ppp(proto, po.control(po.CONF_ACK, ident, data))
            elif code == po.CONF_ACK:
                acked = True
            else:
                for kind, value in po.decode_options(data):
                    if code == po.CONF_NAK:
                        ours[kind] = value
                    else:
                        del ours[kind]
                        rejected.append(kind)
                self.send_ppp(proto, po.control(po.CONF_REQ, self.next_id(), po.encode_options(ours.items())))
        return ours, theirs, rejected

    def lcp(self) -> dict:
        """po.LCP open: what the AC asked for."""
        return self.negotiate(po.LCP, {po.MRU: (1492).to_bytes(2), po.MAGIC: self.magic.to_bytes(4)})[1]

    def chap(self, user: str, password: str) -> bool:
        _, ident, data = self.expect(po.CHAP, 1)
        value = po.chap_md5(ident, password.encode(), data[1:1 + data[0]])
        self.send_ppp(po.CHAP, po.control(po.CHAP_RESPONSE, ident, bytes([len(value)]) + value + user.encode()))
        return self.expect(po.CHAP, 3, 4)[0] == po.CHAP_SUCCESS

    def pap(self, user: str, password: str) -> bool:
        u, p = user.encode(), password.encode()
        self.send_ppp(po.PAP, po.control(po.PAP_REQ, self.next_id(), bytes([len(u)]) + u + bytes([len(p)]) + p))
        return self.expect(po.PAP, 2, 3)[0] == po.PAP_ACK

    def ipcp(self) -> tuple[dict, dict, list]:
        """po.IPCP as pppd asks (usepeerdns, VJ on): (what we got, what the AC asked, what it Rejected)."""
        ours, theirs, rejected = self.negotiate(po.IPCP, {po.IP_ADDRESS: bytes(4), VJ: b"\x00\x2d\x0f\x01",
                                                       po.DNS1: bytes(4), po.DNS2: bytes(4)})
        self.address = ours[po.IP_ADDRESS]
        return ours, theirs, rejected

    def ping(self, dst: str) -> bytes:
        """An ICMP echo to dst through the session: the reply's payload."""
        self.send_ppp(po.IPV4, icmp_echo(self.address, socket.inet_aton(dst), 8, 0x77, 1, b"through the tun"))
        reply = self.recv(lambda f: f.stage == po.ETH_SESSION and f.payload[:2] == po.IPV4.to_bytes(2)
                          and f.payload[2 + 20] == 0)
        assert reply.payload[2 + 12:2 + 16] == socket.inet_aton(dst)
        return reply.payload[2 + 28:]

    def dial(self, auth: str, password: str = PASSWORD) -> dict:
        """Discovery to po.IPCP open, as pppd does it: what po.IPCP gave."""
        self.discover([(po.SERVICE_NAME, b""), (po.HOST_UNIQ, b"\x00\x00\x04\xd2")])
        self.lcp()
        assert (self.chap if auth == "chap" else self.pap)(USER, password)
        return self.ipcp()[0]


@pytest.fixture
def wire(lab):
    """The ISP's namespace and the home's, one veth between them: (isp, its end, home, its end)."""
    isp, home = lab.ns("isp"), lab.ns("home")
    ac_end, client_end = lab.link(isp, None, home, None)
    return isp, ac_end, home, client_end


def test_chap_session_carries_ipv4_both_ways(wire, tmp_path):
    isp, ac_end, home, client_end = wire
    ac = AC(isp, ac_end, tmp_path, "--auth", "chap", "--echo-interval", "0.3")
    client = Client(home, client_end)

    tags = [(po.SERVICE_NAME, b""), (po.HOST_UNIQ, b"\x00\x00\x30\x39"), (po.RELAY_SESSION_ID, b"relay-7")]
    pado, session = client.discover(tags)
    assert pado[po.AC_NAME] == b"idlewire-lab" and pado[po.SERVICE_NAME] == b""
    assert pado[po.HOST_UNIQ] == b"\x00\x00\x30\x39" and pado[po.RELAY_SESSION_ID] == b"relay-7"
    assert 0 < session < 0xFFFF
    ac.wait("pads", session=session, mac=client.mac.hex(":"))

    asked = client.lcp()
    assert asked[po.AUTH] == po.CHAP.to_bytes(2) + b"\x05" and asked[po.MRU] == (1492).to_bytes(2)
    ac.wait("lcp-up", session=session)
    assert client.chap(USER, PASSWORD)
    ac.wait("auth", ok=True, user=USER, method="chap")

    client.send_ppp(IPV6CP, po.control(po.CONF_REQ, client.next_id(), po.encode_options([(1, bytes(8))])))
    _, _, rejected = client.expect(po.LCP, po.PROTO_REJ)
    assert rejected[:2] == IPV6CP.to_bytes(2)
    ac.wait("protocol-reject", protocol="0x8057")

    got, asked, refused = client.ipcp()
    assert got == {po.IP_ADDRESS: socket.inet_aton(PEER), po.DNS1: socket.inet_aton(DNS[0]),
                   po.DNS2: socket.inet_aton(DNS[1])}
    assert asked == {po.IP_ADDRESS: socket.inet_aton(LOCAL)} and refused == [VJ]
    ac.wait("ipcp-up", peer=PEER, local=LOCAL, dns=list(DNS))

    assert client.ping(LOCAL) == b"through the tun"  # the ISP namespace's kernel answered via the tun
    pinger = isp.popen("ping", "-c1", "-W3", PEER, stdout=subprocess.DEVNULL)
    client.pump(lambda: pinger.poll() is not None)
    assert pinger.wait() == 0

    client.send_ppp(po.LCP, po.control(po.ECHO_REQ, client.next_id(), client.magic.to_bytes(4) + b"hi"))
    _, _, data = client.expect(po.LCP, po.ECHO_REPLY)
    assert data[4:] == b"hi" and data[:4] not in (bytes(4), client.magic.to_bytes(4))
    client.pump(lambda: client.echoes_answered >= 2, timeout=3)
    assert client.echoes_answered >= 2  # the AC asks too (every 0.3 s here)

    ac.proc.send_signal(signal.SIGTERM)
    client.expect(po.LCP, po.TERM_REQ)
    assert client.discovery(po.PADT).session == session
    assert ac.proc.wait(timeout=5) == 0
    ac.wait("terminated", session=session, why="AC stopped")
    assert isp.run("ip", "link", "show", "isp-ppp0", check=False).returncode != 0


def test_pap_wrong_password_is_refused_then_the_right_one_dials(wire, tmp_path):
    isp, ac_end, home, client_end = wire
    ac = AC(isp, ac_end, tmp_path, "--auth", "pap")
    client = Client(home, client_end)

    _, first = client.discover([(po.SERVICE_NAME, b""), (po.HOST_UNIQ, b"1")])
    assert client.lcp()[po.AUTH] == po.PAP.to_bytes(2)
    assert not client.pap(USER, "wrong")
    ac.wait("auth", ok=False, user=USER, method="pap")
    _, ident, _ = client.expect(po.LCP, po.TERM_REQ)
    client.send_ppp(po.LCP, po.control(po.TERM_ACK, ident))
    assert client.discovery(po.PADT).session == first
    ac.wait("terminated", session=first, why="authentication failed")

    assert client.dial("pap")[po.IP_ADDRESS] == socket.inet_aton(PEER)
    ac.wait("auth", ok=True, user=USER, method="pap")
    ac.wait("ipcp-up", peer=PEER)
    assert client.ping(LOCAL) == b"through the tun"


def test_padt_from_the_ac_and_redial(wire, tmp_path):
    isp, ac_end, home, client_end = wire
    ac = AC(isp, ac_end, tmp_path, "--drop-after", "0.3")
    client = Client(home, client_end)

    client.dial("chap")
    first = client.session
    assert client.discovery(po.PADT, timeout=3).session == first  # --drop-after
    ac.wait("padt", session=first, by="ac")
    ac.wait("terminated", session=first, why="dropped by the AC")
    assert isp.run("ping", "-c1", "-W1", PEER, check=False).returncode != 0  # no session, no route

    client.dial("chap")
    second = client.session
    assert second != first
    assert client.ping(LOCAL) == b"through the tun"
    time.sleep(0.5)  # --drop-after drops once
    assert client.ping(LOCAL) == b"through the tun"

    ac.proc.send_signal(signal.SIGUSR1)
    assert client.discovery(po.PADT).session == second
    ac.wait("terminated", session=second, why="dropped by the AC")

    client.dial("chap")  # and hangs up as pppd does: LCP Terminate-Request, then a PADT
    client.send_ppp(po.LCP, po.control(po.TERM_REQ, client.next_id(), b"User request"))
    client.expect(po.LCP, po.TERM_ACK)
    ac.wait("ipcp-down", session=client.session)
    client.send_discovery(po.PADT, [], session=client.session)
    ac.wait("padt", session=client.session, by="peer")
    ac.wait("terminated", session=client.session, why="PADT from the peer")
    assert ac.proc.poll() is None


def test_a_silent_client_is_dropped(wire, tmp_path):
    isp, ac_end, home, client_end = wire
    ac = AC(isp, ac_end, tmp_path, "--echo-interval", "0.1")
    client = Client(home, client_end)
    client.dial("chap")
    client.answers_echoes = False  # as a guest that lost power
    assert client.discovery(po.PADT, timeout=3).session == client.session
    ac.wait("terminated", session=client.session, why="no LCP echo reply")


def test_junk_and_other_services_are_dropped(wire, tmp_path):
    isp, ac_end, home, client_end = wire
    ac = AC(isp, ac_end, tmp_path, "--service", "internet")
    client = Client(home, client_end)

    def disc(code: int, payload: bytes, session: int = 0) -> bytes:
        return po.Frame(po.BROADCAST, client.mac, po.ETH_DISCOVERY, code, session, payload).encode()

    junk = [
        po.BROADCAST + client.mac + b"\x88\x63\x11\x09",  # shorter than a PPPoE header
        disc(po.PADI, b""),  # no Service-Name
        disc(po.PADI, b"")[:18] + b"\x00\x40",  # a length past the frame
        disc(po.PADI, struct.pack("!HH", po.SERVICE_NAME, 300) + b"x" * 300),  # a tag too long
        disc(po.PADI, struct.pack("!HH", po.SERVICE_NAME, 40) + b"x" * 4),  # a tag past the payload
        disc(po.PADI, po.encode_tags([(po.HOST_UNIQ, b"h")] * 17 + [(po.SERVICE_NAME, b"")])),  # too many tags
        disc(po.PADI, po.encode_tags([(po.SERVICE_NAME, b""), (po.SERVICE_NAME, b"")])),  # two Service-Names
        disc(po.PADI, po.encode_tags([(po.SERVICE_NAME, b"video")])),  # a service not offered
        po.Frame(po.BROADCAST, client.mac, po.ETH_SESSION, 0, 0x1234, b"\xc0\x21\x01").encode(),  # no session
    ]
    for frame in junk:
        client.sock.send(frame)
    with pytest.raises(AssertionError):
        client.discovery(po.PADO, timeout=0.5)

    client.ac = ac.mac
    client.send_discovery(po.PADR, [(po.SERVICE_NAME, b"video"), (po.HOST_UNIQ, b"u")])
    refused = client.discovery(po.PADS)
    assert refused.session == 0 and po.SERVICE_NAME_ERROR in dict(po.decode_tags(refused.payload))

    _, session = client.discover([(po.SERVICE_NAME, b"internet")])
    bad = [b"\xc0", b"\xc0\x21\x01\x01\x00\x02",  # no protocol; a length under 4
           b"\xc0\x21\x01\x01\x00\x06\x01\x00",  # an option of length 0
           b"\x80\x21\x01\x01\x00\x0a\x03\x06\x00\x00\x00\x00",  # po.IPCP before authentication
           b"\xc2\x23\x02\x01\x00\x05\xff"]  # a po.CHAP value longer than the packet
    for info in bad:  # before po.LCP is up, and after
        client.sock.send(po.Frame(client.ac, client.mac, po.ETH_SESSION, 0, session, info).encode())
    client.lcp()
    for info in bad:
        client.sock.send(po.Frame(client.ac, client.mac, po.ETH_SESSION, 0, session, info).encode())
    client.send_ppp(po.LCP, po.control(14, client.next_id(), b"?"))
    assert client.expect(po.LCP, po.CODE_REJ)[2][:1] == b"\x0e"
    assert client.chap(USER, PASSWORD)
    assert client.ipcp()[0][po.IP_ADDRESS] == socket.inet_aton(PEER)
    assert client.ping(LOCAL) == b"through the tun"
    assert ac.proc.poll() is None
