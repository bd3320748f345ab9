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
import threading
import time
from urllib.parse import urlsplit

from . import receipts

log = logging.getLogger("idlewire.market")


class MarketError(Exception):
    """The hub refused (status 4xx/5xx, its one-line reason) or could not be reached (status 0)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"hub: {message}" if status == 0 else f"hub: HTTP {status}: {message}")
        self.status = status
        self.reason = message


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
                              if isinstance(answer, dict) else str(answer))
        return answer

    # --- the node's calls ------------------------------------------------------------------------
    def register(self, *, wg_public_key: str, payout: dict, region: str, caps: dict, price_per_gb: float,
                 endpoint: str, version: str, location: str = "") -> dict:
        out = self.request("POST", "/v1/nodes", {
            "wg_public_key": wg_public_key, "payout": payout, "region": region, "location": location, "caps": caps,
            "price_per_gb": price_per_gb, "endpoint": endpoint, "version": version})
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

    def serve(self, open_session, stop: threading.Event, wait: float = 25.0, retry: float = 5.0) -> None:
        """The channel: long-poll until `stop`; each "open" request calls open_session(buyer_key,
        wg_public_key) -> the session as the node's POST /sessions answers it, sent back to the hub;
        an exception's message is the refusal. A hub outage is waited out, `retry` s apart."""
        while not stop.is_set():
            try:
                reqs = self.poll(wait)
            except MarketError as exc:
                log.warning("channel: %s; retrying in %g s", exc, retry)
                stop.wait(retry)
                continue
            for req in reqs:
                if req.get("kind") != "open":
                    self._safe_answer(req["id"], error=f"unknown request kind {req.get('kind')!r}")
                    continue
                body = req.get("body") or {}
                try:
                    result = open_session(body.get("buyer_key", ""), body.get("wg_public_key", ""))
                except Exception as exc:  # the refusal goes to the buyer, the loop goes on
                    self._safe_answer(req["id"], error=str(exc) or type(exc).__name__)
                    continue
                self._safe_answer(req["id"], result=result)

    def _safe_answer(self, rid: str, result: dict | None = None, error: str | None = None) -> None:
        try:
            self.answer(rid, result, error)
        except MarketError as exc:
            log.warning("channel: answering request %s: %s", rid, exc)
