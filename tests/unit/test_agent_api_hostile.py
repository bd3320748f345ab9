"""The agent's API server under hostile input and load, on loopback: the real server (api.serve) in
front of a real Agent and ledger (a synthetic WireGuard counter source). Every malformed request is
a 4xx with a one-line JSON error and nothing in the log but counted warnings; slow and excess
connections are bounded per source and in total; a request has a deadline for the whole of it.
tests/net/test_agent_api_load.py runs the agent itself in a namespace under 1,000 trickling clients."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import socket
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from idlewire_agent import api, keys, receipts
from idlewire_agent.agent import Agent
from idlewire_agent.config import ConfigError, parse
from synthetic import SyntheticTunnel

BUYER = Ed25519PrivateKey.generate()


class Log(logging.Handler):
    """Every record the agent logs, and whether any carried a traceback."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def lines(self, level=logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    def tracebacks(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.exc_info or r.stack_info or "Traceback" in r.getMessage()]


class Node:
    def __init__(self, tmp, **api_over):
        cfg = {"node": {"state_dir": str(tmp / "state"), "key_file": str(tmp / "node.key")},
               "tunnel": {"pool": "10.99.0.0/24", "private_key_file": str(tmp / "wg.key")},
               "api": {"admin_token_file": str(tmp / "admin.token"), "max_body": 4096, **api_over}}
        self.agent = Agent(parse(cfg), SyntheticTunnel())
        self.log = Log()
        logging.getLogger("idlewire").addHandler(self.log)
        logging.getLogger("idlewire").setLevel(logging.INFO)
        self.thread_errors: list = []
        self._hook, threading.excepthook = threading.excepthook, self.thread_errors.append
        self.server = api.serve(["127.0.0.1"], 0, self.agent)[0]
        self.port = self.server.listeners[0].getsockname()[1]
        self.token = self.agent.admin_token

    def close(self):
        self.server.shutdown()
        threading.excepthook = self._hook
        logging.getLogger("idlewire").removeHandler(self.log)
        self.agent.ledger.close()

    def connect(self, source: str = "127.0.0.1", timeout: float = 5) -> socket.socket:
        s = socket.socket()
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect(("127.0.0.1", self.port))
        return s

    def exchange(self, data: bytes, source: str = "127.0.0.1", timeout: float = 5) -> list[tuple[int, bytes]]:
        """Send `data`, end the sending side, and read every answer until the server closes."""
        with self.connect(source, timeout) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:  # the server answered and closed before taking everything
                pass
            return responses(read_all(s))

    def status(self, data: bytes, **kw) -> int:
        """The status of the first answer (0: closed without one)."""
        r = self.exchange(data, **kw)
        return r[0][0] if r else 0

    def health_ms(self, source: str = "127.0.0.1") -> float:
        t = time.monotonic()
        assert self.status(b"GET /health HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n", source=source) == 200
        return (time.monotonic() - t) * 1000


def read_all(s: socket.socket) -> bytes:
    buf = b""
    try:
        while chunk := s.recv(65536):
            buf += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return buf


