"""Traffic shaping: sell only the idle part of the owner's line (HTB trees driven through `tc -batch`).

Design
------
A buyer's packets cross the node twice: encrypted (WireGuard UDP on the WAN) and in clear (on the
tunnel interface, then masqueraded out of the WAN). Two kinds of trees use that:

1. **Line trees** protect the owner. One on the WAN egress (the line's upload) and one on the
   egress of an IFB named after the WAN (``ifb4eth0``) to which the WAN's ingress is mirrored (the
   line's download; every tree has its own IFB, never shared)::

       1:  htb default 10
       1:1  line rate = ceil = line rate, explicit per-packet overhead (sqm habit)
       ├─ 1:10 owner  prio 0  rate = line - floor   ceil = line      (everything not buyers')
       └─ 1:20 shared prio 1  rate = floor          ceil = the buyers' cap in wire bytes

   Buyer traffic is recognised with u32 only (this kernel has no cls_fw/flower): WireGuard UDP by
   its port (egress: source port = tunnel port; ingress IFB: destination port) and the clear
   traffic of buyers by the masquerade source-port block that the firewall role reserves for
   buyers (``buyer_nat_ports``, an aligned 2^n block so one u32 mask matches it; egress: source
   port, ingress: destination port). The owner class has priority and may take the whole line;
   buyers keep their floor. A buyer's download also spends the line's upload (it is sent on,
   encrypted), which is why the shared ceiling is the sum of both caps, bounded by the line.

2. **Tunnel trees** enforce the sold caps exactly and make sessions fair. On the tunnel
   interface's egress (what buyers download) and on ``ifb4<tunnel>`` fed by its ingress (what
   buyers upload), in IP bytes, i.e. what the ledger meters::

       1:  htb default 2
       1:1   rate = ceil = cap (the scheduled cap of that direction)
       ├─ 1:2     unregistered traffic: lowest priority, small guarantee
       └─ 1:1xx   one leaf per session: rate = cap / max_sessions, ceil = per-session cap

   Leaves are matched by the session's tunnel address (egress: destination, ingress: source), the
   only place where sessions are told apart by something stable (on the WAN all share one UDP port
   and their endpoints roam). Equal rates and quanta make HTB share the spare equally, so a join or
   leave touches only that session's class, qdisc and filter.

Leaf qdiscs are fq_codel, else cake, else bfifo sized to ~10 ms at the class rate (so the owner's
own pings do not wait behind his bulk download); the choice is probed on a throwaway IFB before
touching the real link, kept in the state and reported by ``show``.

HTB burst and cburst are given explicitly (1 ms at the rate, at least two wire-size packets),
never left to tc's default, which at high rates rounds to less than one packet and silently costs
throughput (the trap tcconfig users hit); quantum is given explicitly too (no r2q warnings).

Every change is a diff between the desired tree and what is live plus what this module recorded
(``/run/idlewire/shaping.json``; tmpfs, like the tc tree itself), applied as one ``tc -batch``:
``add`` what is missing, ``change`` classes whose parameters moved, replace leaf qdiscs and filters
that moved, delete what is no longer wanted. Nothing is torn down on a session join/leave or a cap
change, so open connections keep flowing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import threading
from typing import NamedTuple

from . import run
from .keys import write_atomic
from .policy import SHAPING_STATE_PATH as STATE_PATH
from .policy import Firewall, Shaping
from .record import Record

WG_OVERHEAD = 60 + 16  # outer IPv4 20 + UDP 8 + WireGuard 32, + up to 15 bytes of padding
ETH_HEADER = 14
MIN_RATE = 8000  # bit/s; HTB needs a positive rate
LEAF_PREFERENCE = ("fq_codel", "cake", "bfifo")
FIRST_SESSION_MINOR = 0x100
# bfifo fallback queue lengths: short on the line (the owner's pings wait behind his own bulk
# traffic), longer for buyers (a tunnel RTT of several ms needs a queue of about one BDP).
LINE_QUEUE_MS = 10
TUNNEL_QUEUE_MS = 100
# HTB burst/cburst: this long at the class rate (and at least two packets). Short on the line (the
# owner's latency); longer in the tunnel trees, so that a late timer or a busy CPU (wireguard-go
# shares it) does not lose tokens and the buyer still gets the whole cap.
LINE_BURST_US = 1000
TUNNEL_BURST_US = 10000


class TcError(run.CommandError):
    """tc or ip refused a command or did not answer (killed after run.TIMEOUT); one line with tc's own words."""


