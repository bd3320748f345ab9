"""Is the buyers' isolation in force, and what a closed session leaves behind in the kernel.

The nftables table itself comes from roles/firewall (table inet <firewall.table>). Isolation is a
precondition of every open session, not only of opening one: `Guard.check()` runs on every
metering poll, and when the table is missing, changed or no longer isolates the tunnel, the agent
removes every buyer peer until it is back (agent.py).

Beside the role's table the agent keeps its own, table inet <firewall.table>_learned: the
addresses it learned that buyers must not reach although they look public — the WAN gateway(s)
and the node's public address(es) (configured in [firewall] public_addresses, later reported by
the hub or UPnP). Behind a home router that public address is the router's: without this a buyer
reaches the router's admin page, SSH and port forwards through hairpin NAT.

`forget_flows()` deletes the conntrack entries of a closed session's tunnel address over netlink
(NETLINK_NETFILTER, as `conntrack -D` does), so that no flow of one buyer survives into the next
buyer of the address.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import struct
import time

from . import run

log = logging.getLogger("idlewire.isolation")

# What the role's table must keep dropping for the tunnel (a subset of firewall_blocked_networks_v4).
CORE_BLOCKED = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"))
LEARN_EVERY = 30.0  # seconds between two looks at the default routes


def _nft(*args: str, input: str | None = None):
    """`nft ARGS` through run.run (timeout, one line); None when it could not run or answer."""
    try:
        return run.run(["nft", *args], input=input, check=False)
    except run.CommandError as exc:
        log.warning("isolation: %s", exc)
        return None


def _table(family_table: str) -> list[dict] | None:
    """The objects of `nft -j list table inet NAME` (None when it is not loaded)."""
    p = _nft("-j", "list", "table", "inet", family_table)
    if p is None or p.returncode != 0:
        return None
    try:
        return json.loads(p.stdout).get("nftables", [])
    except ValueError:
        return None


def table_loaded(table: str, netns: str | None = None) -> bool:
    """True when ``table inet <table>`` is loaded with its forward chain (nft -j list table)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    try:
        p = run.run([*prefix, "nft", "-j", "list", "table", "inet", table], check=False)
    except run.CommandError as exc:
        log.warning("isolation check: %s", exc)
        return False
    if p.returncode != 0:
        return False
    try:
        items = json.loads(p.stdout).get("nftables", [])
    except ValueError:
        return False
    return any(i.get("chain", {}).get("name") == "forward" for i in items)


def fingerprint(items: list[dict]) -> str:
    """A table's content as one canonical string: its chains, rules and sets, without handles and
    counter values (which change with every packet), so an atomic reload of the same file keeps it.
    (The string itself, a few KB, not a hash: hashlib would bring libcrypto into the agent's RSS.)"""
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in ("handle", "packets", "bytes")}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v
    return json.dumps(strip(items), sort_keys=True, separators=(",", ":"))


def _networks(elems) -> list:
    """The networks of a set's elements in nft's JSON ("10.0.0.0" | {"prefix": ...} | {"range": ...})."""
    out = []
    for e in elems or []:
        e = e.get("elem", {}).get("val", e) if isinstance(e, dict) and "elem" in e else e
        try:
            if isinstance(e, str):
                out.append(ipaddress.ip_network(e))
            elif "prefix" in e:
                out.append(ipaddress.ip_network(f"{e['prefix']['addr']}/{e['prefix']['len']}"))
            elif "range" in e:
                lo, hi = (ipaddress.ip_address(a) for a in e["range"])
                out += ipaddress.summarize_address_range(lo, hi)
        except (ValueError, TypeError, KeyError):
            continue
    return out