def responses(buf: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each HTTP answer in `buf`, parsed by their lengths (bodies may say anything)."""
    out = []
    while buf.startswith(b"HTTP/1.1 "):
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if not sep:
            break
        status = int(head[9:12])
        if status == 100:
            buf = rest
            continue
        m = re.search(rb"\r\ncontent-length: (\d+)", head, re.I)
        n = int(m[1]) if m else len(rest)
        out.append((status, rest[:n]))
        buf = rest[n:]
    return out


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    h = {"Host": "node", "Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return head.encode("latin-1") + body


def signed(method: str, path: str, body: bytes) -> dict:
    return receipts.sign_request(BUYER, method, path, body, int(time.time()), secrets.token_hex(16))


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("api"))
    yield n
    n.close()


def no_faults(node: Node) -> None:
    assert node.server.faults == 0
    assert not node.log.tracebacks()
    assert not node.log.lines(logging.ERROR)
    assert not node.thread_errors


# --- malformed requests: the classes, one example or more each --------------------------------
def test_known_malformed_requests_are_4xx_with_a_one_line_json_error(node):
    admin = {"Authorization": f"Bearer {node.token}"}
    sid_body = json.dumps({"wg_public_key": keys.wg_keypair()[1]}).encode()
    cases = {
        # request line
        b"GARBAGE\r\n\r\n": 400, b"GET / HTTP/x.y\r\n\r\n": 400, b"GET / HTTP/3.0\r\n\r\n": 400,
        b"GET  /health HTTP/1.1\r\n\r\n": 400, b"GET health HTTP/1.1\r\n\r\n": 400,
        b"GET /h\xe9alth HTTP/1.1\r\n\r\n": 400, b"GET /he\x00lth HTTP/1.1\r\n\r\n": 400,
        b"\xff\xfe GET / HTTP/1.1\r\n\r\n": 400, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n": 414,
        b"G\xc3\x89T /health HTTP/1.1\r\n\r\n": 400,
        # methods
        request("TRACE", "/health"): 405, request("HEAD", "/health"): 405, request("PUT", "/usage", b"", admin): 405,
        # headers
        b"GET /health HTTP/1.1\r\nX-A: b\x00c\r\n\r\n": 400, b"GET /health HTTP/1.1\r\nX-A: \xff\r\n\r\n": 400,
        b"GET /health HTTP/1.1\r\nX-A: b\rc\r\n\r\n": 400, b"GET /health HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n": 400,
        b"GET /health HTTP/1.1\r\nX A: b\r\n\r\n": 400, b"GET /health HTTP/1.1\r\nnocolon\r\n\r\n": 400,
        b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n": 431,
        b"GET /health HTTP/1.1\r\nX-A: " + b"b" * 9000 + b"\r\n\r\n": 431,
        b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: " % i + b"b" * 6000 + b"\r\n" for i in range(3)) + b"\r\n": 431,
        # lengths
        b"POST /sessions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}": 400,
        b"POST /sessions HTTP/1.1\r\nContent-Length: \xc2\xb2\r\n\r\n{}": 400,
        "POST /sessions HTTP/1.1\r\nContent-Length: ²\r\n\r\n{}".encode("latin-1"): 400,
        b"POST /sessions HTTP/1.1\r\nContent-Length: -1\r\n\r\n": 400,
        b"POST /sessions HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n": 400,
        b"POST /sessions HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n": 400,
        b"POST /sessions HTTP/1.1\r\nContent-Length: 5000\r\n\r\n": 413,
        b"POST /sessions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n": 411,
        # paths and queries
        request("GET", "//[health", b"", admin): 404, request("GET", "/sessions/../../etc/passwd", b"", admin): 404,
        request("GET", "/sessions/%2e%2e/%2e%2e", b"", admin): 404, request("GET", "/%00", b"", admin): 404,
        request("GET", "/sessions?" + "&".join(f"a{i}=1" for i in range(50)), b"", admin): 400,
        request("GET", "/sessions?limit=%ff%fe", b"", admin): 400,
        request("GET", "/sessions?limit=%C2%B2", b"", admin): 400,
        request("GET", "/sessions?limit=" + "9" * 40, b"", admin): 400,
        request("GET", "/sessions?limit=-1", b"", admin): 400, request("GET", "/sessions?state=x", b"", admin): 400,
        request("GET", "/receipts?session=%00", b"", admin): 404,
        # authentication
        request("GET", "/usage", b"", {"Authorization": "Bearer wrong"}): 401,
        request("GET", "/usage"): 401,
        request("GET", "/usage", b"", {"X-Idlewire-Key": "x", "X-Idlewire-Time": "²"}): 400,  # not ASCII
        request("GET", "/usage", b"", {"X-Idlewire-Key": "x", "X-Idlewire-Time": "9" * 30}): 401,
        request("GET", "/usage", b"", {"X-Idlewire-Key": "x" * 1000, "X-Idlewire-Time": str(int(time.time())),
                                       "X-Idlewire-Nonce": "n" * 20, "X-Idlewire-Signature": "%%%"}): 401,
    }
    # JSON bodies of signed requests: bad UTF-8, bad JSON, wrong types, huge values, deep nesting
    for body in (b"\xff\xfe{}", b"{", b"[]", b"null", b'{"wg_public_key": 5}', b'{"wg_public_key": "\\ud800"}',
                 b'{"wg_public_key": "' + b"A" * 300 + b'"}', b'{"wg_public_key": "\xc3\xa9"}',
                 b'{"wg_public_key": NaN}', b'{"wg_public_key": ' + b"9" * 4000 + b"}", b"[" * 2000 + b"]" * 2000,
                 b'{"wg_public_key": "x", "extra": 1}', b'{"\\u0000": 1}', sid_body.replace(b"=", b"\\u0000")):
        cases[request("POST", "/sessions", body, signed("POST", "/sessions", body))] = 400
    failed = []
    for data, want in cases.items():
        got = node.exchange(data)
        status, body = got[0] if got else (0, b"")
        lines = body.decode("ascii", "replace").splitlines()
        ok = status == want and len(lines) == 1 and set(json.loads(body)) == {"error"}
        if not ok:
            failed.append((data[:80], want, status, body[:200]))
    assert not failed, failed
    no_faults(node)
    assert node.health_ms() < 2000


def test_a_signed_session_and_usage_with_bad_statements_are_4xx(node):
    body = json.dumps({"wg_public_key": keys.wg_keypair()[1]}).encode()
    r = node.exchange(request("POST", "/sessions", body, signed("POST", "/sessions", body)))
    assert r[0][0] == 201
    sid = json.loads(r[0][1])["session"]
    path = f"/sessions/{sid}/usage"
    for stmt in ({"up": -1, "down": 0, "time": 0, "key": "k", "sig": "s"},
                 {"up": 1 << 70, "down": 0, "time": 0, "key": "k", "sig": "s"},
                 {"up": 1.5, "down": 0, "time": 0, "key": "k", "sig": "s"},
                 {"up": 0, "down": 0, "time": 0, "key": "\u00e9", "sig": "s"},
                 {"up": 0, "down": 0, "time": 0, "key": receipts.pub_b64(BUYER), "sig": "A" * 88},
                 {"up": True, "down": 0, "time": 0, "key": "k", "sig": "s"}):
        data = json.dumps(stmt).encode()
        assert node.status(request("POST", path, data, signed("POST", path, data))) == 400, stmt
    no_faults(node)


# --- hypothesis: the parser over bytes ------------------------------------------------------------
FUZZ = {"cases": 0, "5xx": 0, "answered": 0}


def fuzz_one(node: Node, data: bytes) -> None:
    FUZZ["cases"] += 1
    got = node.exchange(data, timeout=5)
    FUZZ["answered"] += bool(got)
    bad = [s for s, _ in got if s >= 500]
    FUZZ["5xx"] += len(bad)
    assert not bad, (data[:300], got)


TOKENS = [b"GET", b"POST", b"DELETE", b"PUT", b"PATCH", b"HEAD", b"OPTIONS", b"G\xc3\x89T", b"", b"get"]
TARGETS = [b"/health", b"/metrics", b"/sessions", b"/sessions/0123456789abcdef", b"/sessions/0123456789abcdef/usage",
           b"/sessions/0123456789abcdef/close", b"/sessions/0123456789abcdef/receipts", b"/receipts?session=x",
           b"/usage", b"/", b"//", b"/..", b"/sessions?limit=10&offset=5&state=open", b"*", b"http://x/health"]
NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect", b"Authorization",
         b"X-Idlewire-Key", b"X-Idlewire-Time", b"X-Idlewire-Nonce", b"X-Idlewire-Signature", b"Content-Type"]
piece = st.binary(max_size=40)
header = st.tuples(st.sampled_from(NAMES) | piece, st.sampled_from([b": ", b":", b" : ", b"", b":\t"]),
                   st.sampled_from([b"0", b"5", b"close", b"keep-alive", b"100-continue", b"chunked", b"Bearer x",
                                    b"99999999999", b"\xc2\xb2"]) | piece)
eol = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n", b""])


@st.composite
def structured(draw) -> bytes:
    """A request put together from plausible and random byte pieces."""
    line = draw(st.sampled_from(TOKENS) | piece) + draw(st.sampled_from([b" ", b"  ", b"\t", b""])) + \
        draw(st.sampled_from(TARGETS) | piece.map(lambda p: b"/" + p)) + \
        draw(st.binary(max_size=30).map(lambda q: b"?" + q) | st.just(b"")) + b" " + \
        draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.10", b"http/1.1"]) | piece)
    heads = b"".join(n + s + v + draw(eol) for n, s, v in draw(st.lists(header, max_size=8)))
    body = draw(st.binary(max_size=200))
    if draw(st.booleans()):
        heads += b"Content-Length: " + str(len(body) + draw(st.integers(-3, 3))).encode() + b"\r\n"
    return line + draw(eol) + heads + draw(eol) + body + draw(st.binary(max_size=40) | st.just(b""))


def valid_requests(node: Node) -> list[bytes]:
    """Well-formed requests of every route: the fuzzer's mutations start from these."""
    admin = {"Authorization": f"Bearer {node.token}"}
    body = json.dumps({"wg_public_key": keys.wg_keypair()[1]}).encode()
    usage = json.dumps({"up": 1, "down": 2, "time": 3, "key": receipts.pub_b64(BUYER), "sig": "A" * 88}).encode()
    return [request("GET", "/health"), request("GET", "/metrics"), request("GET", "/usage", b"", admin),
            request("GET", "/sessions?state=open&limit=5", b"", admin),
            request("POST", "/sessions", body, signed("POST", "/sessions", body)),
            request("POST", "/sessions/0123456789abcdef/usage", usage,
                    signed("POST", "/sessions/0123456789abcdef/usage", usage)),
            b"GET /health HTTP/1.1\r\nHost: n\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n"]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A valid request with bytes flipped, inserted, deleted or cut off."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut", "dup"]))
        if op == "flip" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[i:]
        elif op == "dup":
            data[i:i] = data[i:i + draw(st.integers(1, 40))]
    return bytes(data)


