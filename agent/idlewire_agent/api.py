"""The local HTTP API (stdlib sockets + a small HTTP/1.1 parser). Listens on management/LAN addresses only.

    GET    /health                       open      status, version, node keys, unit, signed payout, caps
    GET    /metrics                      open      Prometheus text format (the agent's and the API's)
    POST   /sessions                     buyer     {"wg_public_key": KEY} -> session, address, node key
    GET    /sessions[?state=open&limit=100&offset=0]  buyer|admin  own sessions, or all for the admin
    GET    /sessions/ID                  buyer|admin
    DELETE /sessions/ID                  buyer|admin  close (also POST /sessions/ID/close)
    POST   /sessions/ID/usage            buyer     co-signed cumulative usage -> node receipt
    GET    /receipts?session=ID          buyer|admin  the session's receipt chain
    GET    /usage                        admin     lifetime, per day, per session totals

Buyer calls are signed with the buyer's ed25519 key (receipts.sign_request: method, path, time,
nonce and body hash; the time must be within 120 s and a nonce is accepted once: the ledger keeps
it while its time is in that window, across restarts). Admin calls carry
`Authorization: Bearer TOKEN` from the 0600 token file. Bad input is a 4xx, never a 5xx.

Under load (node.toml [api]): one thread reads every connection's request with a selector (no
thread waits on a slow client) until the WHOLE request, head and body, is in, within
`request_deadline` of its first byte being awaited; only then does one of a few worker threads
serve it. At most `max_connections` are open (fewer when the file limit is low: see `bounds`)
and `max_per_source` from one address (IPv6: one /64). A new connection beyond the total evicts
the oldest unfinished request of the address holding the most; beyond its source's share a
connection is refused with a 429.
Refusals, evictions and deadlines are counted in /metrics and logged at most once per 10 s.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hmac
import json
import logging
import queue
import re
import selectors
import socket
import threading
import time
from typing import ClassVar
from urllib.parse import parse_qs

from . import __version__, receipts
from .agent import Agent, SessionError
from .ledger import LedgerError

log = logging.getLogger("idlewire.api")

CLOCK_SKEW = 120
_NONCE = receipts.NONCE
_SID = re.compile(r"^[0-9a-f]{16}$")
_UINT = re.compile(r"^[0-9]{1,12}$")  # ASCII digits only: str.isdigit() also takes "²", which int() refuses


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Headers(dict):
    """Request headers by lower-case name (the first of repeated ones), `get` case-insensitive."""

    def get(self, name: str, default=None):
        return super().get(name.lower(), default)


_STATUS = {100: "Continue", 200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           409: "Conflict", 411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
           429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_TARGET = re.compile(r"^/[\x21-\x7e]*$")  # origin-form, printable ASCII (anything else percent-encoded)
_VALUE = re.compile(r"^[\t\x20-\x7e]*$")  # header values: visible ASCII, spaces and tabs
_VERSION = re.compile(r"^HTTP/(\d)\.(\d)$")
METHODS = ("GET", "POST", "DELETE", "PUT", "PATCH")
MAX_LINE = 8192  # request line, and each header line
MAX_HEADERS = 64
MAX_HEAD = 16384  # request line and headers together
ACCEPTS = 16  # new connections taken per listener between two reads of the open ones
WORKERS = 4  # requests are served only once they are fully read: a few threads suffice
FD_RESERVE = 64  # files kept free for the metering (wg, ip, SQLite), logging and the rest
LOG_EVERY = 10.0  # seconds between two lines about refused/slow clients


def parse_head(head: bytes) -> tuple[str, str, str, Headers]:
    """(method, target, version, headers) of a request head (without the blank line); ApiError on
    anything this server does not take: the message says what was expected."""
    lines = head.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    try:
        text = [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]
        words = text[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, IndexError):
        raise ApiError(400, "bad request line; expected METHOD /PATH HTTP/1.1 in ASCII") from None
    if len(text[0]) > MAX_LINE:
        raise ApiError(414, f"request line longer than {MAX_LINE} bytes")
    if len(words) != 3 or not _TOKEN.match(words[0]):
        raise ApiError(400, "bad request line; expected METHOD /PATH HTTP/1.1")
    method, target, version = words
    v = _VERSION.match(version)
    if not v or not (1, 0) <= (int(v[1]), int(v[2])) < (2, 0):
        raise ApiError(400, f"unsupported protocol {version[:20]!r}; expected HTTP/1.1 or HTTP/1.0")
    if not _TARGET.match(target):
        raise ApiError(400, "request target: expected /PATH of printable ASCII (percent-encode the rest)")
    if len(text) - 1 > MAX_HEADERS:
        raise ApiError(431, f"more than {MAX_HEADERS} headers")
    headers = Headers()
    for raw in text[1:]:
        if len(raw) > MAX_LINE:
            raise ApiError(431, f"header line longer than {MAX_LINE} bytes")
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ApiError(400, "header line: expected ASCII") from None
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):  # also obsolete line folding (a leading space)
            raise ApiError(400, "bad header line; expected Name: value")
        value = value.strip(" \t")
        if not _VALUE.match(value):
            raise ApiError(400, f"header {name[:40]}: control characters in the value")
        name = name.lower()
        if name in headers and name in ("content-length", "transfer-encoding", "host"):
            raise ApiError(400, f"{name}: given twice")
        headers.setdefault(name, value)
    return method, target, version, headers


def body_length(headers: Headers, max_body: int) -> int:
    """The body's length from Content-Length (0 without one); 4xx before a byte of it is read."""
    if headers.get("transfer-encoding") is not None:
        raise ApiError(411, "Transfer-Encoding is not supported; send a Content-Length")
    length = headers.get("content-length")
    if length is None:
        return 0
    if not re.match(r"^[0-9]{1,9}$", length):
        raise ApiError(400, "Content-Length: expected a number of bytes")
    if int(length) > max_body:
        raise ApiError(413, f"request body larger than {max_body} bytes (api.max_body)")
    return int(length)


