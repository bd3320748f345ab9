"""The one schema: every key of node.toml, unit.toml, stamp.toml and the vendor's unit files.

Each key is a `Key`: its kind, bounds, default, a doc line and the one check every reader runs.
The agent loads node.toml and unit.toml with it (config.py, policy.py), the first-boot consumer
checks the stamp with it (consume.py), and the host's `idlewire stamp` / `flash --unit` check
unit.yml and units.csv with it (tools/idlewire/units.py imports this module), so a value the host
accepts is one the node applies. The key tables in README.md and agent/README.md are generated
from it (tools/scripts/schema_docs.py, checked in lint).

One rule for text, on both sides: surrounding white space and line breaks of every kind are
dropped (a YAML folded scalar ends in a newline, YAML reads NEL and U+2028 as line breaks, a
spreadsheet cell may carry a space), and what is left may hold no control character, no line or
paragraph separator (U+2028/U+2029), no lone surrogate, no byte-order mark and no invisible
direction override. Numbers: booleans are not numbers; a whole
number may be written 8 or 8.0; infinities and NaN are outside every bound.

Standard library only (the agent imports it).
"""

from __future__ import annotations

import ipaddress
import re

MISSING = object()  # no default: the key is required where it is read

STR, INT, NUM, BOOL, STRS, TABLE = "string", "integer", "number", "boolean", "list of strings", "table"
BOOL_AUTO = 'boolean or "auto"'
MBIT = 1_000_000


class Invalid(ValueError):
    """A value a key refuses; str() is what the key expects."""


class BadText(Invalid):
    """Text that breaks the text rule (said after what the key expects)."""


# Characters no stamped or configured text may hold: C0/C1 controls and DEL, line and paragraph
# separators, surrogates, the BOM / zero-width no-break space, zero-width and direction controls.
_BAD_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\ufeff\u200b-\u200f\u202a-\u202e"
                       "\u2066-\u2069\ufff9-\ufffb]")
_EDGE = None  # str.strip(): every Unicode white space and line break (NEL, U+2028, U+2029 too)


def text(value, strip: bool = True) -> str:
    """The text rule: a str, edges stripped of white space and line breaks, nothing invisible.
    strip=False: taken as given (a password, whose spaces are part of it)."""
    if not isinstance(value, str):
        raise Invalid("text")
    if strip:
        value = value.strip(_EDGE)
    m = _BAD_TEXT.search(value)
    if m:
        raise BadText(f"no control characters, line breaks or invisible characters (found U+{ord(m[0]):04X})")
    return value


class Key:
    """One key. `check(value)` returns the value as the node applies it, or raises Invalid."""

    __slots__ = ("case", "default", "doc", "empty", "example", "expect", "hi", "host_only", "keys", "kind", "lo",
                 "lo_open", "pattern", "secret", "test", "verbatim")

    def __init__(self, kind: str, default=MISSING, doc: str = "", expect: str = "", *, lo=None, hi=None,
                 lo_open: bool = False, pattern: str | None = None, test=None, case: str = "",
                 empty: bool = False, keys: dict | None = None, host_only: bool = False, example=None,
                 secret: bool = False, verbatim: bool = False):
        self.kind, self.default, self.doc, self.expect = kind, default, doc, expect
        self.lo, self.hi, self.lo_open = lo, hi, lo_open
        self.pattern = re.compile(pattern) if pattern else None
        self.test, self.case, self.empty, self.keys = test, case, empty, keys
        self.host_only, self.example, self.secret = host_only, example, secret
        self.verbatim = verbatim  # a str taken as given, edges and all (text(strip=False))

    def but(self, **changes) -> Key:
        """A copy with some attributes changed (the same fact read in another file: a unit's cap)."""
        k = Key.__new__(Key)
        for name in Key.__slots__:
            setattr(k, name, changes.get(name, getattr(self, name)))
        return k

    def check(self, value):
        try:
            return self._check(value)
        except BadText as exc:
            raise Invalid(f"{self.expect}; {exc}" if self.expect else str(exc)) from None
        except Invalid as exc:
            raise Invalid(self.expect or str(exc)) from None

    def check_item(self, value):
        """One element of a list key (its message says what one element must be)."""
        try:
            return self._one_str(value)
        except BadText as exc:
            raise Invalid(f"{self.item_expect()}; {exc}") from None
        except Invalid:
            raise Invalid(self.item_expect()) from None

    def item_expect(self) -> str:
        return self.example or self.expect

    def _check(self, value):
        kind = self.kind
        if kind == BOOL:
            if not isinstance(value, bool):
                raise Invalid("true or false")
            return value
        if kind == BOOL_AUTO:
            if not isinstance(value, bool) and value != "auto":
                raise Invalid('true, false or "auto"')
            return value
        if kind in (INT, NUM):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Invalid(f"a {kind}")
            if kind == INT and isinstance(value, float):
                if not value.is_integer():
                    raise Invalid("a whole number")
                value = int(value)
            if not self._in_bounds(value):
                raise Invalid(f"a {kind} in bounds")
            return value
        if kind == STRS:
            if not isinstance(value, list):
                raise Invalid("a list of strings")
            out = [self._one_str(v) for v in value]
            if self.test and not self.test(out):
                raise Invalid("a list")
            return out
        if kind == STR:
            return self._one_str(value)
        raise Invalid(f"a [{kind}]")

    def _in_bounds(self, v) -> bool:
        if v != v:  # NaN
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi

    def _one_str(self, value) -> str:
        value = text(value, strip=not self.verbatim)
        if self.case == "lower":
            value = value.lower()
        elif self.case == "upper":
            value = value.upper()
        if value == "" and self.empty:
            return value
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise Invalid("a string of the right form")
        if self.test is not None and self.kind == STR:
            try:
                ok = self.test(value)
            except ValueError:
                ok = False
            if not ok:
                raise Invalid("a valid string")
        return value

    def from_text(self, cell: str):
        """The value of a spreadsheet cell (units.csv) for this key; raises Invalid."""
        cell = cell.strip(_EDGE)
        if self.kind == BOOL:
            low = cell.lower()
            if low in ("true", "yes", "1"):
                return True
            if low in ("false", "no", "0"):
                return False
            raise Invalid(self.expect or "true or false")
        if self.kind == BOOL_AUTO:
            low = cell.lower()
            if low == "auto":
                return "auto"
            return Key(BOOL, expect=self.expect).from_text(cell)
        if self.kind in (INT, NUM):
            if len(cell) > 40 or not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", cell):
                raise Invalid(self.expect or f"a {self.kind}")
            return int(cell) if re.fullmatch(r"[+-]?\d+", cell) else float(cell)
        if self.kind == STRS:
            return [k for k in cell.split(";") if k.strip(_EDGE)]
        return cell

    def shown_default(self) -> str:
        d = self.default
        if d is MISSING:
            return "required"
        if isinstance(d, bool):
            return "true" if d else "false"
        if isinstance(d, str):
            return f'"{d}"'
        if isinstance(d, list):
            return "[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in d) + "]"
        return f"{d:g}" if isinstance(d, float) else str(d)


