#!/usr/bin/env python3
"""A PPPoE access concentrator in user space, for tests: the ISP's side of a PPPoE WAN.

The host kernel has no PPP (no /dev/ppp, CONFIG_PPP unset), so neither pppd nor pppoe-server runs
here; a QEMU guest's pppd does. This plays its ISP, inside a network namespace:

    guest: pppd (plugin pppoe.so) on its WAN NIC
      │ Ethernet: PPPoE discovery (0x8863) and session (0x8864) frames
    tap/veth (--iface) ── pppoelab (an AF_PACKET socket)        namespace "isp"
                             │ IPv4 of the session
                          tun --tun (--local-ip, /32 route to --peer-ip) ── servers, iperf3, ping

Discovery (RFC 2516): a PADI gets a PADO (AC-Name, the Service-Name asked for, Host-Uniq and
Relay-Session-Id back unchanged), a PADR a PADS with a fresh session id, a PADT ends the session
either way. The session: LCP (RFC 1661) asks for MRU 1492, a magic number and PAP (RFC 1334) or
CHAP-MD5 (RFC 1994), checked against one user; IPCP (RFC 1332, DNS: RFC 1877) Naks the peer's
0.0.0.0 with --peer-ip and the --dns servers and rejects what it does not know; then IPv4 flows
between the session and the tun. Other protocols (IPv6CP, CCP, ...) get an LCP Protocol-Reject.
One session at a time: a new PADR replaces the live one (with a PADT to it).

Every step is a JSON line in --events, for a test to wait on: ready, padi, pado, padr, pads,
lcp-up, auth (ok, user), ipcp-up (peer, local, dns), ipcp-down, protocol-reject, padt (by: peer or
ac), terminated (why). SIGTERM ends a live session (LCP Terminate-Request and PADT), removes the
tun and exits 0; SIGUSR1 (or --drop-after) sends a PADT and keeps serving, so the client redials.

    ip netns exec isp python3 tests/pppoelab.py --iface veth0 --auth chap --user u --password p \\
        --local-ip 100.64.7.1 --peer-ip 100.64.7.2 --dns 100.64.7.53 --events /tmp/pppoe.jsonl

Its own test (tests/net/test_pppoelab.py) dials in with a scripted client built on the codec
below (Frame, tags, control packets, options).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

ETH_DISCOVERY, ETH_SESSION, ETH_P_ALL = 0x8863, 0x8864, 0x0003
PADI, PADO, PADR, PADS, PADT = 0x09, 0x07, 0x19, 0x65, 0xA7
SERVICE_NAME, AC_NAME, HOST_UNIQ, RELAY_SESSION_ID = 0x0101, 0x0102, 0x0103, 0x0110
SERVICE_NAME_ERROR, GENERIC_ERROR = 0x0201, 0x0203
ECHOED_TAGS = (HOST_UNIQ, RELAY_SESSION_ID)  # a PADO and a PADS carry them back unchanged
MAX_TAG, MAX_TAGS = 255, 16  # a discovery frame with a longer tag or more tags is dropped
BROADCAST = b"\xff" * 6
PACKET_OUTGOING = 4  # AF_PACKET's pkttype of the frames we send ourselves
# The link is down, its queue full, or the frame too big for it (an IP packet over 1492 bytes from the
# tun: an access concentrator does not fragment, which is why a PPPoE router clamps TCP's MSS): lost.
LOST = (errno.ENETDOWN, errno.ENOBUFS, errno.EMSGSIZE)

LCP, PAP, CHAP, IPCP, IPV4 = 0xC021, 0xC023, 0xC223, 0x8021, 0x0021
PROTO_NAME = {LCP: "lcp", IPCP: "ipcp"}
CONF_REQ, CONF_ACK, CONF_NAK, CONF_REJ, TERM_REQ, TERM_ACK, CODE_REJ, PROTO_REJ = range(1, 9)
ECHO_REQ, ECHO_REPLY, DISCARD_REQ = 9, 10, 11
PAP_REQ, PAP_ACK, PAP_NAK = 1, 2, 3
CHAP_CHALLENGE, CHAP_RESPONSE, CHAP_SUCCESS, CHAP_FAILURE = 1, 2, 3, 4
MRU, AUTH, MAGIC = 1, 3, 5  # LCP options
IP_ADDRESS, DNS1, DNS2 = 3, 129, 131  # IPCP options
AUTH_PROTO = {"pap": PAP, "chap": CHAP}
AUTH_OPTION = {"pap": PAP.to_bytes(2), "chap": CHAP.to_bytes(2) + b"\x05"}  # 5: CHAP with MD5
PPPOE_MRU, MIN_MRU = 1492, 64
RESTART, MAX_CONFIGURE, MAX_TERMINATE, ECHO_FAILURES = 3.0, 10, 2, 4  # RFC 1661's, pppd's
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


@dataclass(frozen=True)
class Frame:
    """A PPPoE frame: Ethernet addresses, stage (discovery or session ethertype), code, session."""

    dst: bytes
    src: bytes
    stage: int
    code: int
    session: int
    payload: bytes

    def encode(self) -> bytes:
        head = struct.pack("!HBBHH", self.stage, 0x11, self.code, self.session, len(self.payload))
        return self.dst + self.src + head + self.payload

    @classmethod
    def decode(cls, data: bytes) -> Frame | None:
        if len(data) < 20:
            return None
        stage, vertype, code, session, length = struct.unpack_from("!HBBHH", data, 12)
        if stage not in (ETH_DISCOVERY, ETH_SESSION) or vertype != 0x11 or 20 + length > len(data):
            return None
        return cls(data[:6], data[6:12], stage, code, session, data[20:20 + length])


def encode_tags(tags: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack("!HH", kind, len(value)) + value for kind, value in tags)


def decode_tags(payload: bytes) -> list[tuple[int, bytes]] | None:
    """A discovery payload's tags up to End-Of-List, or None when one overruns or is too long."""
    tags, i = [], 0
    while i + 4 <= len(payload):
        kind, n = struct.unpack_from("!HH", payload, i)
        if kind == 0:
            break
        if n > MAX_TAG or i + 4 + n > len(payload) or len(tags) == MAX_TAGS:
            return None
        tags.append((kind, payload[i + 4:i + 4 + n]))
        i += 4 + n
    return tags