def ifb_name(dev: str) -> str:
    """The IFB that carries ``dev``'s ingress: ifb4<dev>, or a stable hash when that is too long."""
    name = f"ifb4{dev}"
    return name if len(name) <= 15 else "ifb4" + hashlib.sha1(dev.encode()).hexdigest()[:11]  # noqa: S324


def htb_sizes(rate: int, ceil: int, packet: int, burst_us: int = LINE_BURST_US) -> dict[str, int]:
    """Explicit burst, cburst and quantum (bytes) for an HTB class: burst_us at the rate, >= 2 packets."""
    return {
        "burst": max(2 * packet, rate * burst_us // 8_000_000),
        "cburst": max(2 * packet, ceil * burst_us // 8_000_000),
        "quantum": max(packet, min(rate // 8 // 1000, 60000)),
    }


def leaf_spec(kind: str, ceil: int, packet: int, ms: int = 10) -> str:
    """The leaf qdisc of a class that may run at ``ceil``; bfifo holds ``ms`` at that rate.

    bfifo counts GRO/GSO aggregates (up to 64 KiB) as their full size: it is the fallback for
    kernels without fq_codel and cake (which split or account aggregates themselves).
    """
    if kind == "fq_codel":
        return "fq_codel"
    if kind == "cake":
        return "cake unlimited besteffort"
    return f"bfifo limit {max(4 * packet, ceil * ms // 8000)}"


class Session(Record):
    slot: int
    addresses: list[str]


class Obj(NamedTuple):
    """One tc object: ``key`` identifies it on its device, ``spec`` is everything after ``dev X``."""

    dev: str
    kind: str  # qdisc | class | filter
    key: str
    spec: str

    def command(self, verb: str) -> str:
        return f"{self.kind} {verb} dev {self.dev} {self.spec}"


def _htb_class(dev: str, parent: str, classid: str, rate: int, ceil: int, prio: int, overhead: int,
               packet: int, burst_us: int = LINE_BURST_US) -> Obj:
    rate, ceil = max(rate, MIN_RATE), max(ceil, MIN_RATE, rate)
    sz = htb_sizes(rate, ceil, packet, burst_us)
    over = f" overhead {overhead} linklayer ethernet" if overhead else ""
    return Obj(dev, "class", classid,
               f"parent {parent} classid {classid} htb rate {rate}bit ceil {ceil}bit burst {sz['burst']} "
               f"cburst {sz['cburst']} quantum {sz['quantum']} prio {prio}{over}")


def _leaf(dev: str, classid: str, kind: str, ceil: int, packet: int, ms: int) -> Obj:
    minor = classid.split(":")[1]
    return Obj(dev, "qdisc", f"leaf:{classid}",
               f"parent {classid} handle {minor}: {leaf_spec(kind, ceil, packet, ms)}")


def _root(dev: str, default: str) -> Obj:
    return Obj(dev, "qdisc", "root", f"root handle 1: htb default {default}")


def _ingress(dev: str, ifb: str) -> list[Obj]:
    return [Obj(dev, "qdisc", "ingress", "handle ffff: ingress"),
            Obj(dev, "filter", "ffff::1", "parent ffff: protocol all prio 1 u32 match u32 0 0 "
                f"action mirred egress redirect dev {ifb}")]


def _filter(dev: str, pref: int, proto: str, match: str, flowid: str) -> Obj:
    return Obj(dev, "filter", f"1::{pref}", f"parent 1: protocol {proto} prio {pref} u32 {match} flowid {flowid}")


def line_tree(sh: Shaping, fw: Firewall, dev: str, line: int, cap_sum: int, floor: int, leaf: str,
              direction: str) -> list[Obj]:
    """The owner-protecting tree of one line direction (direction: "src" on WAN egress, "dst" on its IFB)."""
    packet = 1500 + ETH_HEADER + sh.overhead
    wire_cap = cap_sum * (sh.tunnel_mtu + WG_OVERHEAD + ETH_HEADER + sh.overhead) // sh.tunnel_mtu
    shared_ceil = min(line, max(wire_cap, floor))
    objs = [
        _root(dev, "10"),
        _htb_class(dev, "1:", "1:1", line, line, 0, sh.overhead, packet),
        _htb_class(dev, "1:1", "1:10", line - floor, line, 0, sh.overhead, packet),
        _htb_class(dev, "1:1", "1:20", floor, shared_ceil, 1, sh.overhead, packet),
        _leaf(dev, "1:10", leaf, line, packet, LINE_QUEUE_MS),
        _leaf(dev, "1:20", leaf, shared_ceil, packet, LINE_QUEUE_MS),
    ]
    port, nat = sh.tunnel_port, f"0x{fw.nat_port_low:04x} 0x{fw.nat_port_mask:04x}"
    d = "sport" if direction == "src" else "dport"
    # u32's "ip sport/dport" are two bytes at a fixed offset whatever the protocol: without the
    # protocol match an ICMP checksum or an ESP SPI in the buyers' port block would put the
    # owner's packet (and the latency source's own echo replies) in the buyers' class
    objs += [
        _filter(dev, 10, "ip", f"match ip protocol 17 0xff match ip {d} {port} 0xffff", "1:20"),
        _filter(dev, 11, "ip", f"match ip protocol 6 0xff match ip {d} {nat}", "1:20"),
        _filter(dev, 12, "ipv6", f"match ip6 protocol 17 0xff match ip6 {d} {port} 0xffff", "1:20"),
        _filter(dev, 13, "ipv6", f"match ip6 protocol 6 0xff match ip6 {d} {nat}", "1:20"),
        _filter(dev, 14, "ip", f"match ip protocol 17 0xff match ip {d} {nat}", "1:20"),
        _filter(dev, 15, "ipv6", f"match ip6 protocol 17 0xff match ip6 {d} {nat}", "1:20"),
    ]
    return objs


def tunnel_tree(sh: Shaping, dev: str, cap: int, session_cap: int, max_sessions: int,
                sessions: dict[str, Session], leaf: str, direction: str) -> list[Obj]:
    """The per-session tree of one buyer direction (direction: "dst" on tunnel egress, "src" on its IFB)."""
    packet = sh.tunnel_mtu
    each_ceil = min(cap, session_cap) if session_cap else cap
    other = max(cap // 100, MIN_RATE)
    objs = [
        _root(dev, "2"),
        _htb_class(dev, "1:", "1:1", cap, cap, 0, 0, packet, TUNNEL_BURST_US),
        _htb_class(dev, "1:1", "1:2", other, cap, 7, 0, packet, TUNNEL_BURST_US),
        _leaf(dev, "1:2", leaf, cap, packet, TUNNEL_QUEUE_MS),
    ]
    for _sid, s in sorted(sessions.items(), key=lambda kv: kv[1].slot):
        classid = f"1:{FIRST_SESSION_MINOR + s.slot:x}"
        rate = max(cap // max_sessions, MIN_RATE)
        objs.append(_htb_class(dev, "1:1", classid, rate, each_ceil, 1, 0, packet, TUNNEL_BURST_US))
        objs.append(_leaf(dev, classid, leaf, each_ceil, packet, TUNNEL_QUEUE_MS))
        for addr in s.addresses:
            v6 = ":" in addr
            pref = (5000 if v6 else 100) + s.slot
            plen = 128 if v6 else 32
            host = addr if "/" in addr else f"{addr}/{plen}"
            proto, field_ = ("ipv6", "ip6") if v6 else ("ip", "ip")
            objs.append(_filter(dev, pref, proto, f"match {field_} {direction} {host}", classid))
    return objs


def _same_default(live: str, spec: str) -> bool:
    """Whether a live HTB root's default ('0x10', from tc -j) is the one in ``spec`` ('… default 10')."""
    m = re.search(r"\bdefault (\S+)", spec)
    try:
        return bool(m) and int(live, 16) == int(m.group(1), 16)
    except ValueError:
        return False


# --- reading what is live -------------------------------------------------------------------------

_CLASS_RE = re.compile(r"^class htb (\S+) (?:parent (\S+)|root)")
_SENT_RE = re.compile(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)")


def parse_classes(text: str) -> dict[str, dict]:
    """``tc -s class show`` text (iproute2 6.1 prints HTB classes as text even with -j)."""
    out: dict[str, dict] = {}
    cur = None
    for line in text.splitlines():
        m = _CLASS_RE.match(line)
        if m:
            cur = {"classid": m[1], "parent": m[2] or "root"}
            for k in ("rate", "ceil", "burst", "cburst", "prio", "leaf"):
                mm = re.search(rf"\b{k} (\S+)", line)
                if mm:
                    cur[k] = mm[1]
            out[m[1]] = cur
            continue
        m = _SENT_RE.search(line)
        if m and cur is not None:
            cur.update(bytes=int(m[1]), packets=int(m[2]), dropped=int(m[3]), overlimits=int(m[4]))
        m = re.search(r"backlog (\S+) (\d+)p", line)
        if m and cur is not None:
            cur["backlog"] = m[1]
    return out


class Shaper:
    """Owns the shaping trees of one node; every method leaves the kernel matching the desired tree.

    ``netns`` runs tc/ip inside that network namespace (tests and bench); ``state_path`` keeps the
    recorded specs, the session slots and the probed leaf qdisc across agent restarts.
    """

    def __init__(self, shaping: Shaping, firewall: Firewall, max_sessions: int, *,
                 state_path: str | os.PathLike = STATE_PATH, netns: str | None = None):
        self.sh, self.fw, self.max_sessions = shaping, firewall, max_sessions
        self.state_path = os.fspath(state_path)
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.lock = threading.RLock()
        self.sessions: dict[str, Session] = {}
        self.cap_up, self.cap_down = shaping.cap_up, shaping.cap_down
        self.leaf: str | None = None
        self.applied: dict[str, str] = {}
        self.last_batch: list[str] = []
        self._root_default: dict[str, str] = {}  # dev → the live HTB root's default class (tc -j)
        self._load()

    # --- state -----------------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            with open(self.state_path) as f:
                st = json.load(f)
        except (FileNotFoundError, ValueError):
            return
        self.sessions = {k: Session(v["slot"], list(v["addresses"])) for k, v in st.get("sessions", {}).items()}
        self.cap_up = st.get("cap_up", self.cap_up)
        self.cap_down = st.get("cap_down", self.cap_down)
        self.leaf = st.get("leaf")
        self.applied = st.get("applied", {})

    def _save(self) -> None:
        st = {"sessions": {k: {"slot": s.slot, "addresses": s.addresses} for k, s in self.sessions.items()},
              "cap_up": self.cap_up, "cap_down": self.cap_down, "leaf": self.leaf, "applied": self.applied}
        write_atomic(self.state_path, json.dumps(st, indent=1, sort_keys=True))

    # --- running tc ------------------------------------------------------------------------------
    def _run(self, *argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return run.run([*self.prefix, *argv], input=input, check=check, error=TcError)

    def _batch(self, lines: list[str]) -> None:
        self.last_batch = lines
        if lines:
            self._run("tc", "-batch", "-", input="\n".join(lines) + "\n")

    # --- devices ---------------------------------------------------------------------------------
    @property
    def devices(self) -> dict[str, str]:
        """role → device name."""
        wan, tun = self.sh.wan_interface, self.sh.tunnel_interface
        return {"line-up": wan, "line-down": ifb_name(wan), "buyers-down": tun, "buyers-up": ifb_name(tun)}

    def _ensure_ifb(self, name: str) -> None:
        if self._run("ip", "link", "show", name, check=False).returncode != 0:
            self._run("ip", "link", "add", name, "type", "ifb")
        self._run("ip", "link", "set", name, "up")

    def probe_leaf(self) -> str:
        """The best leaf qdisc the kernel has, tried on a throwaway IFB (never on the real link)."""
        name = f"iwprobe{os.getpid() % 100000}"
        self._run("ip", "link", "del", name, check=False)
        self._run("ip", "link", "add", name, "type", "ifb")
        try:
            self._run("tc", "qdisc", "add", "dev", name, "root", "handle", "1:", "htb", "default", "1")
            self._run("tc", "class", "add", "dev", name, "parent", "1:", "classid", "1:1", "htb", "rate", "1mbit")
            for kind in LEAF_PREFERENCE:
                spec = leaf_spec(kind, 1_000_000, 1514).split()
                if self._run("tc", "qdisc", "replace", "dev", name, "parent", "1:1", "handle", "2:", *spec,
                             check=False).returncode == 0:
                    return kind
            raise TcError("no usable leaf qdisc (not even bfifo)")
        finally:
            self._run("ip", "link", "del", name, check=False)

    # --- desired tree ----------------------------------------------------------------------------
    def desired(self) -> list[Obj]:
        sh, fw, leaf = self.sh, self.fw, self.leaf or "bfifo"
        d = self.devices
        cap_sum = self.cap_up + self.cap_down
        objs: list[Obj] = []
        # the line's device may be absent (ppp0 before it dials): its trees wait (the agent sets them
        # up when it comes); the buyers' trees do not
        if self._run("ip", "link", "show", "dev", d["line-up"], check=False).returncode == 0:
            objs += line_tree(sh, fw, d["line-up"], sh.line_up, cap_sum, sh.floor_up, leaf, "src")
            objs += _ingress(d["line-up"], d["line-down"])
        objs += line_tree(sh, fw, d["line-down"], sh.line_down, cap_sum, sh.floor_down, leaf, "dst")
        objs += tunnel_tree(sh, d["buyers-down"], self.cap_down, sh.session_cap_down, self.max_sessions,
                            self.sessions, leaf, "dst")
        objs += _ingress(d["buyers-down"], d["buyers-up"])
        objs += tunnel_tree(sh, d["buyers-up"], self.cap_up, sh.session_cap_up, self.max_sessions,
                            self.sessions, leaf, "src")
        return objs

    def _live(self, dev: str) -> set[str]:
        """Keys of the objects of ours that exist on ``dev``."""
        keys: set[str] = set()
        q = self._run("tc", "-j", "qdisc", "show", "dev", dev, check=False)
        for e in json.loads(q.stdout or "[]") if q.returncode == 0 else []:
            if e.get("kind") == "ingress":
                keys.add("ingress")
            elif e.get("root") and e.get("kind") == "htb" and e.get("handle") == "1:":
                keys.add("root")
                self._root_default[dev] = str((e.get("options") or {}).get("default", ""))
            elif e.get("parent", "").startswith("1:"):
                keys.add(f"leaf:{e['parent']}")
        if "root" in keys:
            keys |= set(parse_classes(self._run("tc", "class", "show", "dev", dev).stdout))
            f = self._run("tc", "-j", "filter", "show", "dev", dev, "parent", "1:")
            keys |= {f"1::{e['pref']}" for e in json.loads(f.stdout or "[]")}
        if "ingress" in keys:
            f = self._run("tc", "-j", "filter", "show", "dev", dev, "parent", "ffff:")
            keys |= {f"ffff::{e['pref']}" for e in json.loads(f.stdout or "[]")}
        return keys

    def diff(self) -> list[str]:
        """The tc batch that turns what is live into the desired tree (also updates the record)."""
        want = self.desired()
        live = {dev: self._live(dev) for dev in {o.dev for o in want}}
        wanted = {(o.dev, o.key) for o in want}
        lines: list[str] = []
        # Delete first what is no longer wanted (filters, then leaves' classes; a class delete takes
        # its qdisc along); only objects in our namespace of keys on our own devices.
        for dev, keys in live.items():
            gone = [k for k in keys if (dev, k) not in wanted]
            for k in sorted(gone, key=lambda k: (not k.startswith(("1::", "ffff::")), k)):
                if k.startswith(("1::", "ffff::")):
                    parent, pref = k.rsplit("::", 1)
                    lines.append(f"filter del dev {dev} parent {parent}: prio {pref}")
                elif k.startswith("1:") and int(k.split(":")[1], 16) >= FIRST_SESSION_MINOR:
                    lines.append(f"class del dev {dev} classid {k}")
                self.applied.pop(f"{dev} {k}", None)
        new_applied: dict[str, str] = {}
        for o in want:
            rec = f"{o.dev} {o.key}"
            new_applied[rec] = o.spec
            is_live = o.key in live[o.dev]
            if is_live and self.applied.get(rec) == o.spec:
                continue
            if o.key == "root" and is_live:
                # HTB has no change operation (`qdisc replace` of a live HTB root fails): a live root
                # with the wanted default class is kept, whatever the record says (it is lost after
                # a failed batch); another one is rebuilt, with everything below it.
                if _same_default(self._root_default.get(o.dev, ""), o.spec):
                    continue
                lines.append(f"qdisc del dev {o.dev} root")
                live[o.dev] = {k for k in live[o.dev] if k == "ingress" or k.startswith("ffff::")}
                lines.append(o.command("add"))
                continue
            if o.kind == "qdisc":
                lines.append(o.command("replace"))
            elif o.kind == "class":
                lines.append(o.command("change" if is_live else "add"))
            else:
                if is_live:
                    parent, pref = o.key.rsplit("::", 1)
                    lines.append(f"filter del dev {o.dev} parent {parent}: prio {pref}")
                lines.append(o.command("add"))
        self.applied = new_applied
        return lines

    def _apply(self) -> list[str]:
        lines = self.diff()
        try:
            self._batch(lines)
        except TcError:
            self.applied = {}  # unknown now: the next apply re-asserts every object
            self._save()
            raise
        self._save()
        return lines

    # --- the API the session manager calls -------------------------------------------------------
    def setup(self) -> list[str]:
        """Probe the leaf qdisc (once), create the IFBs and bring the trees to the desired state.

        Idempotent and safe at every agent start: a live tree from before the restart is diffed,
        not rebuilt. Returns the tc batch lines that were applied.
        """
        with self.lock:
            if self.leaf is None:
                self.leaf = self.probe_leaf()
            for dev in (self.devices["line-down"], self.devices["buyers-up"]):
                self._ensure_ifb(dev)
            return self._apply()

    def add_session(self, session_id: str, addresses: list[str]) -> list[str]:
        """A session opened: its own leaf class in both directions, matched by its tunnel addresses."""
        with self.lock:
            if session_id not in self.sessions:
                used = {s.slot for s in self.sessions.values()}
                slot = next(i for i in range(4096) if i not in used)
                self.sessions[session_id] = Session(slot, list(addresses))
            else:
                self.sessions[session_id].addresses = list(addresses)
            return self._apply()

    def sync_sessions(self, open_sessions: dict[str, list[str]]) -> list[str]:
        """Exactly these sessions (id → tunnel addresses), in one batch: for the agent's start,
        when the session manager knows which sessions survived the restart."""
        with self.lock:
            for sid in set(self.sessions) - set(open_sessions):
                del self.sessions[sid]
            for sid, addrs in open_sessions.items():
                if sid in self.sessions:
                    self.sessions[sid].addresses = list(addrs)
                else:
                    used = {s.slot for s in self.sessions.values()}
                    self.sessions[sid] = Session(next(i for i in range(4096) if i not in used), list(addrs))
            return self._apply()

    def classid(self, session_id: str) -> str:
        """The leaf class of a session (the same classid in both tunnel trees)."""
        return f"1:{FIRST_SESSION_MINOR + self.sessions[session_id].slot:x}"

    def remove_session(self, session_id: str) -> list[str]:
        """A session closed: only its class, leaf qdisc and filters go."""
        with self.lock:
            if self.sessions.pop(session_id, None) is None:
                return []
            return self._apply()

    def set_caps(self, cap_up: int, cap_down: int) -> list[str]:
        """New buyer caps (bit/s), e.g. from the schedule: classes are changed in place."""
        with self.lock:
            self.cap_up, self.cap_down = cap_up, cap_down
            return self._apply()

    def teardown(self) -> None:
        """Remove every tree and IFB of ours (shaping disabled, or uninstall)."""
        with self.lock:
            d = self.devices
            for dev in (d["line-up"], d["buyers-down"]):
                self._run("tc", "qdisc", "del", "dev", dev, "root", check=False)
                self._run("tc", "qdisc", "del", "dev", dev, "ingress", check=False)
            for dev in (d["line-down"], d["buyers-up"]):
                self._run("ip", "link", "del", dev, check=False)
            self.applied, self.sessions = {}, {}
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_path)

    # --- show ------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The live trees with rates and counters, per device (what ``shaping show`` prints)."""
        names = {f"1:{FIRST_SESSION_MINOR + s.slot:x}": f"session {sid}" for sid, s in self.sessions.items()}
        labels = {"1:1": "line", "1:10": "owner", "1:20": "shared", "1:2": "unregistered"}
        out = {"leaf_qdisc": self.leaf, "cap_up": self.cap_up, "cap_down": self.cap_down, "devices": []}
        for role, dev in self.devices.items():
            p = self._run("tc", "-s", "class", "show", "dev", dev, check=False)
            classes = parse_classes(p.stdout) if p.returncode == 0 else {}
            q = self._run("tc", "-j", "qdisc", "show", "dev", dev, check=False)
            qd = json.loads(q.stdout or "[]") if q.returncode == 0 else []
            tunnel = role.startswith("buyers")
            for cid, c in classes.items():
                c["label"] = names.get(cid) or (labels.get(cid) if not (tunnel and cid in ("1:10", "1:20"))
                                                else None) or ""
            out["devices"].append({"role": role, "dev": dev, "present": p.returncode == 0,
                                   "qdiscs": [f"{e.get('kind')} {e.get('handle')}" for e in qd],
                                   "classes": list(classes.values())})
        return out


def format_snapshot(snap: dict) -> str:
    lines = [f"leaf qdisc: {snap['leaf_qdisc'] or 'not probed yet'}"
             + (" (fallback: this kernel has neither fq_codel nor cake)" if snap["leaf_qdisc"] == "bfifo" else ""),
             f"buyer caps: up {snap['cap_up'] / 1e6:g} Mbit/s, down {snap['cap_down'] / 1e6:g} Mbit/s"]
    for d in snap["devices"]:
        lines.append(f"{d['role']:<12} {d['dev']}" + ("" if d["present"] else "  (missing)"))
        for c in d["classes"]:
            lines.append(f"  {c['classid']:<7} {c.get('label', ''):<22} rate {c.get('rate', '?'):>9} "
                         f"ceil {c.get('ceil', '?'):>9}  sent {c.get('bytes', 0):>12} B {c.get('packets', 0):>9} pkt"
                         f"  dropped {c.get('dropped', 0)}  backlog {c.get('backlog', '0b')}")
    return "\n".join(lines)


def add_cli(sub) -> None:
    """``idlewire-agent shaping show [--json]`` (wired from __main__)."""
    p = sub.add_parser("shaping", help="inspect the traffic shaping trees",
                       description="Show the live shaping trees: every class with its rate, ceiling, "
                                   "bytes/packets sent, drops and backlog, and the leaf qdisc in use.")
    ssub = p.add_subparsers(dest="shaping_command", required=True)
    show = ssub.add_parser("show", help="print the live trees with rates and counters")
    show.add_argument("--config", default="/etc/idlewire/node.toml")
    show.add_argument("--state", default=STATE_PATH, help="the shaper's state file (session names)")
    show.add_argument("--json", action="store_true", help="machine-readable output")


def cli_main(args) -> int:
    import sys

    from .config import ConfigError, load

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    pol = cfg.policy
    shaper = Shaper(pol.shaping, pol.firewall, pol.quota.max_sessions, state_path=args.state)
    snap = shaper.snapshot()
    print(json.dumps(snap, indent=1) if args.json else format_snapshot(snap))
    return 0