def _response(code: int, body: bytes, ctype: str = "application/json", close: bool = False,
              length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {code} {_STATUS.get(code, '')}", f"Server: idlewire-agent/{__version__}",
             "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()), f"Content-Type: {ctype}"]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _error(code: int, message: str) -> bytes:
    return _response(code, json.dumps({"error": message}).encode(), close=True)


# --- one request, served by a worker ----------------------------------------------------------
class Exchange:
    """One fully read request: route it, answer it. Runs in a worker thread; the socket is blocking
    with a deadline for the answer (a client that does not read it loses its connection)."""

    def __init__(self, server: ApiServer, sock: socket.socket, peer: str, req: tuple, inline: bool = False):
        self.server, self.sock, self.peer, self.inline = server, sock, peer, inline
        self.stream = False
        self.leftover = b""  # what did not fit the socket buffer: the selector thread writes it
        self.command, self.path, self.request_version, self.headers, self.body = req
        conn = self.headers.get("connection", "").lower()
        self.close_connection = conn == "close" or (self.request_version == "HTTP/1.0" and conn != "keep-alive")
        self.deadline: float | None = None

    @property
    def agent(self) -> Agent:
        return self.server.agent

    # --- plumbing -------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        """Write an answer without waiting: what does not fit the socket buffer is left to the
        selector thread (a client that reads nothing holds no worker); inline (in the selector
        thread) all of it at once or not at all. A streamed answer is written here, within its
        deadline (request_deadline, and as long again per MiB)."""
        if not self.stream:
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            if n < len(data) and self.inline:
                raise BlockingIOError("the answer does not fit the socket buffer")
            self.leftover += data[n:]
            return
        now = time.monotonic()
        step = self.server.deadline
        self.deadline = (now + step if self.deadline is None else self.deadline) + step * len(data) / (1 << 20)
        if self.deadline <= now:
            raise TimeoutError("answer not read in time")
        self.sock.settimeout(self.deadline - now)
        self.sock.sendall(data)  # the timeout bounds the whole call (Python >= 3.5)

    def _send(self, code: int, body: dict | list | str, ctype: str = "application/json") -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        log.debug("%s %s %s -> %d", self.peer, self.command, self.path[:200], code)
        if code >= 400:
            self.close_connection = True
        self._write(_response(code, data, ctype, self.close_connection))

    def _send_stream(self, chunks) -> None:
        """200 with a JSON body written piece by piece (large receipt chains never sit in memory)."""
        self.close_connection = True  # the body ends when the connection does
        self.stream = True
        self._write(_response(200, b"", close=True, length=False))
        try:
            for chunk in chunks:
                self._write(chunk.encode())
        except OSError:
            raise
        except Exception as exc:  # the status line is out: all that is left is to cut the body short
            self.server.fault(self.command, self.path, exc)

    @staticmethod
    def _json(body: bytes, fields: dict[str, type]) -> dict:
        try:
            data = receipts.strict_loads(body.decode("utf-8"))  # no duplicated keys, NaN or Infinity
        except receipts.StrictJSONError as exc:
            raise ApiError(400, f"body: {exc}") from None
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ApiError(400, "body: expected a JSON object") from None
        if not isinstance(data, dict):
            raise ApiError(400, "body: expected a JSON object")
        for k in data:
            if k not in fields:
                raise ApiError(400, f"body: unknown field {ascii(k)[:40]}; expected {', '.join(fields)}")
        for k, kind in fields.items():
            v = data.get(k)
            if not isinstance(v, kind) or isinstance(v, bool):
                raise ApiError(400, f"body.{k}: expected {kind.__name__}")
            if kind is int and not 0 <= v < 1 << 62:
                raise ApiError(400, f"body.{k}: expected an integer >= 0")
            if kind is str and (len(v) > 200 or not (v.isascii() and v.isprintable())):
                raise ApiError(400, f"body.{k}: expected at most 200 printable ASCII characters")
        return data

    def _query(self) -> dict[str, list[str]]:
        query = self.path.partition("?")[2]
        try:
            return parse_qs(query, max_num_fields=10, errors="strict")
        except ValueError:  # too many fields, or percent-escapes that are not UTF-8
            raise ApiError(400, "query: expected at most 10 name=value fields in UTF-8") from None

    def _admin(self) -> bool:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return False
        if not hmac.compare_digest(auth[7:].strip().encode(), self.agent.admin_token.encode()):
            raise ApiError(401, "Authorization: wrong admin token")
        return True

    def _buyer(self, method: str, body: bytes) -> str | None:
        """The buyer key that signed this request, None when unsigned; 401 when signed badly."""
        key = self.headers.get("X-Idlewire-Key")
        if key is None:
            return None
        t, nonce = self.headers.get("X-Idlewire-Time", ""), self.headers.get("X-Idlewire-Nonce", "")
        sig = self.headers.get("X-Idlewire-Signature", "")
        if not _UINT.match(t) or abs(int(t) - time.time()) > CLOCK_SKEW:
            raise ApiError(401, f"X-Idlewire-Time: expected the current unix time (within {CLOCK_SKEW} s)")
        if not _NONCE.match(nonce):
            raise ApiError(401, "X-Idlewire-Nonce: expected 16-64 characters A-Z a-z 0-9 _ -")
        if len(key) > 100 or len(sig) > 200 or not receipts.request_valid(key, sig, method, self.path, t, nonce,
                                                                          body):
            raise ApiError(401, "X-Idlewire-Signature: not a valid signature of this request by X-Idlewire-Key")
        # Remembered (in the ledger, across restarts) for as long as the time stays in the window.
        if not self.agent.ledger.use_nonce(nonce, int(t) + CLOCK_SKEW + 1, time.time()):
            raise ApiError(401, "X-Idlewire-Nonce: already used (replayed request)")
        return key

    def _who(self, method: str, body: bytes) -> tuple[bool, str | None]:
        admin = self._admin()
        buyer = None if admin else self._buyer(method, body)
        if not admin and buyer is None:
            raise ApiError(401, "sign the request with your buyer key (X-Idlewire-*) or send the admin token")
        return admin, buyer

    def _session(self, sid: str, admin: bool, buyer: str | None) -> dict:
        if not _SID.match(sid):
            raise ApiError(404, "no such session")
        s = self.agent.ledger.session(sid)
        if s is None or not (admin or s["buyer_key"] == buyer):
            raise ApiError(404, "no such session")
        return s

    # --- dispatch -------------------------------------------------------------------------
    def handle(self) -> None:
        """Answer the request: a 4xx for the client's mistakes, a 500 (one log line) for ours."""
        try:
            self._route(self.command, self.body)
        except (ApiError, SessionError, LedgerError) as exc:  # LedgerError: a full disk, 503 and one line
            self._send(exc.status, {"error": str(exc)})
        except OSError:
            raise  # the client's connection: the caller closes it
        except Exception as exc:
            self.server.fault(self.command, self.path, exc)
            self._send(500, {"error": "internal error (logged)"})

    def _route(self, method: str, body: bytes) -> None:
        parts = [p for p in self.path.partition("?")[0].split("/") if p]
        query = self._query()
        a = self.agent
        if method == "GET" and parts == ["health"]:
            return self._send(200, {"status": "ok", "version": __version__, "node_key": a.node_pub,
                                    "wg_public_key": a.wg_pub, "region": a.cfg.region,
                                    "price_per_gb": a.cfg.price_per_gb, **a.offer()})
        if method == "GET" and parts == ["metrics"]:
            return self._send(200, a.metrics() + self.server.metrics(), "text/plain; version=0.0.4")
        if not parts or parts[0] not in ("sessions", "usage", "receipts"):
            raise ApiError(404, "not found; see /health, /metrics, /sessions, /usage, /receipts")
        admin, buyer = self._who(method, body)
        if parts == ["sessions"] and method == "POST":
            if buyer is None:
                raise ApiError(403, "sessions are opened by buyers: sign the request with your key")
            data = self._json(body, {"wg_public_key": str})
            return self._send(201, a.open_session(buyer, data["wg_public_key"]))
        if parts == ["sessions"] and method == "GET":
            state = query.get("state", [None])[0]
            if state not in (None, "open", "closed"):
                raise ApiError(400, "state: expected open or closed")
            page = []
            for name, default, top in (("limit", 100, 1000), ("offset", 0, 1 << 30)):
                v = query.get(name, [str(default)])[0]
                if not _UINT.match(v) or int(v) > top:
                    raise ApiError(400, f"{name}: expected an integer 0-{top}")
                page.append(int(v))
            rows = a.ledger.sessions(state, None if admin else buyer, *page)
            return self._send(200, [a.describe(s["id"]) for s in rows])
        if len(parts) >= 2 and parts[0] == "sessions":
            s = self._session(parts[1], admin, buyer)
            if len(parts) == 2 and method == "GET":
                return self._send(200, a.describe(s["id"]))
            if (len(parts) == 2 and method == "DELETE") or (parts[2:] == ["close"] and method == "POST"):
                return self._send(200, a.close_session(s["id"], "admin" if admin else "buyer"))
            if parts[2:] == ["usage"] and method == "POST":
                if buyer is None:
                    raise ApiError(403, "usage is co-signed by the buyer")
                data = self._json(body, {"up": int, "down": int, "time": int, "key": str, "sig": str})
                return self._send(200, a.cosign(s["id"], buyer, data))
            if parts[2:] == ["receipts"] and method == "GET":
                return self._send_stream(a.receipts_json(s["id"]))
            raise ApiError(404 if method in ("GET", "POST", "DELETE") else 405, "not found")
        if parts == ["receipts"] and method == "GET":
            sid = query.get("session", [""])[0]
            s = self._session(sid, admin, buyer)
            return self._send_stream(a.receipts_json(s["id"]))
        if parts == ["usage"] and method == "GET":
            if not admin:
                raise ApiError(403, "usage totals are for the admin token")
            return self._send(200, a.usage())
        raise ApiError(405 if parts[0] in ("sessions", "usage", "receipts") else 404, "method not allowed here")


# --- connections: one selector thread reads, a few workers answer --------------------------------
class _Conn:
    __slots__ = ("buf", "closing", "deadline", "keep", "need", "out", "peer", "req", "served", "sock", "source",
                 "started")

    def __init__(self, sock: socket.socket, peer: str, source: str, deadline: float):
        self.sock, self.peer, self.source = sock, peer, source
        self.buf = bytearray()
        self.deadline = deadline
        self.req: tuple | None = None  # (method, target, version, headers) once the head is in
        self.need = 0  # bytes of body still awaited after the head
        self.closing = False  # answered with an error: draining what the client still sends
        self.started = False  # the client sent something for this request
        self.served = 0  # requests answered on this connection
        self.out = b""  # the rest of an answer, written as the client reads
        self.keep = False  # keep the connection open once `out` is written


def source_of(addr: str) -> str:
    """What `max_per_source` counts by: the IPv4 address, or the IPv6 /64 (one LAN host has many)."""
    if ":" not in addr:
        return addr
    try:
        return socket.inet_pton(socket.AF_INET6, addr.split("%")[0])[:8].hex() + "::/64"
    except OSError:
        return addr


def nofile_limit() -> int:
    """The process's soft limit of open files (LimitNOFILE / procd's `limits nofile`)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def bounds(max_connections: int, max_per_source: int, nofile: int) -> tuple[int, int]:
    """(total, per source) connections the API allows under a file limit of `nofile`: at most half
    of what is left after FD_RESERVE, so the metering's `wg`/`ip` pipes and the ledger's files
    always find a descriptor however many clients trickle in."""
    total = max(4, min(max_connections, (nofile - FD_RESERVE) // 2))
    return total, max(1, min(max_per_source, total))


class _Notes:
    """Counts of refused and slow clients for /metrics, and at most one log line per LOG_EVERY s."""

    WHAT: ClassVar[dict[str, str]] = {"refused_total": "refused (api.max_connections reached, none to evict)",
            "refused_source": "refused (api.max_per_source reached)",
            "evicted": "evicted (oldest unfinished request, api.max_connections reached)",
            "deadline": "cut off (request not complete within api.request_deadline)",
            "slow_reader": "cut off (answer not read in time)",
            "malformed": "answered 4xx (malformed request)",
            "accept_failed": "not accepted (out of file descriptors)"}

    def __init__(self):
        self.total = dict.fromkeys(self.WHAT, 0)
        self.pending: collections.Counter = collections.Counter()
        self.sources: collections.Counter = collections.Counter()
        self.last = -LOG_EVERY
        self.lock = threading.Lock()

    def add(self, kind: str, source: str) -> None:
        with self.lock:
            self.total[kind] += 1
            self.pending[kind] += 1
            self.sources[source] += 1
        self.flush()

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            if not self.pending or (now - self.last < LOG_EVERY and not force):
                return
            what = "; ".join(f"{n} {self.WHAT[k]}" for k, n in self.pending.items())
            top = ", ".join(f"{s} ({n})" for s, n in self.sources.most_common(3))
            self.pending.clear()
            self.sources.clear()
            self.last = now
        log.warning("API clients: %s; from %s (at most one such line per %g s)", what, top, LOG_EVERY)


class ApiServer:
    def __init__(self, agent: Agent, listeners: list[socket.socket], max_connections: int, max_per_source: int,
                 deadline: float):
        self.agent = agent
        self.listeners = listeners
        self.max_connections, self.max_per_source, self.deadline = max_connections, max_per_source, deadline
        self.max_body = agent.cfg.api.max_body
        self.sel = selectors.DefaultSelector()
        for ls in listeners:
            ls.setblocking(False)
            self.sel.register(ls, selectors.EVENT_READ, "listen")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.waiting: dict[_Conn, None] = {}  # reading a request or draining, oldest first
        self.busy = 0  # connections whose request a worker serves
        self.per_source: collections.Counter = collections.Counter()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.done: collections.deque = collections.deque()
        self.notes = _Notes()
        self.faults = 0
        self._fault_log = 0.0
        self._paused_until = 0.0
        self._stop = False
        self._threads = [threading.Thread(target=self._work, daemon=True, name=f"api-worker-{i}")
                         for i in range(WORKERS)]
        self._threads.append(threading.Thread(target=self._loop, daemon=True, name="api"))

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake()
        for _ in range(WORKERS):
            self.jobs.put(None)
        self._threads[-1].join(5)

    def metrics(self) -> str:
        gauges = [("idlewire_api_connections", "gauge", "Open API connections", len(self.waiting) + self.busy),
                  ("idlewire_api_max_connections", "gauge", "API connections allowed (file limit applied)",
                   self.max_connections),
                  ("idlewire_api_errors_total", "counter", "API requests answered 500 (internal faults)", self.faults)]
        out = []
        for name, kind, help_, value in gauges:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        out += ["# HELP idlewire_api_clients_total API clients refused, evicted or cut off, by reason",
                "# TYPE idlewire_api_clients_total counter"]
        out += [f'idlewire_api_clients_total{{reason="{k}"}} {v}' for k, v in self.notes.total.items()]
        return "\n".join(out) + "\n"

    def fault(self, method: str, path: str, exc: BaseException) -> None:
        """An internal fault: one log line (where, what), at most one per LOG_EVERY s, no traceback."""
        self.faults += 1
        now = time.monotonic()
        if now - self._fault_log < LOG_EVERY:
            return
        self._fault_log = now
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else "?"
        log.error("%s %s: internal error at %s: %s: %s (%d so far)", method[:10], path[:100], where,
                  type(exc).__name__, str(exc)[:200], self.faults)

    # --- the selector thread --------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # the pipe is full: the loop is awake anyway
            self._wake_w.send(b"x")

    def _loop(self) -> None:
        sweep = 0.0
        while not self._stop:
            now = time.monotonic()
            if self._paused_until and now >= self._paused_until:
                self._paused_until = 0.0
                for ls in self.listeners:
                    self.sel.register(ls, selectors.EVENT_READ, "listen")
            events = self.sel.select(timeout=0.25)
            # Requests already connected first, then at most ACCEPTS new connections per listener:
            # a burst of new ones cannot evict a client before its request, already sent, is read.
            events.sort(key=lambda e: e[0].data == "listen")
            for key, mask in events:
                self._guarded(self._event, key, mask)
            while self.done:
                self._guarded(self._returned, *self.done.popleft())
            now = time.monotonic()
            if now >= sweep:
                sweep = now + 0.25
                for c in [c for c in self.waiting if c.deadline <= now]:
                    self._guarded(self._expired, c)
                self.notes.flush()
        for c in list(self.waiting):
            self._close(c)
        for ls in self.listeners:
            ls.close()

    def _guarded(self, fn, *args) -> None:
        """Run one step of the loop; a fault in it costs its connection (one log line), never the loop."""
        try:
            fn(*args)
        except Exception as exc:
            self.fault("-", "(connection handling)", exc)
            c = next((a.data if isinstance(a, selectors.SelectorKey) else a for a in args[:1]), None)
            if isinstance(c, _Conn) and c.sock.fileno() >= 0:
                with contextlib.suppress(Exception):
                    self._close(c)

    def _expired(self, c: _Conn) -> None:
        """Past its deadline: a request not complete (408), an answer not read, or a drain done."""
        if c.out:
            self.notes.add("slow_reader", c.source)
        elif not c.closing and (c.started or not c.served):  # not an idle keep-alive
            self.notes.add("deadline", c.source)
            if c.started:
                self._reject(c, 408, f"request not complete within {self.deadline:g} s")
        self._close(c)

    def _event(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data == "listen":
            self._accept(key.fileobj)
        elif key.data == "wake":
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
        elif mask & selectors.EVENT_WRITE:
            self._writable(key.data)
        else:
            self._readable(key.data)

    def _accept(self, ls: socket.socket) -> None:
        for _ in range(ACCEPTS):
            try:
                sock, addr = ls.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and not self._paused_until:
                    # Out of descriptors (someone else in the process used them): leave new
                    # connections in the kernel's backlog for a moment instead of spinning.
                    self.notes.add("accept_failed", "-")
                    for listener in self.listeners:
                        self.sel.unregister(listener)
                    self._paused_until = time.monotonic() + 0.5
                return
            peer = str(addr[0])
            source = source_of(peer)
            if self.per_source[source] >= self.max_per_source:
                self.notes.add("refused_source", source)
                self._refuse(sock, 429, f"more than {self.max_per_source} connections from {peer}")
                continue
            if len(self.waiting) + self.busy >= self.max_connections:
                victim = self._victim()
                if victim is None:  # every slot serves a request: nothing is slow, the node is busy
                    self.notes.add("refused_total", source)
                    self._refuse(sock, 503, "the node's API is busy; try again in a few seconds")
                    continue
                if not victim.closing and not victim.out:
                    self.notes.add("evicted", victim.source)
                    self._reject(victim, 503, "evicted: the API is full and your address holds the most "
                                              "unfinished requests")
                self._close(victim)
            sock.setblocking(False)
            c = _Conn(sock, peer, source, time.monotonic() + self.deadline)
            self.per_source[source] += 1
            self.waiting[c] = None
            self.sel.register(sock, selectors.EVENT_READ, c)

    def _victim(self) -> _Conn | None:
        """The connection to give up when all are taken: one already answered and draining, else the
        oldest unfinished one of the address holding the most. A client that sends its request at
        once is never the one, however many addresses the slow ones come from, unless it is the
        oldest of the busiest."""
        victim, most = None, 0
        for c in self.waiting:  # oldest first
            if c.closing:
                return c
            n = self.per_source[c.source]
            if n > most:
                victim, most = c, n
        return victim

    @staticmethod
    def _refuse(sock: socket.socket, code: int, message: str) -> None:
        """A short answer (it fits any socket buffer) and the close, without waiting for anything."""
        try:
            sock.setblocking(False)
            sock.send(_error(code, message))
        except OSError:
            pass
        sock.close()

    def _reject(self, c: _Conn, code: int, message: str) -> None:
        """Answer a request that will not be served, then drain the connection briefly: closing it
        with unread data would reset it and the client might never read the answer."""
        try:
            c.sock.send(_error(code, message))
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        c.closing = True
        c.deadline = min(c.deadline, time.monotonic() + 1.0)

    def _readable(self, c: _Conn) -> None:
        room = 65536 if c.closing else (MAX_HEAD + 1 if c.req is None else c.need) - len(c.buf)
        try:
            data = c.sock.recv(max(room, 1))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(c)
            return
        if c.closing:
            return
        c.started = True
        c.buf += data
        try:
            self._progress(c)
        except ApiError as exc:
            self.notes.add("malformed", c.source)
            self._reject(c, exc.status, str(exc))

    def _progress(self, c: _Conn) -> None:
        """Serve what the bytes hold: /health here at once, every other request by a worker."""
        while (req := self._request(c)) is not None:
            if req[:2] != ("GET", "/health"):
                self.sel.unregister(c.sock)
                del self.waiting[c]
                self.busy += 1
                self.jobs.put((c, req))
                return
            # /health never waits for a worker (they may all wait for the ledger behind a slow
            # `wg`): its answer fits any socket buffer, written here without blocking.
            ex = Exchange(self, c.sock, c.peer, req, inline=True)
            try:
                ex.handle()
            except OSError as exc:  # gone, or a keep-alive client that reads nothing of what it asks for
                if isinstance(exc, BlockingIOError):
                    self.notes.add("slow_reader", c.source)
                self._close(c)
                return
            self.waiting.pop(c)
            self._answered(c, not ex.close_connection)
            if c.closing:
                return

    def _request(self, c: _Conn) -> tuple | None:
        """The next complete request on `c` (method, target, version, headers, body), else None."""
        if c.req is None:
            while c.buf[:2] == b"\r\n" or c.buf[:1] == b"\n":  # empty lines before a request (RFC 9112 2.2)
                del c.buf[:2 if c.buf[:1] == b"\r" else 1]
            ends = [i for i in (c.buf.find(b"\n\r\n"), c.buf.find(b"\n\n")) if i >= 0]
            if not ends:
                if b"\n" not in c.buf and len(c.buf) > MAX_LINE:
                    raise ApiError(414, f"request line longer than {MAX_LINE} bytes")
                if len(c.buf) > MAX_HEAD or len(c.buf) - c.buf.rfind(b"\n") - 1 > MAX_LINE:
                    raise ApiError(431, f"request head longer than {MAX_HEAD} bytes or a line over {MAX_LINE}")
                return None
            end = min(ends)
            head_end = end + (3 if c.buf[end:end + 3] == b"\n\r\n" else 2)
            if end + 1 > MAX_HEAD:
                raise ApiError(431, f"request head longer than {MAX_HEAD} bytes")
            method, target, version, headers = parse_head(bytes(c.buf[:end + 1]))
            if method not in METHODS:
                raise ApiError(405, f"method {method[:20]} not allowed; expected GET, POST or DELETE")
            c.need = body_length(headers, self.max_body)
            c.req = (method, target, version, headers)
            del c.buf[:head_end]
            if (c.need > len(c.buf) and version == "HTTP/1.1"
                    and headers.get("expect", "").lower() == "100-continue"):
                with contextlib.suppress(OSError):
                    c.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if len(c.buf) < c.need:
            return None
        body = bytes(c.buf[:c.need])
        del c.buf[:c.need]
        req = (*c.req, body)
        c.req, c.need = None, 0
        return req

    def _returned(self, c: _Conn, keep: bool, out: bytes) -> None:
        """A worker answered: write the rest of the answer, then wait for the connection's next
        request, or drain and close it."""
        self.busy -= 1
        try:
            c.sock.setblocking(False)
            self.sel.register(c.sock, selectors.EVENT_WRITE if out else selectors.EVENT_READ, c)
        except (OSError, ValueError):
            self._close(c)
            return
        if out:  # no more requests are read until the client has read this answer
            c.out, c.keep = out, keep
            c.deadline = time.monotonic() + self.deadline
            self.waiting[c] = None
            return
        self._next(c, keep)

    def _writable(self, c: _Conn) -> None:
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self._close(c)
            return
        c.out = c.out[n:]
        if not c.out:
            self.sel.modify(c.sock, selectors.EVENT_READ, c)
            del self.waiting[c]
            self._next(c, c.keep)

    def _next(self, c: _Conn, keep: bool) -> None:
        self._answered(c, keep)
        if c.buf and not c.closing:  # the next request came with the last one (pipelining)
            try:
                self._progress(c)
            except ApiError as exc:
                self.notes.add("malformed", c.source)
                self._reject(c, exc.status, str(exc))

    def _answered(self, c: _Conn, keep: bool) -> None:
        """After an answer: the deadline starts again for the next request, or the connection drains."""
        c.served += 1
        c.deadline = time.monotonic() + self.deadline
        c.started = bool(c.buf)
        self.waiting[c] = None  # the youngest again
        if not keep:
            c.closing = True
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_WR)
            c.deadline = time.monotonic() + 1.0

    def _close(self, c: _Conn) -> None:
        self.waiting.pop(c, None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        c.sock.close()
        self.per_source[c.source] -= 1
        if self.per_source[c.source] <= 0:
            del self.per_source[c.source]

    # --- workers --------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            c, req = job
            keep, out = False, b""
            try:
                ex = Exchange(self, c.sock, c.peer, req)
                ex.handle()
                keep, out = not ex.close_connection, ex.leftover
            except (TimeoutError, BlockingIOError):  # a streamed answer not read in time
                self.notes.add("slow_reader", c.source)
            except OSError:  # the client went away
                pass
            except Exception as exc:
                self.fault(req[0], req[1], exc)
            self.done.append((c, keep, out))
            self._wake()


def serve(listen: list[str], port: int, agent: Agent) -> list[ApiServer]:
    api = agent.cfg.api
    nofile = nofile_limit()
    total, per_source = bounds(api.max_connections, api.max_per_source, nofile)
    if total < api.max_connections:
        log.warning("API: at most %d connections, not api.max_connections = %d: the file limit is %d "
                    "(raise LimitNOFILE / procd's limits nofile)", total, api.max_connections, nofile)
    listeners = []
    try:
        for a in listen:
            listeners.append(socket.create_server((a, port), family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                                                  backlog=128))
    except OSError:
        for ls in listeners:
            ls.close()
        raise
    srv = ApiServer(agent, listeners, total, per_source, api.request_deadline)
    srv.start()
    for ls in listeners:
        log.info("API listening on %s port %d", *ls.getsockname()[:2])
    log.info("API: at most %d connections, %d per source, %g s per request (file limit %d)", total, per_source,
             api.request_deadline, nofile)
    return [srv]
