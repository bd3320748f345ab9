"""The node's side of the hub (node.toml [node] marketplace): register, heartbeat, the channel, receipts.

Standard library only (http.client) plus the agent's own receipts module: it runs on the node.
Every request is signed with the node key (receipts.sign_request), with a fresh nonce and the
current time, so the hub can refuse forged, replayed and stale ones.

    m = Market("https://hub.example", node_key)
    m.register(wg_public_key=..., payout=receipts.payout_statement(...), region="DE", caps={...},
               price_per_gb=0.5, endpoint="203.0.113.7:51820", version=__version__)
    m.heartbeat(uptime=..., caps={...}, sessions=[{"session": ID, "head": HASH}, ...])
    m.serve(open_session, stop)   # long-poll loop: open_session(buyer_key, wg_public_key) -> dict
    m.upload(receipts_list)      # {"stored": N, "duplicates": N, "flags": [...]}

Receipts continue a session across batches with a node-signed checkpoint of the last receipt sent
before (receipts.make_checkpoint): `batch_for(chain, sent_seq)` builds that batch.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import threading
import time
from urllib.parse import urlsplit

from . import receipts

log = logging.getLogger("idlewire.market")


class MarketError(Exception):
    """The hub refused (status 4xx/5xx, its one-line reason) or could not be reached (status 0)."""

    def __init__(self, status: int, message: str, answer: dict | None = None):
        super().__init__(f"hub: {message}" if status == 0 else f"hub: HTTP {status}: {message}")
        self.status = status
        self.reason = message
        self.answer = answer or {}  # the hub's JSON answer (e.g. "sessions": the ones it refused)


class Market:
    def __init__(self, url: str, key, timeout: float = 30.0, clock=time.time):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"marketplace: expected an http(s):// URL, got {url!r}")
        self.scheme, self.netloc, self.base = parts.scheme, parts.netloc, parts.path.rstrip("/")
        self.key = key
        self.timeout = timeout
        self.clock = clock
        self.node_id: str | None = None
        self.heartbeat_interval = 60.0
        self._local = threading.local()  # one keep-alive connection per thread

    # --- HTTP -----------------------------------------------------------------------------------
    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self.netloc, timeout=timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method: str, path: str, body=None, timeout: float | None = None) -> dict:
        """One signed request; the hub's JSON answer, or MarketError."""
        path = self.base + path
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = receipts.sign_request(self.key, method, path, data, int(self.clock()),
                                        os.urandom(16).hex())
        headers["Content-Type"] = "application/json"
        for attempt in (1, 2):  # a kept-alive connection the hub closed meanwhile: once more, fresh
            conn = self._conn(timeout or self.timeout)
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if attempt == 2:
                    raise MarketError(0, f"{self.netloc}: {exc}") from None
                headers = receipts.sign_request(self.key, method, path, data, int(self.clock()),
                                                os.urandom(16).hex())
                headers["Content-Type"] = "application/json"
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise MarketError(0, f"{self.netloc}: {exc}") from None
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {"error": raw[:200].decode(errors="replace")}
        if resp.status >= 400:
            raise MarketError(resp.status, str(answer.get("error") or answer.get("detail") or answer)
                              if isinstance(answer, dict) else str(answer),
                              answer if isinstance(answer, dict) else None)
        return answer

    # --- the node's calls ------------------------------------------------------------------------
    def register(self, *, wg_public_key: str, payout: dict, region: str, caps: dict, price_per_gb: float,
                 endpoint: str, version: str, location: str = "", unreachable: str = "") -> dict:
        """`unreachable`: with no endpoint, why buyers cannot reach the node and the fix (one line)."""
        out = self.request("POST", "/v1/nodes", {
            "wg_public_key": wg_public_key, "payout": payout, "region": region, "location": location, "caps": caps,
            "price_per_gb": price_per_gb, "endpoint": endpoint, "unreachable": unreachable, "version": version})
        self.node_id = out["node"]
        self.heartbeat_interval = float(out.get("heartbeat_interval") or 60)
        return out

    def _path(self, tail: str) -> str:
        if self.node_id is None:
            raise MarketError(0, "register first (Market.register)")
        return f"/v1/nodes/{self.node_id}/{tail}"

    def heartbeat(self, *, uptime: float, sessions: list[dict], caps: dict | None = None) -> dict:
        return self.request("POST", self._path("heartbeat"), {"uptime": uptime, "caps": caps, "sessions": sessions})

    def poll(self, wait: float = 25.0) -> list[dict]:
        """Requests for this node (waits up to `wait` s for one)."""
        return self.request("GET", self._path(f"channel?wait={wait:g}"), timeout=wait + 15)["requests"]

    def answer(self, rid: str, result: dict | None = None, error: str | None = None) -> dict:
        body = {"ok": True, "result": result} if error is None else {"ok": False, "error": error[:300]}
        return self.request("POST", self._path(f"requests/{rid}"), body)

    def earnings(self) -> dict:
        """The last settled epoch: signed statement, this node's reward leaf and Merkle proof."""
        return self.request("GET", self._path("earnings"))

    def upload(self, entries: list[dict]) -> dict:
        return self.request("POST", self._path("receipts"), {"receipts": entries})

    def batch_for(self, chain: list[dict], sent_seq: int) -> list[dict]:
        """One session's receipts after `sent_seq` (the last one the hub stored), led by the node's
        checkpoint of receipt `sent_seq` so the hub verifies the continuation as a chain."""
        rest = [r for r in chain if r.get("seq", 0) > sent_seq and not receipts.is_checkpoint(r)]
        if sent_seq == 0 or not rest:
            return rest if sent_seq == 0 else []
        before = next((r for r in chain if r.get("seq") == sent_seq), None)
        if before is None:
            raise ValueError(f"receipt {sent_seq} is not in the chain given")
        return [before if receipts.is_checkpoint(before) else receipts.make_checkpoint(self.key, before), *rest]

    def serve(self, open_session, stop: threading.Event, wait: float = 25.0, retry: float = 5.0,
              relay=None, on_error=None) -> None:
        """The channel: long-poll until `stop`; each "open" request calls open_session(buyer_key,
        wg_public_key) -> the session as the node's POST /sessions answers it, sent back to the hub;
        each "relay" request (a buyer's own signed call to the node's session API, carried by the
        hub) calls relay(buyer_key, request) -> {"status", "body"}; an exception's message is the
        refusal. A hub outage is waited out, `retry` s apart (on_error(exc) hears of each)."""
        while not stop.is_set():
            try:
                reqs = self.poll(wait)
                if not isinstance(reqs, list):
                    raise TypeError(f"expected a list of requests, got {type(reqs).__name__}")
            except MarketError as exc:
                if on_error is not None:
                    on_error(exc)
                log.warning("channel: %s; retrying in %g s", exc, retry)
                stop.wait(retry)
                continue
            except Exception:  # an odd answer or a bug must not end the channel: buyers could not come
                log.exception("channel: polling failed; retrying in %g s", retry)
                stop.wait(retry)
                continue
            for req in reqs:
                try:
                    self._serve_one(req, open_session, relay)
                except Exception:  # one bad request must not end the channel either
                    log.exception("channel: request %.100r", req)

    def _serve_one(self, req, open_session, relay) -> None:
        kind, body = req.get("kind"), req.get("body") or {}
        if kind not in ("open", "relay") or (kind == "relay" and relay is None):
            self._safe_answer(req["id"], error=f"unknown request kind {kind!r}")
            return
        try:
            if kind == "open":
                result = open_session(body.get("buyer_key", ""), body.get("wg_public_key", ""))
            else:
                result = relay(body.get("buyer_key", ""), body.get("request"))
        except Exception as exc:  # the refusal goes to the buyer, the loop goes on
            self._safe_answer(req["id"], error=str(exc) or type(exc).__name__)
            return
        self._safe_answer(req["id"], result=result)

    def _safe_answer(self, rid: str, result: dict | None = None, error: str | None = None) -> None:
        try:
            self.answer(rid, result, error)
        except MarketError as exc:
            log.warning("channel: answering request %s: %s", rid, exc)


