"""The hub's HTTP API (FastAPI on uvicorn); the OpenAPI schema is served at /openapi.json.

    POST /v1/nodes                          node    register (or update) the node
    POST /v1/nodes/{id}/heartbeat           node    uptime, caps in force, open sessions + ledger heads
    GET  /v1/nodes/{id}/channel?wait=S      node    long poll: requests for the node (open a session)
    POST /v1/nodes/{id}/requests/{rid}      node    the node's answer to one request
    POST /v1/nodes/{id}/receipts            node    a batch of co-signed receipts
    POST /v1/connect                        buyer   pick a node, ask it over its channel, return its answer
    POST /v1/nodes/{id}/relay               buyer   a buyer-signed call to the node's session API (co-sign,
                                                    receipts, close), carried over the node's channel
    GET  /v1/nodes/{id}/earnings            node    last settled epoch: signed statement, the node's reward
                                                    leaf and Merkle proof (the node checks both)
    GET  /v1/nodes | /v1/sessions | /v1/receipts | /v1/usage | /v1/flags   open   listings
    GET  /v1/epochs | /v1/epochs/{n} | /v1/earnings                       open   the economy

Node and buyer requests are signed as the node's own API wants buyers to sign (agent
receipts.sign_request: X-Idlewire-Key/-Time/-Nonce/-Signature over method, path with query, time,
nonce and body hash). A refusal is a 4xx whose JSON body is {"error": ONE LINE}.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from . import db, economy, queries
from .service import CONNECT_TIMEOUT, LOCATION, REACHABILITY_MAX, REGION, Hub, HubError, Signed

MAX_BODY = 4 << 20
log = logging.getLogger("idlewire.hub")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes (declared or streamed) is a 413 before
    anything parses it."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            return await self.app(scope, limited, send)
        except _TooLarge:
            return await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"error": f"request body over {self.limit} bytes (or a bad Content-Length)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def _signed_path(scope) -> str:
    """The path with query the request's signature covers, as the client sent it."""
    path = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
    if scope.get("query_string"):
        path += "?" + scope["query_string"].decode("latin-1")
    return path


_HEARTBEAT = re.compile(r"^/v1/nodes/([^/]+)/heartbeat$")