def _verdicts(rule: dict) -> tuple[set[str], str | None, str | None, str | None]:
    """(verdicts, jump target, iifname it matches, set it matches daddr against) of one rule."""
    verdicts, jump, iif, dset = set(), None, None, None
    for e in rule.get("expr", []):
        if not isinstance(e, dict):
            continue
        for v in ("accept", "drop", "reject"):
            if v in e:
                verdicts.add(v)
        if "jump" in e or "goto" in e:
            jump = (e.get("jump") or e.get("goto") or {}).get("target")
        m = e.get("match")
        if isinstance(m, dict) and m.get("op", "==") in ("==", "in"):
            left, right = m.get("left"), m.get("right")
            if isinstance(left, dict) and left.get("meta", {}).get("key") == "iifname" and isinstance(right, str):
                iif = right
            if isinstance(left, dict) and left.get("payload", {}).get("field") == "daddr" and \
                    isinstance(right, str) and right.startswith("@"):
                dset = right[1:]
    return verdicts, jump, iif, dset


def problems(items: list[dict], tunnel: str) -> list[str]:
    """What is wrong with the role's table for the tunnel `tunnel` (empty: it isolates).

    The forward hook must send the tunnel's packets to a chain that drops private destinations
    (set buyer_blocked_v4 covering CORE_BLOCKED) before anything accepts them.
    """
    chains: dict[str, dict] = {}
    rules: dict[str, list[dict]] = {}
    sets: dict[str, dict] = {}
    for i in items:
        if "chain" in i:
            chains[i["chain"]["name"]] = i["chain"]
        elif "rule" in i:
            rules.setdefault(i["rule"].get("chain", ""), []).append(i["rule"])
        elif "set" in i:
            sets[i["set"]["name"]] = i["set"]
    hooked = [n for n, c in chains.items() if c.get("hook") == "forward" and c.get("type") == "filter"]
    if not hooked:
        return ["no filter chain on the forward hook"]
    out: list[str] = []
    target = None
    for name in hooked:
        for r in rules.get(name, []):
            verdicts, jump, iif, _ = _verdicts(r)
            if jump and iif == tunnel:
                target = jump
                break
            if "accept" in verdicts and iif in (tunnel, None):
                out.append(f"chain {name} accepts before it filters {tunnel}")
                break
        if target:
            break
    if target is None:
        return [*out, f"the forward hook does not send {tunnel}'s packets to a filter chain"]
    blocked_before_accept = False
    for r in rules.get(target, []):
        verdicts, _, _, dset = _verdicts(r)
        if "drop" in verdicts and dset == "buyer_blocked_v4":
            blocked_before_accept = True
            break
        if "accept" in verdicts:
            break
    if not blocked_before_accept:
        out.append(f"chain {target} does not drop daddr @buyer_blocked_v4 before accepting")
    nets = _networks(sets.get("buyer_blocked_v4", {}).get("elem"))
    missing = [str(c) for c in CORE_BLOCKED if not any(c.subnet_of(n) for n in nets if n.version == 4)]
    if missing:
        out.append(f"set buyer_blocked_v4 lacks {', '.join(missing)}")
    return out


def default_gateways() -> set[str]:
    """The gateways of the default routes (IPv4 and IPv6): the home router's LAN side, or the ISP's."""
    out: set[str] = set()
    for fam in ("-4", "-6"):
        try:
            p = run.run(["ip", "-j", fam, "route", "show", "default"], check=False)
            routes = json.loads(p.stdout or "[]") if p.returncode == 0 else []
        except (run.CommandError, ValueError):
            continue
        for r in routes:
            gw = r.get("gateway") if isinstance(r, dict) else None
            if gw:
                try:
                    ip = ipaddress.ip_address(gw)
                except ValueError:
                    continue
                if not ip.is_link_local:  # fe80:: gateways are link-local: the role's v6 list covers them
                    out.add(str(ip))
    return out