def control(code: int, ident: int, data: bytes = b"") -> bytes:
    """An LCP/IPCP/PAP/CHAP packet: code, identifier, length, data."""
    return struct.pack("!BBH", code, ident, 4 + len(data)) + data


def decode_control(info: bytes) -> tuple[int, int, bytes] | None:
    if len(info) < 4:
        return None
    code, ident, length = struct.unpack_from("!BBH", info)
    return None if length < 4 or length > len(info) else (code, ident, info[4:length])


def encode_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes([kind, 2 + len(value)]) + value for kind, value in options)


def decode_options(data: bytes) -> list[tuple[int, bytes]] | None:
    options, i = [], 0
    while i < len(data):
        if i + 2 > len(data) or data[i + 1] < 2 or i + data[i + 1] > len(data):
            return None
        options.append((data[i], data[i + 2:i + data[i + 1]]))
        i += data[i + 1]
    return options


def split_pap(data: bytes) -> tuple[bytes, bytes] | None:
    """A PAP Authenticate-Request's (peer id, password)."""
    if not data or 1 + data[0] >= len(data):
        return None
    n = data[0]
    m = data[1 + n]
    return (data[1:1 + n], data[2 + n:2 + n + m]) if 2 + n + m <= len(data) else None


def chap_md5(ident: int, secret: bytes, challenge: bytes) -> bytes:
    return hashlib.md5(bytes([ident]) + secret + challenge).digest()  # noqa: S324 (RFC 1994)