# --- the agent's side: what runs when node.toml [node] marketplace names a hub ------------------------
# --- earnings: the last settled epoch, checked by the node itself ---------------------------------
REACHABILITY_MAX = 300  # characters of the "not reachable from the internet: ..." line the hub keeps
EARNINGS_EVERY = 600.0  # seconds between the node's looks at its earnings (epochs are a day by default)


def check_earnings(answer: dict, node_id: str, hub_key: str | None) -> dict:
    """What /health shows of the hub's GET /v1/nodes/{id}/earnings answer, after checking it with
    merkle.check_reward: the statement's signature (by HUB_KEY, the key the node first saw sign one,
    when given) and the node's reward leaf against the statement's Merkle root. A reward that does
    not check is shown as such with the reason, never as earned."""
    from . import merkle

    st = answer.get("statement") if isinstance(answer, dict) else None
    if not isinstance(st, dict):
        return {"state": str((answer or {}).get("why_not") or "no epoch settled yet")[:200]}
    if not merkle.verify_statement(st, hub_key):
        return {"state": "refused: the epoch statement's signature does not verify (or is not by the hub key "
                         "this node first saw)", "epoch": st.get("epoch")}
    out = {"epoch": st.get("epoch"), "statement": merkle.statement_hash(st), "hub_key": st.get("hub"),
           "region": answer.get("region"), "reward": 0, "reputation_ppm": answer.get("reputation_ppm"),
           "multiplier_ppm": answer.get("multiplier_ppm"), "uptime_ppm": answer.get("uptime_ppm"),
           "verified_bytes": answer.get("verified_bytes"), "state": "verified"}
    if answer.get("leaf") is None:
        out["state"] = f"no reward: {str(answer.get('why_not') or 'not in this epoch')[:200]}"
        return out
    problem = merkle.check_reward(st, answer["leaf"], answer.get("proof") or [], node_id, hub_key)
    if problem is not None:
        out["state"] = f"refused: {problem}"
        return out
    leaf = answer["leaf"]
    out.update(reward=leaf["reward"], reputation_ppm=leaf["reputation_ppm"], multiplier_ppm=leaf["multiplier_ppm"],
               uptime_ppm=leaf["uptime_ppm"], verified_bytes=leaf["verified_bytes"], payout=leaf["payout"])
    return out