class Guard:
    """Keeps isolation true for open sessions: checks the role's table every poll, keeps the
    agent's own table of learned addresses, and says when buyers must be cut off.

    `check()` answers (ok, why). The first state a table is seen in (valid) is its baseline; a later
    change of its content, or its disappearance, is a loss (ok False once, logged), after which
    the table is accepted again as soon as it is valid.
    """

    def __init__(self, table: str, tunnel: str, configured: list[str] | tuple[str, ...] = (), clock=time.monotonic):
        self.table, self.tunnel = table, tunnel
        self.learned_table = f"{table}_learned"
        self.configured = set(configured)
        self.reported: dict[str, set[str]] = {}  # source (hub, upnp) -> addresses
        self.clock = clock
        self.gateways: set[str] = set()
        self._learned_at = -LEARN_EVERY
        self.baseline: str | None = None
        self._loaded: list | None = None  # the addresses in the learned table as the agent left it
        self.ok = False
        self.why = "not checked yet"
        self.lost_at: float | None = None  # monotonic time the current loss was first seen
        self.checked_at = -1e9

    # --- addresses ------------------------------------------------------------------------
    def report(self, source: str, addresses) -> None:
        """Public addresses someone learned (e.g. "hub", "upnp"): blocked for buyers from the next check."""
        self.reported[source] = {str(ipaddress.ip_address(a)) for a in addresses}

    def addresses(self) -> list:
        now = self.clock()
        if now - self._learned_at >= LEARN_EVERY:
            self._learned_at = now
            gws = default_gateways()
            if gws != self.gateways:
                log.info("buyers are kept from the gateway(s) %s", ", ".join(sorted(gws)) or "(none)")
            self.gateways = gws
        addrs = set(self.configured) | self.gateways
        for a in self.reported.values():
            addrs |= a
        return sorted((ipaddress.ip_address(a) for a in addrs), key=lambda a: (a.version, a))

    def learned_text(self, addrs) -> str:
        v4 = ", ".join(str(a) for a in addrs if a.version == 4)
        v6 = ", ".join(str(a) for a in addrs if a.version == 6)
        t, tun = self.learned_table, json.dumps(self.tunnel)
        return (f"table inet {t}\ndelete table inet {t}\n"
                f"table inet {t} {{\n"
                f"  set v4 {{ type ipv4_addr; {f'elements = {{ {v4} }}' if v4 else ''} }}\n"
                f"  set v6 {{ type ipv6_addr; {f'elements = {{ {v6} }}' if v6 else ''} }}\n"
                f"  chain forward {{\n"
                f"    type filter hook forward priority filter - 20; policy accept;\n"
                f"    iifname {tun} ip daddr @v4 counter drop\n"
                f"    iifname {tun} ip6 daddr @v6 counter drop\n"
                f"  }}\n}}\n")

    def _learned_ok(self, items: list[dict] | None, addrs) -> bool:
        if items is None:
            return False
        have = set()
        for i in items:
            if "set" in i:
                have |= {n.network_address for n in _networks(i["set"].get("elem"))}
        hooked = any(i.get("chain", {}).get("hook") == "forward" for i in items)
        drops = sum(1 for i in items if "rule" in i and "drop" in _verdicts(i["rule"])[0])
        return hooked and drops >= 2 and have == set(addrs)

    # --- the check --------------------------------------------------------------------------
    def check(self) -> tuple[bool, str]:
        """Is isolation in force now? Logs each loss and each recovery once."""
        why = ""
        items = _table(self.table)
        if items is None:
            why = f"table inet {self.table} is not loaded"
        else:
            bad = problems(items, self.tunnel)
            if bad:
                why = f"table inet {self.table}: {'; '.join(bad)}"
        addrs = self.addresses()
        learned = _table(self.learned_table)
        intact = self._learned_ok(learned, self._loaded or [])
        if self._loaded is not None and not intact:
            why = why or f"table inet {self.learned_table} is missing or changed"
        if not intact or self._loaded != addrs:
            p = _nft("-f", "-", input=self.learned_text(addrs))
            if p is None or p.returncode != 0:
                why = why or f"cannot load table inet {self.learned_table}: {p.stderr.strip() if p else 'nft'}"
            else:
                self._loaded = addrs
        if not why:
            fp = fingerprint(items)
            if self.ok and self.baseline is not None and fp != self.baseline:
                why = f"table inet {self.table} changed"
            self.baseline = fp  # as it is now (valid): accepted again at the next check
        ok = not why
        if ok and self.lost_at is not None:
            log.warning("buyer isolation is back (%s before): buyer peers are admitted again", self.why)
            self.lost_at = None
        elif not ok and self.lost_at is None:
            log.error("buyer isolation lost: %s; removing every buyer peer until it is back", why)
            self.lost_at = self.clock()
        self.ok, self.why, self.checked_at = ok, why, self.clock()
        return ok, why

    def recent(self, max_age: float) -> bool:
        """Isolation as of a check at most `max_age` seconds old (a fresh check otherwise): what a
        session open needs, without two `nft` runs for every request of a buyer who opens many."""
        if self.ok and self.clock() - self.checked_at <= max_age:
            return True
        return self.check()[0]