def ip(*argv: str) -> None:
    r = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(argv)}: {r.stderr.strip()}")


class Tun:
    """The namespace's end of the session: a tun with the local address and a /32 to the peer.

    Up while IPCP is open, down otherwise (the kernel then has no route to the peer); closing
    its descriptor removes it.
    """

    def __init__(self, name: str, local: str, peer: str) -> None:
        self.name = name
        self.fd = os.open("/dev/net/tun", os.O_RDWR)
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        except OSError as e:
            os.close(self.fd)
            raise RuntimeError(f"tun {name}: {e.strerror}") from e
        try:
            ip("addr", "add", local, "peer", f"{peer}/32", "dev", name)
            ip("link", "set", name, "mtu", str(PPPOE_MRU))
        except RuntimeError:
            os.close(self.fd)
            raise

    def up(self, on: bool) -> None:
        ip("link", "set", self.name, "up" if on else "down")

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Session:
    """One PPPoE session and its PPP link: phase lcp → auth → network, terminating at the end."""

    id: int
    mac: bytes
    magic: int
    ours: dict[int, dict[int, bytes]]  # protocol → the options we ask for
    phase: str = "lcp"
    sent: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # our last Configure-Request
    acked: set[tuple[int, str]] = field(default_factory=set)  # (protocol, "ours" | "theirs")
    opened: set[int] = field(default_factory=set)
    heard: set[int] = field(default_factory=set)  # protocols the peer sent a Configure-Request for
    challenge: tuple[int, bytes] | None = None
    echo_missed: int = 0
    why: str = ""