_RELAYED = re.compile(r"^/(sessions/[0-9a-f]{16}(/usage|/close|/receipts)?|receipts\?session=[0-9a-f]{16})$")
_RELAY_HEADERS = ("X-Idlewire-Key", "X-Idlewire-Time", "X-Idlewire-Nonce", "X-Idlewire-Signature")


class Seller:
    """The node in the market, in two threads of its own (never the poll's or the API's):

    - "market": registers (retrying while the hub is away), heartbeats every heartbeat_interval
      and at once when a session opens or closes (uptime, caps in force, open sessions
      with their ledger heads: the hub's count of free places stays right) and uploads the ledger's
      queue of receipts in batches as soon as there are any (Ledger.pending_uploads);
    - "channel": the long poll the node opened; "open" requests go to Agent.open_session, the
      function the local API calls (every admission rule holds for hub buyers), and "relay"
      requests -- a buyer's own signed call to the node's session API (co-sign usage, read
      receipts, close), carried by the hub -- go through the API's own routing with the buyer's
      signature and nonce checked by the node itself; the admin token is never honoured there.
    """

    def __init__(self, agent, url: str, batch: int = 500, clock=time.time):
        self.agent, self.batch, self.clock = agent, batch, clock
        self.market = Market(url, agent.node_key, clock=clock)
        self.registered = threading.Event()
        self.started = time.monotonic()
        self.state = "starting"  # what /health could say: registered | unreachable: WHY
        self.told_endpoint: str | None = None  # the endpoint the hub has: registered again when it changes
        self.sent = self.duplicates = 0
        self.hub_key: str | None = None  # the hub's statement key, pinned the first time one verifies
        self.earnings_due = 0.0  # when the node next looks at its earnings (monotonic clock of the loop)

    # --- what the node tells the hub --------------------------------------------------------------
    def endpoint(self) -> str:
        """HOST:PORT buyers reach WireGuard at: the UPnP/NAT-PMP mapping on the home router, else
        [tunnel] endpoint (the public address the owner gives) and port; "" when there is neither."""
        host, port = self.agent.public_endpoint()
        if not host:
            return ""
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def reachability(self) -> str:
        """"" when buyers can reach the node, else the line that says why not and the fix."""
        mapper = self.agent.home.mapper if self.agent.home is not None else None
        if self.endpoint():
            return ""
        if mapper is not None:
            return mapper.status()["message"]
        return (f"not reachable from the internet: no [tunnel] endpoint and no UPnP mapping; forward UDP "
                f"{self.agent.cfg.tunnel.port} on your router to this node and set [tunnel] endpoint")

    def caps(self) -> dict:
        cfg = self.agent.cfg
        sh, q = cfg.policy.shaping, cfg.policy.quota
        most = min(x for x in (cfg.sessions.max, q.max_sessions) if x) if (cfg.sessions.max or q.max_sessions) else 1
        return {"up_mbit": round(max(sh.cap_up, 1000) / 1e6, 3), "down_mbit": round(max(sh.cap_down, 1000) / 1e6, 3),
                "monthly_gb": round(q.monthly_bytes / 1e9, 3), "max_sessions": max(1, min(int(most), 3840))}

    def sessions(self) -> list[dict]:
        out = []
        for sid, body in self.agent.ledger.heads():
            head = ""
            if body:
                r = json.loads(body)
                head = r["hash"] if receipts.is_checkpoint(r) else receipts.receipt_hash(r)
            out.append({"session": sid, "head": head})
        return out

    def register(self) -> dict:
        a = self.agent
        u = a.cfg.unit
        payout = a.payout or receipts.payout_statement(a.node_key, u.payout_address or "", u.unit or "")
        from . import __version__

        endpoint = self.endpoint()
        out = self.market.register(wg_public_key=a.wg_pub, payout=payout, region=a.cfg.region,
                                   location=a.cfg.location, caps=self.caps(), price_per_gb=a.cfg.price_per_gb,
                                   endpoint=endpoint, unreachable=self.reachability()[:REACHABILITY_MAX],
                                   version=__version__)
        again = self.registered.is_set()
        self.told_endpoint = endpoint
        self.registered.set()
        self.state = "registered"
        self.report_public(out.get("seen_from") or "")
        where = f"endpoint {endpoint}" if endpoint else f"the hub lists it as {self.reachability()}"
        log.info("marketplace %s: %s node %s, %s", self.market.netloc, "updated" if again else "registered as",
                 out["node"], where)
        return out

    def report_public(self, seen_from: str) -> None:
        """The node's public addresses (where the hub saw it come from, the endpoint it reports) are
        kept from its buyers: isolation blocks them from the next check (Guard.report)."""
        import ipaddress

        addrs = []
        for a in (seen_from, self.agent.cfg.tunnel.endpoint):
            try:
                ip = ipaddress.ip_address(a)
            except ValueError:
                continue
            if ip.is_global:
                addrs.append(str(ip))
        if self.agent.guard is not None and addrs:
            self.agent.guard.report("hub", addrs)

    # --- receipts ---------------------------------------------------------------------------------
    def upload_once(self) -> int:
        """One batch from the ledger's queue to the hub; the number of receipts the hub acknowledged
        (0: nothing queued). MarketError when the hub is away or refuses: the queue stays."""
        rows = self.agent.ledger.pending_uploads(self.batch)
        if not rows:
            return 0
        entries, sent, first = [], [], {}
        for sid, seq, body in rows:
            if sid not in first:
                first[sid] = seq
                if seq > 1:  # the hub has seq-1 (it left the queue): continue the chain from it
                    before = self.agent.ledger.receipt_body(sid, seq - 1)
                    if before is not None:
                        b = json.loads(before)
                        entries.append(b if receipts.is_checkpoint(b) else receipts.make_checkpoint(self.market.key, b))
            entries.append(json.loads(body))
            sent.append((sid, seq))
        try:
            out = self.market.upload(entries)
        except MarketError as exc:
            foreign = exc.answer.get("sessions") if exc.status == 409 else None
            if not isinstance(foreign, list) or not foreign:
                raise
            # Sessions the hub did not sell (a buyer on the owner's LAN, or a hub that lost its
            # database): their usage is not the hub's to count. They leave the queue (the receipts
            # stay in the ledger for the buyer), and the rest of the batch goes again.
            gone = [(sid, seq) for sid, seq in sent if sid in set(foreign)]
            self.agent.ledger.uploaded(gone)
            log.info("marketplace: %d receipt(s) of %d session(s) the hub did not sell left the upload queue "
                     "(%s)", len(gone), len(set(foreign)), exc.reason)
            return len(gone)
        self.agent.ledger.uploaded(sent)
        self.sent += int(out.get("stored", 0))
        self.duplicates += int(out.get("duplicates", 0))
        for f in out.get("flags") or ():
            log.warning("hub flagged session %s seq %s: %s (%s)", f.get("session"), f.get("seq"), f.get("kind"),
                        f.get("detail"))
        return len(sent)

    # --- earnings ---------------------------------------------------------------------------------
    def fetch_earnings(self) -> dict:
        """Ask the hub for the last epoch, check it (check_earnings) and keep it for /health and
        /metrics (agent.earnings). The hub's statement key is pinned the first time one verifies."""
        got = check_earnings(self.market.earnings(), self.market.node_id or "", self.hub_key)
        if got.get("state") == "verified" or got.get("state", "").startswith("no reward"):
            self.hub_key = got.get("hub_key")
        elif got.get("state", "").startswith("refused"):
            log.warning("marketplace: earnings of epoch %s %s", got.get("epoch"), got["state"])
        self.agent.earnings = got
        return got

    # --- the channel ------------------------------------------------------------------------------
    def relay(self, buyer_key: str, request) -> dict:
        """A buyer's signed call to the node's session API, as the hub carried it: {"method",
        "path", "headers", "body"} -> {"status", "body"}. Only the buyer's own session calls pass."""
        if not isinstance(request, dict):
            raise ValueError("relay: expected a request object")
        method, path, body = request.get("method"), request.get("path"), request.get("body", "")
        headers = request.get("headers")
        if method not in ("GET", "POST", "DELETE") or not isinstance(path, str) or not _RELAYED.match(path) \
                or not isinstance(body, str) or len(body) > 65536 or not isinstance(headers, dict):
            return {"status": 404, "body": {"error": "only a buyer's own session calls pass through the hub"}}
        h = _relay_headers(headers)
        if h.get("x-idlewire-key") != buyer_key:
            return {"status": 401, "body": {"error": "the request is not signed by the buyer the hub vouched for"}}
        return _relay_exchange(self.agent, method, path, h, body.encode())

    # --- threads ----------------------------------------------------------------------------------
    def start(self, stop: threading.Event) -> None:
        queued = self.agent.ledger.enable_uploads()
        if queued:
            log.info("marketplace: %d receipt(s) wait in the ledger's upload queue", queued)
        threading.Thread(target=self._run, args=(stop,), daemon=True, name="market").start()
        threading.Thread(target=self._channel, args=(stop,), daemon=True, name="channel").start()

    def _unreachable(self, exc: Exception) -> None:
        if self.state != f"unreachable: {exc}":
            log.warning("marketplace %s: %s; retrying", self.market.netloc, exc)
        self.state = f"unreachable: {exc}"

    def _open_ids(self) -> set[str]:
        with self.agent.lock:
            return {r[0] for r in self.agent.ledger.db.execute("SELECT id FROM sessions WHERE state = 'open'")}

    def _run(self, stop: threading.Event) -> None:
        delay, beat_due, told, changed = 1.0, 0.0, None, False
        event = self.agent.sessions_changed
        mapper = self.agent.home.mapper if self.agent.home is not None else None
        if mapper is not None:  # the first registration carries the mapping (discovery takes seconds)
            mapper.checked.wait(30)
        while not stop.is_set():
            try:
                if not self.registered.is_set() or self.endpoint() != self.told_endpoint:
                    self.register()  # first, again after the hub forgot us, or a new/lost mapping
                    delay = 1.0
                now = time.monotonic()
                # A session opened or closed: the hub hears at once. The agent's event, not a look at
                # the open sessions once a second, which misses a session opened and closed between two
                # looks (the hub would count it open until the next periodic heartbeat). Cleared
                # before the ledger is read: a change after the read sets it again.
                changed |= event.is_set()
                event.clear()
                ids = self._open_ids()
                if now >= beat_due or changed or ids != told:
                    self.market.heartbeat(uptime=now - self.started, caps=self.caps(), sessions=self.sessions())
                    beat_due, told, changed = now + self.market.heartbeat_interval, ids, False
                while self.upload_once() and not stop.is_set():
                    pass
                if now >= self.earnings_due:
                    self.earnings_due = now + EARNINGS_EVERY
                    try:
                        self.fetch_earnings()
                    except MarketError as exc:  # a hub without an economy: not a reason to re-register
                        self.agent.earnings = {"state": f"unavailable: {exc.reason}"[:200]}
                delay = 1.0
                event.wait(1.0)
            except MarketError as exc:
                if exc.status == 404:  # the hub forgot us (a new database): register again
                    self.registered.clear()
                self._unreachable(exc)
                stop.wait(delay)
                delay = min(delay * 2, 60.0)
            except Exception:  # a bug must not end the market thread (the agent meters on)
                log.exception("marketplace")
                stop.wait(delay)
                delay = min(delay * 2, 60.0)

    def _channel(self, stop: threading.Event) -> None:
        while not stop.is_set() and not self.registered.wait(1.0):
            pass

        def on_error(exc):
            if exc.status == 404:
                self.registered.clear()
                while not stop.is_set() and not self.registered.wait(1.0):
                    pass

        self.market.serve(self._open, stop, relay=self.relay, on_error=on_error, retry=2.0)

    def _open(self, buyer_key: str, wg_public_key: str) -> dict:
        from .agent import SessionError

        try:
            return self.agent.open_session(buyer_key, wg_public_key, sold=True)
        except SessionError as exc:
            raise RuntimeError(f"HTTP {exc.status}: {exc}") from None


def _relay_headers(given: dict):
    from .api import Headers

    h = Headers()
    for name in _RELAY_HEADERS:
        v = given.get(name, given.get(name.lower()))
        if isinstance(v, str) and len(v) <= 200:
            h[name.lower()] = v
    return h


def _relay_exchange(agent, method: str, path: str, headers, body: bytes) -> dict:
    """Serve one relayed request with the local API's own routing and checks (no socket)."""
    from . import api

    class Relayed(api.Exchange):
        out: tuple = (500, {"error": "no answer"})

        def _admin(self) -> bool:  # the admin token never crosses the hub
            return False

        def _send(self, code, body, ctype="application/json") -> None:
            self.out = (code, body)

        def _send_stream(self, chunks) -> None:
            self.out = (200, json.loads("".join(chunks)))

    class _Server:
        def __init__(self):
            self.agent = agent

        @staticmethod
        def fault(method, path, exc) -> None:
            log.error("relayed %s %s: %s", method, path[:100], exc)

    ex = Relayed(_Server(), None, "hub", (method, path, "HTTP/1.1", headers, body))
    ex.handle()
    return {"status": ex.out[0], "body": ex.out[1]}