# --- conntrack over netlink --------------------------------------------------------------------
NETLINK_NETFILTER = 12
_CT_GET, _CT_DELETE = (1 << 8) | 1, (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_*
_F_REQUEST, _F_ACK, _F_DUMP = 1, 4, 0x300
_DONE, _ERROR = 3, 2
_CTA_TUPLE_ORIG, _CTA_TUPLE_REPLY, _CTA_TUPLE_IP, _CTA_ZONE = 1, 2, 1, 18


def _attrs(data: bytes):
    """(type, payload) of each netlink attribute in `data`."""
    off = 0
    while off + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        yield kind & 0x3FFF, data[off + 4:off + length]
        off += (length + 3) & ~3


def _tuple_addrs(payload: bytes) -> set[bytes]:
    for kind, inner in _attrs(payload):
        if kind == _CTA_TUPLE_IP:
            return {v for _, v in _attrs(inner)}
    return set()


def forget_flows(address: str) -> int:
    """Delete every conntrack entry with `address` on either end of either direction; the count.

    A buyer's masqueraded flows keep their entries (TCP established: 5 days) after the session
    closes; the next holder of the address would receive their answers and pay for them.
    """
    ip = ipaddress.ip_address(address.split("/")[0])
    want, family = ip.packed, socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as exc:
        log.warning("conntrack: cannot open netlink (%s): flows of %s are left to time out", exc, address)
        return 0
    with s:
        s.settimeout(run.TIMEOUT)
        s.bind((0, 0))
        s.send(struct.pack("=IHHII", 20, _CT_GET, _F_REQUEST | _F_DUMP, 1, 0) + struct.pack("=BBH", family, 0, 0))
        doomed: list[bytes] = []
        done = False
        try:
            while not done:
                buf = s.recv(1 << 17)
                off = 0
                while off + 16 <= len(buf):
                    length, kind, _, _, _ = struct.unpack_from("=IHHII", buf, off)
                    if length < 16:
                        done = True
                        break
                    if kind in (_DONE, _ERROR):
                        done = True
                        break
                    body = buf[off + 20:off + length]
                    orig = zone = None
                    ends: set[bytes] = set()
                    for a, payload in _attrs(body):
                        if a == _CTA_TUPLE_ORIG:
                            orig = payload
                            ends |= _tuple_addrs(payload)
                        elif a == _CTA_TUPLE_REPLY:
                            ends |= _tuple_addrs(payload)
                        elif a == _CTA_ZONE:
                            zone = payload
                    if orig is not None and want in ends:
                        msg = struct.pack("=HH", 4 + len(orig), _CTA_TUPLE_ORIG | 0x8000) + orig
                        if zone is not None:
                            msg += struct.pack("=HH", 4 + len(zone), _CTA_ZONE) + zone + b"\0" * (-len(zone) % 4)
                        doomed.append(msg)
                    off += (length + 3) & ~3
        except OSError as exc:
            log.warning("conntrack: dump failed (%s): flows of %s are left to time out", exc, address)
            return 0
        deleted = 0
        for seq, attrs in enumerate(doomed, start=2):
            hdr = struct.pack("=IHHII", 20 + len(attrs), _CT_DELETE, _F_REQUEST | _F_ACK, seq, 0)
            try:
                s.send(hdr + struct.pack("=BBH", family, 0, 0) + attrs)
                ack = s.recv(4096)
            except OSError as exc:
                log.warning("conntrack: delete failed: %s", exc)
                break
            if len(ack) >= 20 and struct.unpack_from("=i", ack, 16)[0] == 0:
                deleted += 1
    if deleted:
        log.info("conntrack: %d flow(s) of %s deleted", deleted, address)
    return deleted