class HeartbeatPath:
    """ASGI middleware: POST /v1/nodes/{nid}/heartbeat, the hot path (every node, every minute), is
    answered here ahead of FastAPI's routing, models and thread hop; `handle(nid, headers, path,
    body)` (signature check, body check, the batched write) gives (status, JSON answer)."""

    def __init__(self, app, handle):
        self.app, self.handle = app, handle

    async def __call__(self, scope, receive, send):
        m = _HEARTBEAT.match(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if m is None:
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        status, out = await self.handle(m.group(1), headers, _signed_path(scope), b"".join(chunks))
        body = json.dumps(out).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return None


class Registration(BaseModel):
    wg_public_key: str = Field(description="the node's WireGuard public key (base64)")
    payout: dict = Field(description="the node-signed payout statement (agent receipts.payout_statement)")
    region: str = Field(max_length=64, description=f"the node's country: {REGION.expect} (checked by the agent's "
                        "schema key node.region)")
    location: str = Field("", max_length=300, description=f"optional: {LOCATION.doc}; {LOCATION.expect} (the agent's "
                          "schema key node.location)")
    caps: dict = Field(description="caps in force: up_mbit, down_mbit, max_sessions, monthly_gb")
    price_per_gb: float = Field(ge=0, le=1e6)
    endpoint: str = Field("", max_length=300, description="HOST:PORT of the node's WireGuard, \"\" if unreachable")
    unreachable: str = Field("", max_length=REACHABILITY_MAX, description="with no endpoint: why buyers cannot "
                             "reach the node and the fix, one line (\"not reachable from the internet: forward UDP "
                             "PORT on your router to ADDR\"); \"\" with an endpoint")
    version: str = Field(max_length=64, pattern=r"^[\w.+-]*$")


class OpenSession(BaseModel):
    session: str = Field(max_length=64)
    head: str = Field("", max_length=64, description="SHA-256 hex of the session's newest receipt")


class Heartbeat(BaseModel):
    uptime: float = Field(ge=0, description="seconds since the agent started")
    caps: dict | None = None
    sessions: list[OpenSession] = Field(default_factory=list, max_length=4096)


class Answer(BaseModel):
    ok: bool
    result: dict | None = None
    error: str | None = Field(None, max_length=300)


class Connect(BaseModel):
    wg_public_key: str = Field(max_length=64)
    region: str | None = Field(None, max_length=64, description=f"the country the node should be in: {REGION.expect}")
    max_price: float | None = Field(None, ge=0)
    node: str | None = Field(None, max_length=20, description="this node only (the hub's prober asks for the "
                             "node it probes)")


class NodeRequest(BaseModel):
    method: str = Field(pattern=r"^(GET|POST|DELETE)$")
    path: str = Field(max_length=200, pattern=r"^/[\x21-\x7e]*$")
    headers: dict[str, str] = Field(max_length=8, description="X-Idlewire-Key/-Time/-Nonce/-Signature")
    body: str = Field("", max_length=65536)


class Relay(BaseModel):
    request: NodeRequest = Field(description="a call to the node's session API, signed by the buyer for the node")


class Batch(BaseModel):
    receipts: list[dict] = Field(description="receipts and checkpoints in chain order (agent receipts format)")


class Waker:
    """Wakes this process's long polls when the database says so: one query per tick for all of
    them (not one per waiting node), whichever hub process queued or answered the request. The
    waiters are this process's own connections; nothing here is needed by another process."""

    def __init__(self, hub: Hub, tick: float = 0.05):
        self.hub, self.tick = hub, tick
        self.nodes: dict[str, set[asyncio.Event]] = {}  # node id -> its channel polls waiting here
        self.requests: dict[str, set[asyncio.Event]] = {}  # request id -> buyers waiting for the answer
        self.task: asyncio.Task | None = None

    async def wait(self, table: dict, key: str, timeout: float) -> None:
        ev = asyncio.Event()
        table.setdefault(key, set()).add(ev)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            waiting = table.get(key)
            if waiting is not None:
                waiting.discard(ev)
                if not waiting:
                    del table[key]

    async def _run(self) -> None:
        while self.nodes or self.requests:
            await asyncio.sleep(self.tick)
            try:
                nodes, reqs = await run_in_threadpool(self.hub.ready, set(self.nodes), list(self.requests))
            except Exception as exc:  # the database away for a moment: the polls time out and retry
                log.warning("waking long polls: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                continue
            for table, keys in ((self.nodes, nodes), (self.requests, reqs)):
                for k in keys:
                    for ev in table.get(k, ()):
                        ev.set()


class Batcher:
    """Group commit: the requests that arrive while one batch is in the database go together in the
    next (one transaction, one commit; up to `most`). `fn` takes a list of items and returns one
    answer per item, or the HubError refusing it. Should a whole batch fail (the database away),
    its items are tried one by one, so none fails for another's sake."""

    def __init__(self, fn, most: int = 256):
        self.fn, self.most = fn, most
        self.pending: list[tuple[object, asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def submit(self, item):
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((item, fut))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:self.most], self.pending[self.most:]
            try:
                answers = await run_in_threadpool(self.fn, [item for item, _ in batch])
            except Exception as exc:
                answers = [exc] if len(batch) == 1 else [await self._alone(item) for item, _ in batch]
            for (_, fut), answer in zip(batch, answers, strict=True):
                if fut.done():  # the client went away
                    continue
                if isinstance(answer, BaseException):
                    fut.set_exception(answer)
                else:
                    fut.set_result(answer)

    async def _alone(self, item):
        try:
            return (await run_in_threadpool(self.fn, [item]))[0]
        except Exception as exc:
            return exc


def create_app(engine, clock=time.time) -> FastAPI:
    hub = Hub(engine, clock)
    db.checkpoint_in_background(engine)
    waker = Waker(hub)
    beats = Batcher(hub.heartbeats)
    app = FastAPI(title="idlewire hub", version=__version__,
                  description="The reference marketplace: nodes register and heartbeat, buyers are sent to "
                              "them over a channel the node opened, receipts are verified and stored.")

    @app.exception_handler(HubError)
    async def _hub_error(_request, exc: HubError):
        return JSONResponse({**exc.extra, "error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        return JSONResponse({"error": f"{exc.detail} (the API: /docs, /openapi.json)"}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e.get("loc", ()))
        return JSONResponse({"error": f"{where}: {e.get('msg', 'invalid')}"}, status_code=422)

    async def signed(request: Request) -> Signed:
        body = await request.body()
        return hub.authenticate(request.headers, request.method, _signed_path(request.scope), body)

    @app.get("/v1", summary="What this hub is")
    def info():
        return {"hub": "idlewire", "version": __version__, "heartbeat_interval": 60}

    @app.post("/v1/nodes", summary="Register or update a node (signed by the node key)")
    async def register(request: Request, body: Registration):
        auth = await signed(request)
        out = await run_in_threadpool(hub.register, auth, body.model_dump())
        # the address the node's request came from: its home router's public one, which the node
        # keeps its buyers away from (agent isolation Guard.report)
        return {**out, "seen_from": request.client.host if request.client else ""}

    async def beat(nid: str, headers, path: str, body: bytes) -> tuple[int, dict]:
        try:
            auth = hub.authenticate(headers, "POST", path, body)
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise HubError(400, "body: not JSON; expected {\"uptime\": S, \"sessions\": [...]}") from None
            return 200, await beats.submit((nid, auth, data))
        except HubError as exc:
            return exc.status, {"error": exc.message}

    @app.post("/v1/nodes/{nid}/heartbeat", summary="Heartbeat (signed by the node key)",
              description="Answered by the HeartbeatPath middleware ahead of the routing; this declaration is "
                          "its schema.")
    async def heartbeat(request: Request, nid: str, body: Heartbeat):
        status, out = await beat(nid, request.headers, _signed_path(request.scope), await request.body())
        return JSONResponse(out, status_code=status)

    app.add_middleware(HeartbeatPath, handle=beat)
    app.add_middleware(BodyLimit)  # the outer one: also in front of HeartbeatPath

    polls: dict[str, int] = {}  # node id -> its newest channel poll in this process
    poll_numbers = itertools.count(1)  # never reused: a number counted per node from 0 again once the
    # newest poll had ended was the number of an older poll still waiting, and both could claim

    @app.get("/v1/nodes/{nid}/channel", summary="Long poll for requests to the node (signed by the node key)")
    async def channel(request: Request, nid: str, wait: float = Query(25, ge=0, le=60)):
        auth = await signed(request)
        me = polls[nid] = next(poll_numbers)
        deadline = time.monotonic() + wait
        try:
            while True:
                # A poll whose node is gone (its agent restarted: the socket closed) or that the node's
                # newer poll replaced claims nothing: a request claimed here would be answered into a
                # closed socket, and its buyer would wait out CONNECT_TIMEOUT for nothing.
                if polls.get(nid) != me or await request.is_disconnected():
                    return {"requests": []}
                got = await run_in_threadpool(hub.claim, nid, auth)
                left = deadline - time.monotonic()
                if got or left <= 0:
                    return {"requests": got}
                await waker.wait(waker.nodes, nid, left)
        finally:
            if polls.get(nid) == me:
                del polls[nid]

    @app.post("/v1/nodes/{nid}/requests/{rid}", summary="The node's answer to a request (signed by the node key)")
    async def answer(request: Request, nid: str, rid: str, body: Answer):
        auth = await signed(request)
        return await run_in_threadpool(hub.answer, nid, auth, rid, body.model_dump())

    @app.post("/v1/nodes/{nid}/receipts", summary="Upload a batch of co-signed receipts (signed by the node key)",
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": Batch.model_json_schema()}}, "required": True}})
    async def upload(request: Request, nid: str):
        auth = await signed(request)
        try:
            data = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise HubError(400, "body: not JSON; expected {\"receipts\": [...]}") from None
        if not isinstance(data, dict) or not isinstance(data.get("receipts"), list):
            raise HubError(422, "body: expected {\"receipts\": [...]}")
        return await run_in_threadpool(hub.store_receipts, nid, auth, data["receipts"])

    @app.post("/v1/connect", summary="A buyer asks for a session (signed by the buyer key)")
    async def connect(request: Request, body: Connect):
        auth = await signed(request)
        rid, node = await run_in_threadpool(hub.queue_open, auth, body.model_dump())
        out = await answered(rid, node)
        if out["state"] != "answered":
            raise HubError(502, f"node {node['id']} refused the session: {(out['result'] or {}).get('error')}")
        return {"node": node["id"], "node_key": node["node_key"], "wg_public_key": node["wg_key"],
                "endpoint": node["endpoint"], "region": node["region"], "price_per_gb": node["price_per_gb"],
                "session": out["result"]}

    async def answered(rid: str, node: dict) -> dict:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while (out := await run_in_threadpool(hub.outcome, rid)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                if await run_in_threadpool(hub.expire, rid):
                    raise HubError(504, f"node {node['id']} did not answer within {CONNECT_TIMEOUT:g} s; try again")
                continue  # answered just now
            await waker.wait(waker.requests, rid, left)
        return out

    @app.post("/v1/nodes/{nid}/relay", summary="A buyer's signed call to the node's session API, carried over "
              "the node's channel (signed by the buyer key)")
    async def relay(request: Request, nid: str, body: Relay):
        auth = await signed(request)
        rid, node = await run_in_threadpool(hub.queue_relay, auth, nid, body.request.model_dump())
        out = await answered(rid, node)
        if out["state"] != "answered":
            raise HubError(502, f"node {nid}: {(out['result'] or {}).get('error')}")
        return out["result"]

    @app.get("/v1/nodes/{nid}/earnings", summary="The node's last settled epoch: signed statement, its reward "
             "leaf and Merkle inclusion proof (signed by the node key)")
    async def node_earnings(request: Request, nid: str):
        auth = await signed(request)

        def work():
            with db.write(engine) as conn:  # the request's nonce is spent: replay-proof like the rest
                hub._node(conn, nid, auth)
            return economy.node_earnings(engine, nid)

        return await run_in_threadpool(work)

    @app.get("/v1/epochs", summary="Settled epochs, newest first: minted, burned, slashed, supply, multipliers")
    def list_epochs(limit: int = Query(100, ge=1, le=10000)):
        return economy.epochs(engine, limit)

    @app.get("/v1/epochs/{epoch}", summary="An epoch's signed statement")
    def get_statement(epoch: int):
        st = economy.statement(engine, epoch)
        if st is None:
            raise HubError(404, f"epoch {epoch}: not settled")
        return st

    @app.get("/v1/earnings", summary="Every node's reward, reputation, multiplier, uptime in an epoch (default last)")
    def list_earnings(epoch: int | None = None):
        return economy.earnings(engine, None, epoch)

    every = float(os.environ.get("IDLEWIRE_HUB_SETTLE_EVERY") or 0)
    if every > 0:  # `hub serve --settle-every S` (each worker process: the database settles an epoch once)
        eco = economy.load(os.environ.get("IDLEWIRE_HUB_RULES"), os.environ.get("IDLEWIRE_HUB_KEY"),
                           os.environ.get("IDLEWIRE_HUB_PRICES"))
        app.state.settler = economy.start_schedule(engine, eco, every, log)

    @app.get("/v1/nodes", summary="Registered nodes")
    def list_nodes(region: str | None = None):
        return queries.nodes(engine, region=region, now=clock())

    @app.get("/v1/sessions", summary="Sessions")
    def list_sessions(node: str | None = None, state: str | None = None, limit: int = Query(100, ge=1, le=10000)):
        return queries.sessions(engine, node=node, state=state, limit=limit)

    @app.get("/v1/receipts", summary="Stored receipts")
    def list_receipts(node: str | None = None, session: str | None = None,
                      limit: int = Query(100, ge=1, le=10000)):
        return queries.receipts(engine, node=node, session=session, limit=limit)

    @app.get("/v1/usage", summary="Verified usage per node")
    def usage():
        return queries.usage(engine)

    @app.get("/v1/flags", summary="Flags: equivocation, forged usage, disagreement, no buyer co-signature")
    def list_flags(node: str | None = None, kind: str | None = None, limit: int = Query(100, ge=1, le=10000)):
        return queries.flags(engine, node=node, kind=kind, limit=limit)

    return app


def from_env() -> FastAPI:
    """The app for each of `idlewire hub serve --workers N`'s processes: the database from
    $IDLEWIRE_HUB_DB (the parent migrated it before starting them)."""
    return create_app(db.make_engine(db.default_url()))
