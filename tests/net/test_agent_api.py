"""The local API under hostile input: malformed and oversized requests get a 4xx, never a 5xx,
and the agent keeps serving. Runs against the real agent in a namespace."""

import json
import secrets
import socket
import time

import pytest
from agentlab import NodeLab
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from idlewire_agent import keys, receipts

pytestmark = pytest.mark.net


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from netlab import Lab, have_netns

    if have_netns():
        pytest.skip(have_netns())
    with Lab() as lab:
        n = NodeLab(lab, tmp_path_factory.mktemp("api"), 160, api__max_body=4096)
        n.start()
        yield n
        n.stop()


def raw(node, data: bytes, timeout: float = 5) -> int:
    """Send raw bytes, return the HTTP status of the answer (0 when the agent closed without one)."""
    with socket.create_connection(("127.0.0.1", node.fwd.port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        try:
            while b"\r\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    if not buf.startswith(b"HTTP/"):
        return 0
    return int(buf.split(b" ", 2)[1])


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    h = {"Host": "node", "Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return head.encode("latin-1") + body


BUYER = Ed25519PrivateKey.generate()


def signed(method: str, path: str, body: bytes) -> dict:
    return receipts.sign_request(BUYER, method, path, body, int(time.time()), secrets.token_hex(16))


def healthy(node) -> bool:
    return node.get("/health")["status"] == "ok"


def test_known_bad_requests(node):
    assert raw(node, request("POST", "/sessions", b"x" * 100_000)) == 413
    assert raw(node, request("POST", "/sessions", b"{}")) == 401
    assert raw(node, b"GARBAGE\r\n\r\n") == 400
    assert raw(node, b"GET / HTTP/x.y\r\n\r\n") == 400
    assert raw(node, b"GET / HTTP/3.0\r\n\r\n") == 400  # not the stdlib's 505
    assert raw(node, request("TRACE", "/health")) == 405  # not the stdlib's 501
    assert raw(node, request("GET", "/" + "a" * 70000)) in (400, 414)
    body = b'{"wg_public_key": 5}'
    assert raw(node, request("POST", "/sessions", body, signed("POST", "/sessions", body))) == 400
    body = json.dumps({"wg_public_key": keys.wg_keypair()[1]}).encode()
    h = signed("POST", "/sessions", body)
    assert raw(node, request("POST", "/sessions", body, h)) == 201
    assert raw(node, request("POST", "/sessions", body, h)) == 401  # the same nonce again: a replay
    h = {**signed("POST", "/sessions", body), "X-Idlewire-Time": str(int(time.time()) - 3600)}
    assert raw(node, request("POST", "/sessions", body, h)) == 401
    assert raw(node, request("GET", "/usage", b"", {"Authorization": "Bearer wrong"})) == 401
    token = node.token_file.read_text().strip()
    assert raw(node, request("GET", "/usage", b"", {"Authorization": f"Bearer {token}"})) == 200
    assert raw(node, request("GET", "/sessions/../../etc/passwd", b"", {"Authorization": f"Bearer {token}"})) == 404
    assert raw(node, request("GET", "/sessions?limit=x", b"", {"Authorization": f"Bearer {token}"})) == 400
    assert raw(node, request("GET", "/sessions?limit=5000", b"", {"Authorization": f"Bearer {token}"})) == 400
    assert raw(node, request("GET", "/sessions?limit=10&offset=1", b"", {"Authorization": f"Bearer {token}"})) == 200
    assert healthy(node)


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(scalars,
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                           max_leaves=10)
paths = st.sampled_from(["/sessions", "/sessions/0123456789abcdef", "/sessions/0123456789abcdef/usage",
                         "/sessions/0123456789abcdef/close", "/receipts?session=x", "/usage", "/health", "/metrics",
                         "/", "/sessions/%00", "/receipts?session=0123456789abcdef&session=1"]) | \
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(lambda s: "/" + s)
methods = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"])


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=methods, path=paths, body=json_values, sign=st.booleans(),
       junk_headers=st.dictionaries(st.sampled_from(["X-Idlewire-Key", "X-Idlewire-Time", "X-Idlewire-Nonce",
                                                     "X-Idlewire-Signature", "Content-Type", "Authorization"]),
                                    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
                                    max_size=3))
def test_fuzzed_requests_never_5xx(node, method, path, body, sign, junk_headers):
    data = json.dumps(body).encode()
    headers = signed(method, path, data) if sign else {}
    if not sign:
        headers.update(junk_headers)
    status = raw(node, request(method, path, data, headers))
    assert 200 <= status < 500, (method, path, body, status)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=600))
def test_random_bytes_never_5xx(node, data):
    status = raw(node, data, timeout=2)
    assert status == 0 or status < 500


def test_still_serving_after_the_fuzz(node):
    assert healthy(node)
    assert "Traceback" not in node.log.read_text()


def test_keep_alive_and_header_limits(node):
    # Two requests on one connection (HTTP/1.1 keep-alive), then the connection is still usable.
    with socket.create_connection(("127.0.0.1", node.fwd.port), timeout=5) as s:
        f = s.makefile("rb")
        for _ in range(2):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: node\r\n\r\n")
            assert f.readline().startswith(b"HTTP/1.1 200")
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert json.loads(f.read(length))["status"] == "ok"
    assert raw(node, b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 100 + b"\r\n") == 431
    assert raw(node, b"GET /health HTTP/1.1\r\nX-A: " + b"b" * 9000 + b"\r\n\r\n") == 431
    assert raw(node, b"POST /sessions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}") == 400
    assert raw(node, b"POST /sessions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n") == 411
    assert raw(node, b"HEAD /health HTTP/1.1\r\n\r\n") == 405
    assert raw(node, b"GET /health HTTP/1.0\r\n\r\n") == 200
    assert healthy(node)


def test_replay_after_a_restart_is_refused(node):
    """A signed request is good once, also when the agent restarted (kill -9) in between."""
    body = json.dumps({"wg_public_key": keys.wg_keypair()[1]}).encode()
    h = signed("POST", "/sessions", body)
    assert raw(node, request("POST", "/sessions", body, h)) == 201
    sid = next(s["session"] for s in node.open_sessions() if s["buyer_wg_key"] == json.loads(body)["wg_public_key"])
    token = node.token_file.read_text().strip()
    assert raw(node, request("DELETE", f"/sessions/{sid}", b"", {"Authorization": f"Bearer {token}"})) == 200
    node.kill9()
    node.start()
    # The same request again: without the nonce it would open the session a second time.
    assert raw(node, request("POST", "/sessions", body, h)) == 401
    assert sid not in [s["session"] for s in node.open_sessions()]
    assert not [s for s in node.open_sessions() if s["buyer_wg_key"] == json.loads(body)["wg_public_key"]]
    h2 = signed("POST", "/sessions", body)  # a fresh signature works
    assert raw(node, request("POST", "/sessions", body, h2)) == 201