class Concentrator:
    """The AC: one loop over the packet socket, the tun, signals and the live session's timers."""

    def __init__(self, args: argparse.Namespace, sock: socket.socket, tun: Tun, events: TextIO):
        self.args, self.sock, self.tun, self.events = args, sock, tun, events
        self.mac: bytes = sock.getsockname()[4]
        self.s: Session | None = None
        self.timers: dict[str, tuple[float, Callable[[], None]]] = {}  # all the live session's
        self.ident = self.last_session = 0
        self.drop_after: float | None = args.drop_after

    # -- the loop, timers, output

    def serve(self) -> None:
        """Until SIGTERM/SIGINT: frames, tun packets, timers; SIGUSR1 drops the live session."""
        wake, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, lambda *_: None)  # the wakeup fd tells the loop
        self.event("ready", mac=self.mac.hex(":"), iface=self.args.iface, tun=self.tun.name)
        while True:
            due = min((when for when, _ in self.timers.values()), default=None)
            timeout = None if due is None else max(0.0, due - time.monotonic())
            readable, _, _ = select.select([self.sock, self.tun.fd, wake], [], [], timeout)
            if wake in readable:
                signals = wake.recv(64)
                if signal.SIGUSR1 in signals and self.s:
                    self.end("dropped by the AC")
                if {signal.SIGTERM, signal.SIGINT} & set(signals):
                    self.stop()
                    return
            if self.sock in readable:
                self.on_packet()
            if self.tun.fd in readable:
                self.on_tun()
            self.run_timers()

    def at(self, name: str, delay: float, action: Callable[[], None]) -> None:
        self.timers[name] = (time.monotonic() + delay, action)

    def run_timers(self) -> None:
        now = time.monotonic()
        for name, entry in list(self.timers.items()):
            if entry[0] <= now and self.timers.get(name) is entry:  # an earlier one may end it all
                del self.timers[name]
                entry[1]()

    def retry(self, name: str, proto: int, packet: bytes, tries: int, give_up: Callable[[], None]) -> None:
        """Send, and again every RESTART seconds until answered (the caller drops the timer)."""
        self.send_ppp(proto, packet)
        again = (lambda: self.retry(name, proto, packet, tries - 1, give_up)) if tries > 1 else give_up
        self.at(name, RESTART, again)

    def event(self, event: str, **fields) -> None:
        self.events.write(json.dumps({"event": event, **fields}) + "\n")
        self.events.flush()

    def next_id(self) -> int:
        self.ident = (self.ident + 1) % 256
        return self.ident

    def transmit(self, frame: Frame) -> None:
        try:
            self.sock.send(frame.encode())
        except OSError as e:
            if e.errno not in LOST:
                raise

    def send_discovery(self, dst: bytes, code: int, session: int, tags: Iterable[tuple[int, bytes]]) -> None:
        self.transmit(Frame(dst, self.mac, ETH_DISCOVERY, code, session, encode_tags(tags)))

    def send_ppp(self, proto: int, info: bytes) -> None:
        s = self.s
        self.transmit(Frame(s.mac, self.mac, ETH_SESSION, 0, s.id, proto.to_bytes(2) + info))

    # -- frames in

    def on_packet(self) -> None:
        try:
            data, addr = self.sock.recvfrom(65535)
        except OSError as e:
            if e.errno == errno.ENETDOWN:  # the link is (or was) down: frames come again with it
                return
            raise
        f = Frame.decode(data)
        if addr[2] == PACKET_OUTGOING or f is None or f.src == self.mac or f.src[0] & 1:
            return
        s = self.s
        if f.stage == ETH_DISCOVERY:
            self.on_discovery(f)
        elif s and (f.dst, f.src, f.session, f.code) == (self.mac, s.mac, s.id, 0) and len(f.payload) >= 2:
            self.on_session(int.from_bytes(f.payload[:2]), f.payload[2:])

    def on_tun(self) -> None:
        packet = os.read(self.tun.fd, 65535)
        if self.s and IPCP in self.s.opened:
            self.send_ppp(IPV4, packet)

    # -- discovery (RFC 2516)

    def on_discovery(self, f: Frame) -> None:
        tags = decode_tags(f.payload)
        s = self.s
        if tags is None:
            return
        if f.code == PADI and f.session == 0 and f.dst in (BROADCAST, self.mac):
            self.offer(f, tags)
        elif f.code == PADR and f.session == 0 and f.dst == self.mac:
            self.confirm(f, tags)
        elif f.code == PADT and f.dst == self.mac and s and (f.src, f.session) == (s.mac, s.id):
            self.event("padt", session=s.id, by="peer")
            self.end("PADT from the peer", padt=False)

    def service(self, tags: list[tuple[int, bytes]]) -> bytes | None:
        """The one Service-Name asked for when this AC serves it (empty: any), else None."""
        names = [value for kind, value in tags if kind == SERVICE_NAME]
        if len(names) != 1:
            return None
        ours = self.args.service.encode()
        return names[0] if not names[0] or not ours or names[0] == ours else None

    @staticmethod
    def echoed(tags: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        first = dict(reversed(tags))
        return [(kind, first[kind]) for kind in ECHOED_TAGS if kind in first]

    def offer(self, f: Frame, tags: list[tuple[int, bytes]]) -> None:
        service = self.service(tags)
        self.event("padi", mac=f.src.hex(":"), served=service is not None)
        if service is not None:  # RFC 2516: no PADO for a service we do not offer
            self.send_discovery(f.src, PADO, 0, [(AC_NAME, self.args.ac_name.encode()),
                                                 (SERVICE_NAME, service), *self.echoed(tags)])
            self.event("pado", mac=f.src.hex(":"))

    def confirm(self, f: Frame, tags: list[tuple[int, bytes]]) -> None:
        service = self.service(tags)
        self.event("padr", mac=f.src.hex(":"), served=service is not None)
        if service is None:
            self.send_discovery(f.src, PADS, 0, [(SERVICE_NAME_ERROR, b""), *self.echoed(tags)])
            return
        if self.s:
            self.end("replaced by a new session")
        sid = self.last_session
        while sid == self.last_session:
            sid = 1 + secrets.randbelow(0xFFFE)  # 0 and 0xffff are reserved
        self.last_session, magic = sid, secrets.randbits(32) | 1
        self.s = Session(sid, f.src, magic, ours={
            LCP: {MRU: PPPOE_MRU.to_bytes(2), AUTH: AUTH_OPTION[self.args.auth], MAGIC: magic.to_bytes(4)},
            IPCP: {IP_ADDRESS: self.args.local_ip.packed}})
        self.send_discovery(f.src, PADS, sid, [(SERVICE_NAME, service), *self.echoed(tags)])
        self.event("pads", session=sid, mac=f.src.hex(":"))
        self.configure(LCP)

    def end(self, why: str, padt: bool = True) -> None:
        self.network_down()
        s, self.s = self.s, None
        self.timers.clear()
        if padt:
            self.send_discovery(s.mac, PADT, s.id, [(GENERIC_ERROR, why.encode()[:MAX_TAG])])
            self.event("padt", session=s.id, by="ac")
        self.event("terminated", session=s.id, why=why)

    def stop(self) -> None:
        if self.s:
            self.send_ppp(LCP, control(TERM_REQ, self.next_id(), b"AC stopped"))
            self.end("AC stopped")

    # -- the session: LCP, authentication, IPCP, IPv4

    def on_session(self, proto: int, info: bytes) -> None:
        s = self.s
        if proto == LCP:
            self.on_control(LCP, info)
        elif LCP not in s.opened or s.phase == "terminating":
            return  # RFC 1661: nothing but LCP until the link is up
        elif proto in (PAP, CHAP):
            if proto == AUTH_PROTO[self.args.auth] and s.phase in ("auth", "network"):
                self.on_auth(proto, info)
        elif proto == IPCP:
            if s.phase == "network":
                self.on_control(IPCP, info)
        elif proto == IPV4:
            if IPCP in s.opened:
                try:
                    os.write(self.tun.fd, info)
                except OSError:
                    return  # not an IPv4 packet the kernel takes: dropped, as a router would
        else:
            self.send_ppp(LCP, control(PROTO_REJ, self.next_id(), proto.to_bytes(2) + info[:PPPOE_MRU - 8]))
            self.event("protocol-reject", session=s.id, protocol=f"0x{proto:04x}")

    def on_control(self, proto: int, info: bytes) -> None:
        """LCP's and IPCP's packets (RFC 1661's automaton, as far as one server side needs it)."""
        s, parsed = self.s, decode_control(info)
        if parsed is None:
            return
        code, ident, data = parsed
        if s.phase == "terminating" and code not in (TERM_REQ, TERM_ACK):
            return
        if code == CONF_REQ:
            self.on_configure_request(proto, ident, data)
        elif code in (CONF_ACK, CONF_NAK, CONF_REJ):
            if proto in s.opened or s.sent.get(proto, (None,))[0] != ident:
                return
            if code != CONF_ACK:
                self.on_nak_or_reject(proto, code, data)
            elif data == s.sent[proto][1]:
                s.acked.add((proto, "ours"))
                self.timers.pop(PROTO_NAME[proto], None)
                self.maybe_open(proto)
        elif code == TERM_REQ:
            self.send_ppp(proto, control(TERM_ACK, ident))
            self.on_peer_terminate(proto)
        elif code == TERM_ACK:
            if proto == LCP and s.phase == "terminating":
                self.end(s.why)
        elif proto == LCP and code == ECHO_REQ:
            if LCP in s.opened and len(data) >= 4:
                self.send_ppp(LCP, control(ECHO_REPLY, ident, s.magic.to_bytes(4) + data[4:]))
        elif proto == LCP and code == ECHO_REPLY:
            s.echo_missed = 0
        elif code not in ((CODE_REJ, PROTO_REJ, DISCARD_REQ) if proto == LCP else (CODE_REJ,)):
            self.send_ppp(proto, control(CODE_REJ, self.next_id(), info[:PPPOE_MRU - 8]))

    def configure(self, proto: int) -> None:
        s, name = self.s, PROTO_NAME[proto]
        data, ident = encode_options(s.ours[proto].items()), self.next_id()
        s.sent[proto] = (ident, data)
        s.acked.discard((proto, "ours"))
        self.retry(name, proto, control(CONF_REQ, ident, data), MAX_CONFIGURE,
                   lambda: self.terminate(f"{name}: no answer to our Configure-Request"))

    def on_configure_request(self, proto: int, ident: int, data: bytes) -> None:
        s, options = self.s, decode_options(data)
        if options is None:
            return
        if proto in s.opened:  # the peer renegotiates: this layer and those above go down
            self.network_down()
            for p in (LCP, IPCP) if proto == LCP else (IPCP,):
                s.opened.discard(p)
                s.acked -= {(p, "ours"), (p, "theirs")}
                self.timers.pop(PROTO_NAME[p], None)
            if proto == LCP:
                s.phase = "lcp"
                for name in ("auth", "echo", "drop"):
                    self.timers.pop(name, None)
        judge = self.lcp_option if proto == LCP else self.ipcp_option
        answers: dict[int, list[tuple[int, bytes]]] = {CONF_ACK: [], CONF_NAK: [], CONF_REJ: []}
        for kind, value in options:
            verdict, answer = judge(kind, value)
            answers[verdict].append((kind, answer))
        code = CONF_REJ if answers[CONF_REJ] else CONF_NAK if answers[CONF_NAK] else CONF_ACK
        name = PROTO_NAME[proto]
        if (proto, "ours") not in s.acked and name not in self.timers:
            self.configure(proto)
        elif (proto, "ours") not in s.acked and proto not in s.heard:
            self.timers.pop(name)[1]()  # ours again now, before our answer: the first may have come too
            # early for the peer (right after the PADS, before pppd's kernel session was connected)
        s.heard.add(proto)
        self.send_ppp(proto, control(code, ident, data if code == CONF_ACK else encode_options(answers[code])))
        if code == CONF_ACK:
            s.acked.add((proto, "theirs"))
            self.maybe_open(proto)
        else:
            s.acked.discard((proto, "theirs"))

    def lcp_option(self, kind: int, value: bytes) -> tuple[int, bytes]:
        if kind == MRU and len(value) == 2:
            fits = MIN_MRU <= int.from_bytes(value) <= PPPOE_MRU
            return (CONF_ACK, value) if fits else (CONF_NAK, PPPOE_MRU.to_bytes(2))
        if kind == MAGIC and len(value) == 4:  # ours back: a looped-back line, or a collision
            fresh = int.from_bytes(value) not in (0, self.s.magic)
            return (CONF_ACK, value) if fresh else (CONF_NAK, secrets.token_bytes(4))
        return CONF_REJ, value  # ACCM, PFC, ACFC (RFC 2516: not on PPPoE), auth for us, ...

    def ipcp_option(self, kind: int, value: bytes) -> tuple[int, bytes]:
        want = {IP_ADDRESS: self.args.peer_ip.packed}
        want |= {opt: dns.packed for opt, dns in zip((DNS1, DNS2), self.args.dns, strict=False)}
        if kind not in want or len(value) != 4:
            return CONF_REJ, value  # VJ compression, NBNS, a second DNS we do not have, ...
        return (CONF_ACK, value) if value == want[kind] else (CONF_NAK, want[kind])

    def on_nak_or_reject(self, proto: int, code: int, data: bytes) -> None:
        s, options = self.s, decode_options(data)
        if options is None:
            return
        ours = s.ours[proto]
        for kind, value in options:
            if kind not in ours:
                continue
            if proto == LCP and kind == AUTH:
                self.terminate(f"the peer refused {self.args.auth.upper()}")
                return
            if code == CONF_REJ:
                del ours[kind]
            elif proto == LCP and kind == MAGIC:
                s.magic = secrets.randbits(32) | 1
                ours[MAGIC] = s.magic.to_bytes(4)
            elif proto == LCP and kind == MRU and len(value) == 2 and MIN_MRU <= int.from_bytes(value) <= PPPOE_MRU:
                ours[MRU] = value
        if proto == LCP and MAGIC not in ours:
            s.magic = 0
        self.configure(proto)

    def maybe_open(self, proto: int) -> None:
        s = self.s
        if proto in s.opened or not {(proto, "ours"), (proto, "theirs")} <= s.acked:
            return
        s.opened.add(proto)
        if proto == IPCP:
            self.network_up()
            return
        s.phase = "auth"
        self.event("lcp-up", session=s.id)
        if self.args.echo_interval:
            self.at("echo", self.args.echo_interval, self.echo)
        if self.args.auth == "chap":
            ident, value = self.next_id(), secrets.token_bytes(16)
            s.challenge = (ident, value)
            packet = control(CHAP_CHALLENGE, ident, bytes([len(value)]) + value + self.args.ac_name.encode())
            self.retry("auth", CHAP, packet, MAX_CONFIGURE, lambda: self.terminate("no CHAP response"))

    def on_auth(self, proto: int, info: bytes) -> None:
        """PAP's Authenticate-Request or CHAP's Response; answered again if repeated later."""
        s, parsed = self.s, decode_control(info)
        user, password = self.args.user.encode(), self.args.password.encode()
        if parsed is None:
            return
        code, ident, data = parsed
        if proto == PAP and code == PAP_REQ and (creds := split_pap(data)):
            peer = creds[0]
            ok = peer == user and hmac.compare_digest(creds[1], password)
            message = b"Login ok" if ok else b"Login incorrect"
            self.send_ppp(PAP, control(PAP_ACK if ok else PAP_NAK, ident, bytes([len(message)]) + message))
        elif proto == CHAP and code == CHAP_RESPONSE and s.challenge and ident == s.challenge[0] \
                and data and 1 + data[0] <= len(data):
            peer, value = data[1 + data[0]:], data[1:1 + data[0]]
            ok = peer == user and hmac.compare_digest(value, chap_md5(ident, password, s.challenge[1]))
            self.timers.pop("auth", None)
            self.send_ppp(CHAP, control(CHAP_SUCCESS if ok else CHAP_FAILURE, ident,
                                        b"Welcome" if ok else b"Authentication failed"))
        else:
            return
        if s.phase == "auth":
            self.event("auth", session=s.id, ok=ok, user=peer.decode(errors="replace"), method=self.args.auth)
            if ok:
                s.phase = "network"
                self.configure(IPCP)
            else:
                self.terminate("authentication failed")

    def network_up(self) -> None:
        self.tun.up(True)
        args = self.args
        self.event("ipcp-up", session=self.s.id, peer=str(args.peer_ip), local=str(args.local_ip),
                   dns=[str(d) for d in args.dns])
        if self.drop_after is not None:
            self.at("drop", self.drop_after, self.drop_once)

    def drop_once(self) -> None:
        self.drop_after = None
        self.end("dropped by the AC")

    def network_down(self) -> None:
        if self.s and IPCP in self.s.opened:
            self.s.opened.discard(IPCP)
            self.tun.up(False)
            self.event("ipcp-down", session=self.s.id)

    def echo(self) -> None:
        s = self.s
        if s.echo_missed >= ECHO_FAILURES:
            self.end("no LCP echo reply")
            return
        s.echo_missed += 1
        self.send_ppp(LCP, control(ECHO_REQ, self.next_id(), s.magic.to_bytes(4)))
        self.at("echo", self.args.echo_interval, self.echo)

    def terminate(self, why: str) -> None:
        """LCP Terminate-Request (sent twice at most), then a PADT ends the session."""
        s = self.s
        self.network_down()
        s.phase, s.why = "terminating", why
        self.timers.clear()
        self.retry("terminate", LCP, control(TERM_REQ, self.next_id(), why.encode()), MAX_TERMINATE,
                   lambda: self.end(why))

    def on_peer_terminate(self, proto: int) -> None:
        s = self.s
        if proto == IPCP:
            self.network_down()
            s.acked -= {(IPCP, "ours"), (IPCP, "theirs")}
        elif s.phase != "terminating":  # wait for its PADT, a restart time at most
            self.network_down()
            s.phase, s.why = "terminating", "LCP terminated by the peer"
            self.timers.clear()
            self.at("linger", RESTART, lambda: self.end(s.why))


class Running:
    """This script started in a namespace (`ns.popen`, tests/netlab.py), and its events, read in
    order (each one once): what a test holds while a client dials in."""

    def __init__(self, ns, events: Path, *options: str) -> None:
        self.path, self.seen = events, 0
        self.proc = ns.popen(sys.executable, __file__, "--events", str(events), *options,
                             stderr=subprocess.PIPE, text=True)
        self.ready = self.wait("ready")

    def wait(self, event: str, timeout: float = 5, **match) -> dict:
        deadline, lines = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            for i, line in enumerate(lines[self.seen:], self.seen):
                e = json.loads(line)
                if e["event"] == event and match.items() <= e.items():
                    self.seen = i + 1
                    return e
            if self.proc.poll() is not None:
                raise AssertionError(f"pppoelab exited {self.proc.returncode}: {self.proc.stderr.read()}")
            time.sleep(0.02)
        raise AssertionError(f"no {event} {match} in {timeout} s: {lines[self.seen:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iface", required=True, help="where the clients' PADIs arrive (tap, veth)")
    p.add_argument("--auth", choices=sorted(AUTH_PROTO), default="chap", help="what LCP asks the peer for")
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--local-ip", type=ipaddress.IPv4Address, required=True, help="the AC's end (on the tun)")
    p.add_argument("--peer-ip", type=ipaddress.IPv4Address, required=True, help="what IPCP hands the client")
    p.add_argument("--dns", type=ipaddress.IPv4Address, action="append", default=[],
                   help="a DNS server for IPCP (options 129, 131); twice at most")
    p.add_argument("--tun", default="isp-ppp0", help="the tun device's name (default: %(default)s)")
    p.add_argument("--ac-name", default="idlewire-lab", help="the AC-Name tag (default: %(default)s)")
    p.add_argument("--service", default="", help="the one Service-Name served (default: any)")
    p.add_argument("--events", help="a file to append JSON lines to, one per event")
    p.add_argument("--echo-interval", type=float, default=10.0,
                   help="LCP Echo-Request every N s, the session ends after 4 unanswered; 0: none")
    p.add_argument("--drop-after", type=float,
                   help="send a PADT N s after the first session's IPCP is up (once; SIGUSR1: any time)")
    args = p.parse_args(argv)
    if len(args.dns) > 2:
        p.error("--dns: two at most")
    if not 0 < len(args.tun.encode()) < 16:
        p.error("--tun: 1 to 15 bytes")
    if len(args.ac_name.encode()) > MAX_TAG or len(args.service.encode()) > MAX_TAG:
        p.error(f"--ac-name, --service: {MAX_TAG} bytes at most")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.bind((args.iface, 0))
        except OSError as e:
            raise RuntimeError(f"--iface {args.iface}: {e.strerror}") from e
        tun = Tun(args.tun, str(args.local_ip), str(args.peer_ip))
        try:
            with open(args.events or os.devnull, "a") as events:
                Concentrator(args, sock, tun, events).serve()
        finally:
            tun.close()
    except (OSError, RuntimeError) as e:
        print(f"pppoelab: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