def test_fuzz_the_parser_over_bytes_never_5xx(node):
    seeds = valid_requests(node)
    run = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    given(st.binary(max_size=2000))(run(lambda data: fuzz_one(node, data)))()
    given(structured())(run(lambda data: fuzz_one(node, data)))()
    given(mutated(seeds))(run(lambda data: fuzz_one(node, data)))()
    print(f"\nAPI fuzz (bytes, loopback, real server and agent): {FUZZ['cases']} cases, {FUZZ['answered']} answered, "
          f"5xx: {FUZZ['5xx']}")
    assert FUZZ["cases"] >= 4000 and FUZZ["5xx"] == 0
    no_faults(node)
    assert node.health_ms() < 2000


# --- load: bounds per source and in total, the whole-request deadline -------------------------------
def test_bounds_follow_the_file_limit():
    assert api.bounds(128, 16, 4096) == (128, 16)
    assert api.bounds(128, 16, 256) == (96, 16)
    assert api.bounds(128, 200, 100) == (18, 18)
    assert api.bounds(65535, 16, 1024) == ((1024 - api.FD_RESERVE) // 2, 16)


@pytest.fixture
def small(tmp_path):
    n = Node(tmp_path, max_connections=24, max_per_source=4, request_deadline=1.5)
    yield n
    n.close()


def open_slow(node: Node, source: str, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = node.connect(source)
        s.sendall(b"GET /health HTTP/1.1\r\n")  # and never the rest
        out.append(s)
    return out


def answer_of(s: socket.socket) -> int:
    r = responses(read_all(s))
    return r[0][0] if r else 0


def test_excess_connections_from_one_source_are_refused_with_429(small):
    socks = open_slow(small, "127.0.0.2", 10)
    time.sleep(0.3)
    refused = []
    for s in socks:
        s.settimeout(0.2)
        try:
            data = s.recv(4096)
        except TimeoutError:
            continue
        refused.append(responses(data)[0][0] if data else 0)
    assert refused == [429] * 6  # four kept, six refused at once
    assert small.health_ms("127.0.0.3") < 1000  # another address is served meanwhile
    for s in socks:
        s.close()
    assert small.server.notes.total["refused_source"] == 6


def test_a_full_api_evicts_unfinished_requests_of_the_busiest_addresses_and_serves_health(small):
    socks = [s for i in range(12) for s in open_slow(small, f"127.0.1.{i + 1}", 4)]  # 48 slow, 24 slots
    time.sleep(0.3)
    times = [small.health_ms() for _ in range(20)]
    assert max(times) < 1000, times
    assert small.server.notes.total["evicted"] >= 24
    evicted = 0
    for s in socks:  # those evicted got a 503 that says why
        s.settimeout(0.05)
        with contextlib.suppress(TimeoutError):
            evicted += answer_of(s) == 503
        s.close()
    assert evicted >= 24
    assert len(small.server.waiting) + small.server.busy <= 24


def test_the_deadline_is_for_the_whole_request_not_each_read(small):
    s = small.connect()
    t0 = time.monotonic()
    status = 0
    for b in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100:  # a byte every 0.1 s, never a pause of 1.5 s
        try:
            s.send(bytes([b]))
        except OSError:
            break
        time.sleep(0.1)
        if time.monotonic() - t0 > 3:
            break
    s.settimeout(2)
    status = answer_of(s)
    assert status == 408 and time.monotonic() - t0 < 2.6
    s.close()
    # a silent connection is closed at the deadline too
    s = small.connect()
    s.settimeout(4)
    t0 = time.monotonic()
    assert s.recv(10) == b"" and 1.4 < time.monotonic() - t0 < 2.6
    s.close()


def test_refusals_are_counted_and_logged_at_most_once_per_interval(small):
    for _ in range(5):
        socks = open_slow(small, "127.0.0.9", 30)
        for s in socks:
            s.close()
    time.sleep(0.3)
    # The logger is process-wide: the module's other API server may sum up its own clients
    # (from 127.0.0.1) in the same window, so count only the lines about this source.
    lines = [m for m in small.log.lines() if m.startswith("API clients:") and "127.0.0.9" in m]
    assert small.server.notes.total["refused_source"] >= 100
    assert len(lines) == 1, lines  # the first one at once, the rest summed up 10 s later
    assert "api.max_per_source" in lines[0] and "127.0.0.9" in lines[0]
    assert 'idlewire_api_clients_total{reason="refused_source"}' in small.agent.metrics() + small.server.metrics()


def test_an_internal_fault_is_a_500_and_one_log_line(small, monkeypatch):
    def broken():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(small.agent, "usage", broken)
    req = request("GET", "/usage", b"", {"Authorization": f"Bearer {small.token}"})
    assert [small.status(req) for _ in range(3)] == [500] * 3
    errors = small.log.lines(logging.ERROR)
    assert len(errors) == 1 and "RuntimeError: disk on fire" in errors[0] and "\n" not in errors[0]
    assert not small.log.tracebacks()
    assert "idlewire_api_errors_total 3" in small.server.metrics()


def test_keep_alive_pipelining_and_100_continue(small):
    with small.connect() as s:
        s.sendall(b"GET /health HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n")
        time.sleep(0.3)
        s.sendall(b"POST /sessions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        time.sleep(0.3)
        s.sendall(b"{}")
        s.shutdown(socket.SHUT_WR)
        got = [st for st, _ in responses(read_all(s))]
    assert got == [200, 200, 401]


def test_clients_that_read_no_answers_hold_no_worker(small):
    """Pipelined requests from clients that never read: the answers wait in the reading thread,
    not in a worker, so the workers still serve everyone else; the readers are cut off in time."""
    # small socket buffers on both sides (inherited from the listener), as over a slow link
    small.server.listeners[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    readers = []
    for i in range(api.WORKERS + 2):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind((f"127.0.2.{i + 1}", 0))
        s.connect(("127.0.0.1", small.port))
        s.setblocking(False)
        readers.append(s)
        s.send(b"GET /metrics HTTP/1.1\r\n\r\n" * 100)  # 200 KB of answers, never read
    time.sleep(0.5)
    admin = request("GET", "/usage", b"", {"Authorization": f"Bearer {small.token}"})
    took = []
    for _ in range(api.WORKERS * 2):
        t = time.monotonic()
        assert small.status(admin) == 200
        took.append(time.monotonic() - t)
    assert max(took) < 0.5, took  # not a worker's wait for a reader (request_deadline: 1.5 s)
    time.sleep(2)
    assert small.server.notes.total["slow_reader"] >= api.WORKERS + 2
    for s in readers:
        s.close()
    no_faults(small)


def test_a_fault_in_the_reading_thread_costs_one_connection_not_the_api(small, monkeypatch):
    real = api.parse_head

    def broken(head):
        if b"X-Break" in head:
            raise RuntimeError("parser bug")
        return real(head)

    monkeypatch.setattr(api, "parse_head", broken)
    assert small.status(b"GET /health HTTP/1.1\r\nX-Break: 1\r\n\r\n") == 0  # closed, no answer
    assert small.status(b"GET /health HTTP/1.1\r\nX-Break: 1\r\n\r\n") == 0
    assert small.health_ms() < 1000
    errors = small.log.lines(logging.ERROR)
    assert len(errors) == 1 and "RuntimeError: parser bug" in errors[0] and not small.log.tracebacks()
    assert not small.thread_errors


def test_sources_and_config_keys():
    assert api.source_of("10.0.0.7") == "10.0.0.7"
    assert api.source_of("fd00::1") == api.source_of("fd00::2:3") != api.source_of("fd00:0:0:1::1")
    bad = {"api": {"max_connections": 4, "max_per_source": 0, "request_deadline": 0.1}}
    with pytest.raises(ConfigError) as exc:
        parse(bad)
    for key in ("api.max_connections", "api.max_per_source", "api.request_deadline"):
        assert key in str(exc.value)
    cfg = parse({"api": {"max_connections": 300, "max_per_source": 8, "request_deadline": 5}}).api
    assert (cfg.max_connections, cfg.max_per_source, cfg.request_deadline) == (300, 8, 5.0)
