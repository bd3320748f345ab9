"""The local HTTP API (stdlib socketserver + a small HTTP/1.1 parser). Listens on management/LAN addresses only.

    GET    /health                       open      status, version, node keys, unit, signed payout, caps
    GET    /metrics                      open      Prometheus text format
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
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
import socketserver
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

from . import __version__, receipts
from .agent import Agent, SessionError
from .ledger import LedgerError

log = logging.getLogger("idlewire.api")

CLOCK_SKEW = 120
_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_SID = re.compile(r"^[0-9a-f]{16}$")


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
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_VERSION = re.compile(r"^HTTP/(\d)\.(\d)$")
MAX_LINE = 8192
MAX_HEADERS = 64


class Handler(socketserver.StreamRequestHandler):
    """A small HTTP/1.1 server: request line, headers, a Content-Length body; keep-alive.

    Not http.server: that module brings email, html and mimetypes with it (~2 MB of the agent's
    RSS, for the whole life of the process) to parse a handful of headers. Anything this parser
    does not understand is a 4xx and the connection is closed.
    """

    timeout = 15  # a slow or silent client does not hold a thread for ever
    server_version = f"idlewire-agent/{__version__}"

    def handle(self) -> None:
        self.close_connection = False
        try:
            while not self.close_connection:
                try:
                    if not self._read_request():
                        return
                except ApiError as exc:
                    self.close_connection = True
                    self._send(exc.status, {"error": str(exc)})
                    return
                self._handle(self.command)
        except (TimeoutError, ConnectionError):  # the client went away or fell silent
            return

    def _read_request(self) -> bool:
        """Parse the next request's line and headers; False at a clean end of the connection."""
        line = self.rfile.readline(MAX_LINE + 1)
        if line in (b"\r\n", b"\n"):  # one empty line before a request is allowed (RFC 9112 2.2)
            line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            return False
        if len(line) > MAX_LINE:
            raise ApiError(414, f"request line longer than {MAX_LINE} bytes")
        words = line.decode("latin-1").rstrip("\r\n").split(" ")
        if len(words) != 3 or not _TOKEN.match(words[0]) or not words[1].startswith("/"):
            raise ApiError(400, "bad request line; expected METHOD /PATH HTTP/1.1")
        version = _VERSION.match(words[2])
        if not version or not (1, 0) <= (int(version[1]), int(version[2])) < (2, 0):
            raise ApiError(400, f"unsupported protocol {words[2][:20]!r}; expected HTTP/1.1 or HTTP/1.0")
        self.command, self.path, self.request_version = words
        headers = Headers()
        for n in range(MAX_HEADERS + 1):
            line = self.rfile.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                raise ApiError(431, f"header line longer than {MAX_LINE} bytes")
            if line in (b"\r\n", b"\n", b""):
                break
            if n == MAX_HEADERS:
                raise ApiError(431, f"more than {MAX_HEADERS} headers")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not _TOKEN.match(name):
                raise ApiError(400, "bad header line; expected Name: value")
            name, value = name.lower(), value.strip()
            if name in headers and name in ("content-length", "transfer-encoding", "host"):
                raise ApiError(400, f"{name}: given twice")
            headers.setdefault(name, value)
        self.headers = headers
        conn = headers.get("connection", "").lower()
        self.close_connection = conn == "close" or (self.request_version == "HTTP/1.0" and conn != "keep-alive")
        if headers.get("expect", "").lower() == "100-continue" and self.request_version == "HTTP/1.1":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def address_string(self) -> str:
        return str(self.client_address[0])

    @property
    def agent(self) -> Agent:
        return self.server.agent  # type: ignore[attr-defined]

    # --- plumbing -------------------------------------------------------------------------
    def _head(self, code: int, ctype: str, length: int | None) -> bytes:
        lines = [f"HTTP/1.1 {code} {_STATUS.get(code, '')}", f"Server: {self.server_version}",
                 "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()), f"Content-Type: {ctype}"]
        if length is None:  # the body ends when the connection does
            self.close_connection = True
        else:
            lines.append(f"Content-Length: {length}")
        if code >= 400:
            self.close_connection = True
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, code: int, body: dict | list | str, ctype: str = "application/json") -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        log.debug("%s %s %s -> %d", self.address_string(), getattr(self, "command", "-"),
                  getattr(self, "path", "-")[:200], code)
        self.wfile.write(self._head(code, ctype, len(data)) + data)

    def _send_stream(self, chunks) -> None:
        """200 with a JSON body written piece by piece (large receipt chains never sit in memory)."""
        self.wfile.write(self._head(200, "application/json", None))
        try:
            for chunk in chunks:
                self.wfile.write(chunk.encode())
        except (TimeoutError, ConnectionError):
            raise
        except Exception:  # the status line is out: all that is left is to cut the body short
            log.exception("%s %s: streaming the answer failed", self.command, self.path[:200])

    def _body(self) -> bytes:
        te = self.headers.get("Transfer-Encoding")
        if te:
            raise ApiError(411, "Transfer-Encoding is not supported; send a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not length.isdigit() or len(length) > 9:
            raise ApiError(400, "Content-Length: expected a number of bytes")
        n = int(length)
        if n > self.agent.cfg.api.max_body:
            raise ApiError(413, f"request body larger than {self.agent.cfg.api.max_body} bytes")
        data = self.rfile.read(n)
        if len(data) != n:
            raise ApiError(400, "request body shorter than Content-Length")
        return data

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
                raise ApiError(400, f"body: unknown field {str(k)[:40]!r}; expected {', '.join(fields)}")
        for k, kind in fields.items():
            v = data.get(k)
            if not isinstance(v, kind) or isinstance(v, bool):
                raise ApiError(400, f"body.{k}: expected {kind.__name__}")
            if kind is int and not 0 <= v < 1 << 62:
                raise ApiError(400, f"body.{k}: expected an integer >= 0")
            if kind is str and len(v) > 200:
                raise ApiError(400, f"body.{k}: too long")
        return data

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
        if not t.isdigit() or len(t) > 12 or abs(int(t) - time.time()) > CLOCK_SKEW:
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
    def _handle(self, method: str) -> None:
        try:
            if method not in ("GET", "POST", "DELETE", "PUT", "PATCH"):
                raise ApiError(405, f"method {method[:20]} not allowed; expected GET, POST or DELETE")
            body = self._body()
            self._route(method, body)
        except ApiError as exc:
            self._send(exc.status, {"error": str(exc)})
        except (SessionError, LedgerError) as exc:  # LedgerError: a full disk, 503 and one line
            self._send(exc.status, {"error": str(exc)})
        except Exception:
            log.exception("%s %s", method, self.path[:200])
            self._send(500, {"error": "internal error (logged)"})

    def _route(self, method: str, body: bytes) -> None:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = parse_qs(url.query, max_num_fields=10)
        a = self.agent
        if method == "GET" and parts == ["health"]:
            return self._send(200, {"status": "ok", "version": __version__, "node_key": a.node_pub,
                                    "wg_public_key": a.wg_pub, "region": a.cfg.region,
                                    "price_per_gb": a.cfg.price_per_gb, **a.offer()})
        if method == "GET" and parts == ["metrics"]:
            return self._send(200, a.metrics(), "text/plain; version=0.0.4")
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
                if not v.isdigit() or int(v) > top:
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



class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request, client_address):  # one line in the log, never a traceback on stderr
        log.warning("API connection from %s: %s", client_address[0], sys.exc_info()[1])


def _server(addr: str, port: int, agent: Agent) -> _Server:
    cls = type("S", (_Server,), {"address_family": socket.AF_INET6 if ":" in addr else socket.AF_INET})
    srv = cls((addr, port), Handler)
    srv.agent = agent  # type: ignore[attr-defined]
    return srv


def serve(listen: list[str], port: int, agent: Agent) -> list[_Server]:
    servers = [_server(a, port, agent) for a in listen]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True, name=f"api-{s.server_address}").start()
        log.info("API listening on %s port %d", s.server_address[0], s.server_address[1])
    return servers