def shown(value, limit: int = 60) -> str:
    """A value for a one-line message: repr, escaped, shortened."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 1] + "…"


def check_table(keys: dict[str, Key], data, prefix: str, problems: list[str], *, unknown: bool = True) -> dict:
    """Check a mapping against `keys`: {key: value as applied} for the keys present and valid.
    Each problem is one line 'PREFIXkey: expected X, got Y'."""
    out: dict = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'file'}: expected a table, got {shown(data)}")
        return out
    if unknown:
        for k in sorted(set(data) - set(keys), key=str):
            problems.append(f"{prefix}{k}: unknown key; expected one of {', '.join(sorted(keys))}")
    for name, key in keys.items():
        if name not in data:
            continue
        if key.kind == TABLE:
            out[name] = check_table(key.keys or {}, data[name], f"{prefix}{name}.", problems)
            continue
        try:
            out[name] = key.check(data[name])
        except Invalid as exc:
            got = "a value not shown (a secret)" if key.secret else shown(data[name])
            problems.append(f"{prefix}{name}: expected {exc}, got {got}")
    return out


# --- value forms --------------------------------------------------------------------------------

IFNAME = r"(?!\.\.?$)[A-Za-z0-9_.-]{1,15}"  # Linux: 1-15 bytes, not . or .., no / : @ or space
HOSTNAME = r"(?!-)[a-z0-9-]{1,63}(?<!-)"  # checked after lower-casing: a host name is case-blind
UNIT_ID = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
PAYOUT = r"[A-Za-z0-9:._@+-]{4,128}"
B64KEY = r"[A-Za-z0-9+/]{43}="
SSH_KEY = r"(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-\S+)\s+[A-Za-z0-9+/=]+(\s.*)?"
ABS_PATH = r"/.*"


def _pool(v: str) -> bool:
    net = ipaddress.ip_network(v, strict=False)
    return net.num_addresses >= 4 and net.prefixlen <= (30 if net.version == 4 else 126)


def _ssid(v: str) -> bool:
    return 1 <= len(v.encode()) <= 32


def _nat_ports(v: str) -> bool:
    lo, hi = (int(x) for x in v.split("-"))
    size = hi - lo + 1
    return 1024 <= lo < hi <= 65535 and not size & (size - 1) and not lo % size


def _addresses(v: list) -> bool:
    try:
        return bool(v) and all(ipaddress.ip_address(a) for a in v)
    except ValueError:
        return False


# ISO 3166-1 alpha-2: the 249 officially assigned codes (tests/unit/test_schema_region.py checks the
# list against Debian's iso-codes when it is installed). User-assigned codes (AA, QM-QZ, XA-XZ, ZZ,
# so also XK) and the reserved ones (UK, EU, …) name no country a buyer can ask for.
_COUNTRY_CODES = (
    "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS "
    "BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE "
    "EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM "
    "HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC "
    "LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA "
    "NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW "
    "SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO "
    "TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW"
)
COUNTRIES = frozenset(_COUNTRY_CODES.split())
COUNTRY_EXPECT = "an ISO 3166-1 alpha-2 country code such as DE, US or GB (not UK)"


def _country(v: str) -> bool:
    return v in COUNTRIES
def _ipv4(v: str) -> bool:
    parts = v.split(".")
    return len(parts) == 4 and all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts)


def _path(default: str, doc: str) -> Key:
    return Key(STR, default, doc, "an absolute path", pattern=ABS_PATH)


def _ifname(default: str, doc: str, empty: bool = False) -> Key:
    return Key(STR, default, doc, ('an interface name or ""' if empty else "an interface name (1-15 characters)")
               + ": letters, digits, _ . -", pattern=IFNAME, empty=empty)


def rate(default: float, doc: str, zero: bool = False) -> Key:
    """A rate in Mbit/s: >= 0.01 (10 kbit/s, what tc can shape), below 100,000; 0 = none if `zero`."""
    if zero:
        return Key(NUM, default, doc, "a rate in Mbit/s >= 0 (0 = none) below 100000 (e.g. 20 or 0.5)",
                   lo=0, hi=99_999)
    return Key(NUM, default, doc, "a rate in Mbit/s > 0 (0.01-99999, e.g. 20 or 0.5)", lo=0.01, hi=99_999)


# --- node.toml ----------------------------------------------------------------------------------

# Router mode over PPPoE: the line is this interface (pppd's ifname; the shaper, the firewall's WAN and
# the port mapping use it), and the login is this file (0600, pppd options `user` and `password`).
PPPOE_INTERFACE = "ppp0"
PPPOE_FILE = "/etc/idlewire/pppoe.conf"
# A PPPoE login as pppd reads it from an options file: printable ASCII (quoted, `"` and `\` escaped).
PPPOE_TEXT = r"[\x20-\x7e]{1,128}"

NODE: dict[str, dict[str, Key]] = {
    "node": {
        "region": Key(STR, "", "the node's country (case-blind, stored upper-case): buyers pick nodes by it; "
                      "a marketplace needs it", f'{COUNTRY_EXPECT}, or "" for none', pattern=r"[A-Z]{2}",
                      test=_country, case="upper", empty=True, example="DE"),
        "location": Key(STR, "", "a coarse location shown to buyers (a city or area, never an address), or empty",
                        "up to 64 letters, digits, spaces and . , ' ( ) -", pattern=r"[\w .,'()-]{1,64}",
                        empty=True, example="Berlin"),
        "price_per_gb": Key(NUM, 0.0, "the price a buyer pays per GB", "a number >= 0", lo=0, hi=999_999),
        "log_level": Key(STR, "info", "debug, info, warning or error", "one of debug, info, warning, error",
                         pattern=r"debug|info|warning|error"),
        "state_dir": _path("/var/lib/idlewire-agent", "the metering ledger and the agent's state"),
        "key_file": _path("/etc/idlewire/node.key", "the node's ed25519 key (created 0600 when missing)"),
        "marketplace": Key(STR, "", "the hub's URL, or empty", 'an http(s):// URL or ""',
                           pattern=r"https?://[^\s/]+(/\S*)?", empty=True),
        "unit_file": _path("/etc/idlewire/unit.toml", "the unit's stamped settings (see unit.toml)"),
    },
    "interfaces": {
        "wan": _ifname("eth0", "the owner's line (also what [shaping] shapes)"),
        "lan": _ifname("", "the LAN interface, or empty", empty=True),
        "management": _ifname("", "the management interface, or empty", empty=True),
    },
    "tunnel": {
        "interface": _ifname("iw0", "the buyers' WireGuard interface (also what [shaping] shapes)"),
        "port": Key(INT, 51820, "its UDP listen port", "a UDP port 1-65535", lo=1, hi=65535),
        "pool": Key(STR, "10.99.0.0/16", "buyers' addresses; the node takes the first",
                    'an IP network with room for sessions, e.g. "10.99.0.0/16"', test=_pool),
        "endpoint": Key(STR, "", "host buyers connect to; empty: the host of the API URL they used",
                        'a host name or address buyers reach the node at, or ""',
                        pattern=r"[A-Za-z0-9.:\[\]-]{1,253}", empty=True),
        "private_key_file": _path("/etc/idlewire/wg.key", "the tunnel's WireGuard private key"),
    },
    "metering": {
        "poll_interval": Key(NUM, 5.0, "seconds between counter reads", "seconds between 0.2 and 300",
                             lo=0.2, hi=300),
        "line_rate_mbit": Key(NUM, 1000.0, "the most a session can move per second (clamps a counter jump)",
                              "the line rate in Mbit/s (> 0)", lo=0, lo_open=True, hi=1e6),
        "unpaid_cap_mb": Key(NUM, 50.0, "megabytes a session may use beyond what the buyer co-signed",
                             "megabytes >= 0", lo=0, hi=1e7),
        "tolerance_percent": Key(NUM, 2.0, "disagreement with the buyer's count that is still signed",
                                 "a percentage between 0 and 50", lo=0, hi=50),
    },
    "sessions": {
        "max": Key(INT, 8, "sessions open at once (the unit's caps.max_sessions replaces it)",
                   "a number of sessions 1-3840", lo=1, hi=3840),
        "expiry": Key(INT, 86400, "seconds a session lives", "seconds between 60 and 31622400",
                      lo=60, hi=366 * 86400),
        "idle_timeout": Key(INT, 900, "seconds without traffic before a session is closed",
                            "seconds between 10 and 31622400", lo=10, hi=366 * 86400),
        # Fair admission and address reuse (agent/README "Hostile buyers").
        "max_per_buyer": Key(INT, 4, "sessions one buyer key may hold at once (one key cannot take every slot)",
                             "an integer 1-65535 (sessions one buyer key may hold)", lo=1, hi=65535),
        "handshake_timeout": Key(INT, 30, "seconds a session has to complete its WireGuard handshake; "
                                 "one never connected is closed (no_handshake) and its slot freed",
                                 "seconds between 5 and 3600", lo=5, hi=3600),
        "unpaid_backoff": Key(INT, 60, "seconds a key closed for unpaid usage waits for its next session, "
                              "doubled per further unpaid close (0 = no back-off)",
                              "seconds >= 0 (0 = no back-off)", lo=0, hi=366 * 86400),
        "unpaid_backoff_max": Key(INT, 86400, "the longest unpaid back-off; a key paying that long starts over",
                                  "seconds between 1 and 31622400", lo=1, hi=366 * 86400),
        "address_rest": Key(INT, 600, "seconds a closed session's address rests before another buyer gets it "
                            "(longer than the conntrack timeouts of late flows)",
                            "seconds between 0 and 86400", lo=0, hi=86400),
    },
    "api": {
        "listen": Key(STRS, ["127.0.0.1"], "management/LAN addresses only; never 0.0.0.0, ::, the pool, "
                      "WAN or tunnel", "a non-empty list of IP addresses (management/LAN only)", test=_addresses),
        "port": Key(INT, 8740, "the API's TCP port", "a TCP port 1-65535", lo=1, hi=65535),
        "admin_token_file": _path("/etc/idlewire/admin.token", "the admin's bearer token"),
        "max_body": Key(INT, 16384, "the largest request body in bytes", "bytes between 256 and 1048576",
                        lo=256, hi=1 << 20),
        # Under load (api.py): both bounds are lowered at start to stay within half the file limit.
        "max_connections": Key(INT, 128, "connections open at once in total", "an integer 8-65535",
                               lo=8, hi=65535),
        "max_per_source": Key(INT, 16, "connections open at once from one address (IPv6: one /64)",
                              "an integer 1-65535", lo=1, hi=65535),
        "request_deadline": Key(NUM, 10.0, "seconds a client has to send a whole request, head and body",
                                "seconds between 1 and 300", lo=1, hi=300),
    },
    "receipts": {
        "keep_closed": Key(INT, 100, "receipts kept per closed session (0 = all)",
                           "an integer >= 0 (receipts kept per closed session; 0 = all)", lo=0, hi=10_000_000),
        "keep_days": Key(NUM, 90.0, "days after the close all of them go (0 = for ever)",
                         "a number of days >= 0 (0 = for ever)", lo=0, hi=36600),
    },
    "shaping": {
        "enabled": Key(BOOL, False, "shape the line (owner first, buyers get the idle part)"),
        "tunnel_mtu": Key(INT, 1420, "the tunnel's MTU", "an MTU 1280-9000", lo=1280, hi=9000),
        "line_up_mbit": rate(20, "what the line really carries up, measured, a little below sync"),
        "line_down_mbit": rate(100, "… and down"),
        "overhead": Key(INT, 18, "bytes added to each packet as the kernel counts it on the WAN "
                        "(18 FCS+VLAN, 24 FCS+preamble+gap, 8 PPPoE, 44 ADSL/ATM)",
                        "bytes per packet 0-256 beyond what the kernel counts (e.g. 18 Ethernet FCS+VLAN, 8 PPPoE)",
                        lo=0, hi=256),
        "floor_up_mbit": rate(1, "guaranteed to buyers even while the owner is busy (0 = none)", zero=True),
        "floor_down_mbit": rate(5, "… and down", zero=True),
        "cap_up_mbit": rate(10, "the most buyers together may upload (the unit's caps.up_mbit replaces it)"),
        "cap_down_mbit": rate(50, "… and download (caps.down_mbit)"),
        "session_cap_up_mbit": rate(0, "per session ceiling (0 = the cap)", zero=True),
        "session_cap_down_mbit": rate(0, "… and down", zero=True),
    },
    "quota": {
        "monthly_gb": Key(NUM, 0, "GB up + down per month (0 = no quota; the unit's caps.monthly_gb replaces it)",
                          "a number of GB >= 0 (0 = no quota)", lo=0, hi=1e9),
        "reset_day": Key(INT, 1, "day of month the quota starts over (29-31: last day if shorter)",
                         "a day of the month 1-31", lo=1, hi=31),
    },
    "firewall": {
        "table": Key(STR, "idlewire", "the nftables table (inet) the firewall role installs",
                     "an nftables table name (letters, digits, _)", pattern=r"[A-Za-z_][A-Za-z0-9_]*"),
        "required": Key(BOOL, True, "refuse sessions while that table is not loaded"),
        "buyer_nat_ports": Key(STR, "61440-65535", "buyers' masquerade source ports: an aligned 2^n block",
                               '"LOW-HIGH", a block of 2^n ports starting at a multiple of 2^n '
                               '(e.g. "61440-65535" or "49152-65535")', pattern=r"\d{1,5}-\d{1,5}", test=_nat_ports),
        "public_addresses": Key(STRS, [], "the node's public address(es) (behind a home router: the router's), "
                                "blocked for buyers like any private target",
                                'a list of IP addresses, e.g. ["203.0.113.7"]',
                                test=lambda v: _addresses(v) or v == [], example="an IP address"),
    },
    # How the node sits in the owner's home (idle.py, upnp.py; agent/README "Node mode").
    "home": {
        "mode": Key(STR, "node", '"node": one NIC on the owner\'s LAN, the owner\'s traffic does not cross it, so '
                    'it is measured; "router": the node is the home router', '"node" or "router"',
                    pattern=r"node|router"),
        "wan": Key(STR, "dhcp", 'router mode: how the WAN port reaches the ISP: "dhcp" (DHCPv4, DHCPv6 prefix '
                   f'delegation) or "pppoe" (the line is {PPPOE_INTERFACE} over the WAN port; the login is '
                   f'{PPPOE_FILE})', '"dhcp" or "pppoe"', pattern=r"dhcp|pppoe"),
        "source": Key(STR, "auto", 'node mode: "upnp" (the router\'s WAN counters), "latency" (RTT to the '
                      'reflectors), "auto" (upnp, else latency) or "off" (fixed caps)',
                      '"auto", "upnp", "latency" or "off"', pattern=r"auto|upnp|latency|off"),
        "interval": Key(NUM, 2.0, "seconds between measurements", "seconds 0.5-60", lo=0.5, hi=60),
        "margin_percent": Key(NUM, 10.0, "of the line, kept free for the owner's next burst",
                              "a percentage of the line 0-90", lo=0, hi=90),
        "reflectors": Key(STRS, ["1.1.1.1", "9.9.9.9", "8.8.8.8"], "stable hosts answering ICMP echo (IPv4)",
                          'a list of 1-8 IPv4 addresses answering ping, e.g. ["1.1.1.1", "9.9.9.9"]',
                          test=lambda v: 0 < len(v) <= 8 and all(_ipv4(a) for a in v), example="an IPv4 address"),
        "latency_ms": Key(NUM, 15.0, 'delay above the baseline RTT that means "the line is busy" (a third of it '
                          "standing for a second means so too)",
                          "milliseconds 1-1000", lo=1, hi=1000),
        "upnp_map": Key(BOOL_AUTO, "auto", "map the WireGuard port on the router over UPnP IGD (NAT-PMP as "
                        'fallback): true, false, or "auto" = when [node] marketplace is set and [tunnel] '
                        'endpoint is not',
                        'true, false or "auto"'),
        "upnp_lease": Key(INT, 3600, "seconds a mapping is leased; renewed at half", "seconds 120-604800",
                          lo=120, hi=604800),
    },
}

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
HHMM = r"([01][0-9]|2[0-3]):[0-5][0-9]|24:00"
RULE: dict[str, Key] = {  # [[schedule.rule]]: first matching rule wins
    "days": Key(STRS, list(DAYS), "days the rule applies", "a non-empty list of mon tue wed thu fri sat sun",
                test=lambda v: bool(v) and all(d in DAYS for d in v)),
    "start": Key(STR, MISSING, "from, HH:MM", 'a time "HH:MM" 00:00-24:00', pattern=HHMM),
    "end": Key(STR, MISSING, "until, HH:MM (before start: past midnight)", 'a time "HH:MM" 00:00-24:00', pattern=HHMM),
    "cap_up_mbit": rate(10, "buyers' upload cap while the rule holds"),
    "cap_down_mbit": rate(50, "… and download"),
}
RULE["cap_up_mbit"].default = RULE["cap_down_mbit"].default = MISSING

# Old keys that still read, each with a deprecation line: (section, key) → its one owner.
MOVED: dict[tuple[str, str], tuple[str, str]] = {
    ("shaping", "wan_interface"): ("interfaces", "wan"),
    ("shaping", "tunnel_interface"): ("tunnel", "interface"),
    ("shaping", "tunnel_port"): ("tunnel", "port"),
    ("quota", "max_sessions"): ("sessions", "max"),
}


# [node] region was a free name ("unset" by default, "eu-west", …) before it became the country the
# hub needs. Such a name still reads, as "" (no region), with a deprecation line saying what to
# write; a node with a marketplace then stops at start naming the key (config.market_problem).
OLD_REGION = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _old_region(node: dict, warnings: list[str]) -> None:
    value = node.get("region")
    if not isinstance(value, str):
        return
    try:
        NODE["node"]["region"].check(value)
        return
    except Invalid:
        if not OLD_REGION.fullmatch(value.strip(_EDGE)):
            return  # never valid: the key's own error
    node["region"] = ""
    fix = 'write the node\'s ISO 3166-1 alpha-2 country code, e.g. region = "DE", or region = "" for none'
    if value.strip(_EDGE).lower() == "unset":
        warnings.append(f'node.region = "unset" is deprecated (read as "", no region): {fix}')
    else:
        warnings.append(f"node.region = {shown(value)}: region names are deprecated (read as \"\", no region): {fix}")


def migrate(data: dict) -> tuple[dict, list[str], list[str]]:
    """node.toml with old keys moved to their owners, old region names read as none: (data,
    deprecation lines, conflicts)."""
    warnings: list[str] = []
    problems: list[str] = []
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for (sec, key), (new_sec, new_key) in MOVED.items():
        old = out.get(sec)
        if not isinstance(old, dict) or key not in old:
            continue
        value = old.pop(key)
        new = out.setdefault(new_sec, {})
        if not isinstance(new, dict):
            continue
        if new_key in new and new[new_key] != value:
            problems.append(f"{sec}.{key}: {shown(value)} conflicts with {new_sec}.{new_key} = "
                            f"{shown(new[new_key])}; expected one value: keep {new_sec}.{new_key}, "
                            f"remove {sec}.{key} (deprecated)")
            continue
        new.setdefault(new_key, value)
        warnings.append(f"{sec}.{key} is deprecated: write it as {new_sec}.{new_key} (read as that now)")
    if isinstance(out.get("node"), dict):
        _old_region(out["node"], warnings)
    return out, warnings, problems


# --- the unit: unit.yml / units.csv (host) → stamp.toml (boot partition) → unit.toml (node) -----

# A unit's caps replace node.toml's values: the same facts, so the same keys (bounds, check); a
# cap not given leaves node.toml's value (no default).
CAPS: dict[str, Key] = {
    "up_mbit": NODE["shaping"]["cap_up_mbit"].but(
        default=MISSING, doc="buyers' upload cap; replaces shaping.cap_up_mbit, bounds every schedule rule"),
    "down_mbit": NODE["shaping"]["cap_down_mbit"].but(
        default=MISSING, doc="buyers' download cap; replaces shaping.cap_down_mbit, bounds every schedule rule"),
    "monthly_gb": NODE["quota"]["monthly_gb"].but(
        default=MISSING, doc="GB per month; replaces quota.monthly_gb (0 = no quota)"),
    "max_sessions": NODE["sessions"]["max"].but(default=MISSING, doc="sessions at once; replaces sessions.max"),
}

UNIT: dict[str, Key] = {  # unit.toml on the node: what the stamp leaves for the agent
    "unit": Key(STR, MISSING, "the vendor's id for this unit",
                "a unit id: letters, digits, '.', '_' or '-' (at most 64), starting with a letter or digit",
                pattern=UNIT_ID, example="shop-0001"),
    "hostname": Key(STR, MISSING, "the unit's host name (case-blind: stored lower-case)",
                    "a host name: letters, digits and '-' (at most 63), not starting or ending with '-'",
                    pattern=HOSTNAME, case="lower", example="iw-0001"),
    "node_public_key": Key(STR, MISSING, "base64 ed25519 public key of node.key",
                           "the base64 ed25519 public key of node.key (44 characters)", pattern=B64KEY),
    "payout_address": Key(STR, "", "where the owner is paid (reported, signed, in /health)",
                          "4-128 characters of letters, digits and ':._@+-'", pattern=PAYOUT, empty=True,
                          example="bc1qexample"),
    # The market facts a vendor stamps, so that a unit registers itself with the hub at first boot.
    # Like a cap, each given replaces node.toml's value (the stamp wins over the agent role's
    # agent_marketplace / agent_region); not given: node.toml's.
    "marketplace": NODE["node"]["marketplace"].but(
        default="", doc="the hub the unit registers with at first boot; replaces node.marketplace (wins over the "
        "role's agent_marketplace)", example="https://hub.example"),
    "region": NODE["node"]["region"].but(default="", doc="the unit's country (case-blind, stored upper-case); "
                                         "replaces node.region (wins over agent_region)"),
    # How the unit sits in the home: a vendor selling home routers stamps "router" on a golden image
    # baked as a node; first boot switches the network to it (idlewire-mode) and the agent reads it.
    "mode": NODE["home"]["mode"].but(default="node", doc='"router": the unit is the home router (WAN port, owner '
                                     'LAN bridge, DHCP/DNS, NAT, Wi-Fi AP from wifi.*); "node": a host on the owner\'s '
                                     'LAN; replaces home.mode (wins over the role\'s idlewire_mode)', example="router"),
    "wan": NODE["home"]["wan"].but(default="dhcp", doc='router mode\'s WAN: "dhcp" or "pppoe" (with the pppoe.* '
                                   'login); replaces home.wan (wins over the role\'s idlewire_wan)', example="pppoe"),
    "caps": Key(TABLE, {}, "the unit's limits; each replaces node.toml's value", keys=CAPS),
}
UNIT_OVER: dict[str, tuple[str, str]] = {"marketplace": ("node", "marketplace"), "region": ("node", "region"),
                                         "mode": ("home", "mode"), "wan": ("home", "wan")}

# The ISP's PPPoE login, stamped for router mode with wan = "pppoe": written to PPPOE_FILE (0600) at
# first boot, erased from the boot partition with the rest of the stamp; never in unit.toml.
PPPOE: dict[str, Key] = {
    "user": Key(STR, MISSING, "the PPPoE user name the ISP gave", "a user name of 1-128 printable ASCII characters",
                pattern=PPPOE_TEXT, example="0123456789@isp.example"),
    "password": Key(STR, MISSING, "the PPPoE password (plain: CHAP needs it on the unit), spaces and all",
                    "a password of 1-128 printable ASCII characters", pattern=PPPOE_TEXT, secret=True,
                    verbatim=True),
}

# A WPA passphrase as hostapd's sae_password takes it: 8-63 printable ASCII, without '|' (hostapd
# reads "|mac=", "|id=", … after it as parameters of the password).
SAE_TEXT = r"[\x20-\x7b\x7d\x7e]{8,63}"
SAE_EXPECT = "a WPA passphrase of 8-63 printable ASCII characters without '|'"

WIFI: dict[str, Key] = {
    "country": Key(STR, MISSING, "ISO 3166 country (decides the legal channels)",
                   f"{COUNTRY_EXPECT} (it decides the legal channels)",
                   pattern=r"[A-Z]{2}", test=_country, case="upper", example="DE"),
    "ssid": Key(STR, MISSING, "the network's name", "a network name of 1-32 bytes", test=_ssid,
                example="Cafe Luna"),
    "psk_hash": Key(STR, MISSING, "WPA-PSK derived from the passphrase (64 hex digits)", "64 hex digits",
                    pattern=r"[0-9a-f]{64}", case="lower", secret=True),
    "hidden": Key(BOOL, False, "the network does not broadcast its name"),
    # WPA3 needs the passphrase itself (SAE has no derived key): stamped only when asked for.
    "sae_password": Key(STR, "", "router mode's access point also offers WPA3-SAE with this passphrase "
                        "(WPA2/WPA3 transition mode); empty: WPA2 only", SAE_EXPECT, pattern=SAE_TEXT,
                        empty=True, secret=True, verbatim=True),
}

STAMP_FORMAT = 1
STAMP: dict[str, Key] = {  # stamp.toml on the boot partition (host writes, first boot reads)
    "format": Key(INT, MISSING, "stamp format", f"format {STAMP_FORMAT} (this image reads it)",
                  lo=STAMP_FORMAT, hi=STAMP_FORMAT),
    **{k: v for k, v in UNIT.items() if k != "caps"},
    "stamped_at": Key(STR, "", "when it was stamped (UTC)", "a UTC time YYYY-MM-DDTHH:MM:SSZ",
                      pattern=r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", empty=True),
    "ssh_authorized_keys": Key(STRS, [], "OpenSSH public key lines for the admin account",
                               "a list of OpenSSH public key lines such as 'ssh-ed25519 AAAA… you@host'",
                               pattern=SSH_KEY,
                               example="an OpenSSH public key line such as 'ssh-ed25519 AAAA… you@host'"),
    "wifi": Key(TABLE, {}, "Wi-Fi client settings", keys=WIFI),
    "pppoe": Key(TABLE, {}, "router mode's PPPoE login (with wan = \"pppoe\")", keys=PPPOE),
    "caps": UNIT["caps"],
}
STAMP_REQUIRED = ("format", "unit", "hostname", "node_public_key")

# unit.yml: what the vendor writes. Same keys as the stamp, except the two the host turns into
# something else: wifi.psk (hashed into psk_hash) and node_key (a key file, its public key stamped).
WIFI_INPUT: dict[str, Key] = {
    "country": WIFI["country"], "ssid": WIFI["ssid"],
    "psk": Key(STR, MISSING, "the WPA passphrase (8-63 printable ASCII) or 64 hex digits; stamped hashed "
               "(and as given too with wpa3)",
               "a WPA passphrase of 8-63 printable ASCII characters or 64 hex digits", host_only=True, secret=True),
    "hidden": WIFI["hidden"],
    "wpa3": Key(BOOL, False, "router mode's access point offers WPA3-SAE beside WPA2 (transition mode): the "
                "passphrase is then stamped (SAE needs it) and kept 0600 on the unit, not only its derived key",
                host_only=True),
}
UNIT_INPUT: dict[str, Key] = {
    "unit": UNIT["unit"],
    "hostname": Key(STR, "", "default: the unit id, lower-cased, '_' and '.' as '-'", UNIT["hostname"].expect,
                    pattern=HOSTNAME, case="lower", empty=True, example="iw-0001"),
    "ssh_authorized_keys": STAMP["ssh_authorized_keys"],
    "wifi": Key(TABLE, {}, "Wi-Fi client settings", keys=WIFI_INPUT),
    "payout_address": UNIT["payout_address"],
    "marketplace": UNIT["marketplace"],
    "region": UNIT["region"],
    "mode": UNIT["mode"],
    "wan": UNIT["wan"],
    "pppoe": STAMP["pppoe"],
    "caps": UNIT["caps"],
    "node_key": Key(STR, "", "path of an ed25519 private key (PEM, OpenSSH or base64 of 32 bytes); "
                    "generated when absent", "the path of a key file", empty=True, host_only=True),
}


def csv_columns() -> dict[str, tuple[str, ...]]:
    """units.csv: column → the unit.yml path it fills (wifi_ssid → ("wifi", "ssid"))."""
    cols: dict[str, tuple[str, ...]] = {}
    for name, key in UNIT_INPUT.items():
        if key.kind == TABLE:
            for sub in key.keys or {}:
                cols[f"{name}_{sub}"] = (name, sub)
        else:
            cols[name] = (name,)
    return cols


def dump_str(s: str) -> str:
    """A TOML basic string; everything TOML forbids raw (controls, DEL) and anything invisible escaped."""
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif o < 0x20 or 0x7F <= o <= 0x9F or _BAD_TEXT.match(ch):
            if 0xD800 <= o <= 0xDFFF:
                raise ValueError(f"a lone surrogate (U+{o:04X}) cannot be written to TOML")
            out.append(f"\\u{o:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def dump_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{v} is not a finite number")
        return repr(v)
    if isinstance(v, str):
        return dump_str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(dump_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: dict, header: str = "") -> str:
    """Flat keys, then one level of [tables] (stamp.toml, unit.toml); keys in the schema's order."""
    lines = [f"# {line}" for line in header.splitlines()]
    tables = []
    for k, v in data.items():
        if isinstance(v, dict):
            if v:
                tables.append((k, v))
        else:
            lines.append(f"{k} = {dump_value(v)}")
    for name, table in tables:
        lines += ["", f"[{name}]"] + [f"{k} = {dump_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def check_stamp(data: dict) -> tuple[dict, list[str]]:
    """A parsed stamp.toml: (values as applied, problems naming each key)."""
    problems: list[str] = []
    out = check_table(STAMP, data, "", problems)
    for k in STAMP_REQUIRED:
        if k not in data:
            problems.append(f"{k}: missing; expected {STAMP[k].expect or STAMP[k].doc}")
    wifi = data.get("wifi")
    if isinstance(wifi, dict) and wifi:
        for k in ("country", "ssid", "psk_hash"):
            if k not in wifi:
                problems.append(f"wifi.{k}: missing; expected {WIFI[k].expect}")
    problems += pppoe_problems(data)
    return out, problems


def pppoe_problems(data: dict) -> list[str]:
    """A stamp (or unit.yml) with wan = "pppoe" carries the whole login, and a login only with it."""
    pppoe = data.get("pppoe") if isinstance(data.get("pppoe"), dict) else {}
    if data.get("wan") == "pppoe":
        return [f"pppoe.{k}: missing; wan = \"pppoe\" needs the ISP's login ({PPPOE[k].expect})"
                for k in PPPOE if k not in pppoe]
    if pppoe:
        return ['pppoe: given, but wan is not "pppoe"; add wan = "pppoe" (router mode) or leave the login out']
    return []
