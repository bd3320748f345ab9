#!/usr/bin/env python3
"""The hub under load, SQLite and PostgreSQL side by side. Prints measured figures against the goals.

    .venv/bin/python bench/hub.py [--receipts 20000] [--batch 1000] [--nodes 10000] [--rate 333] [--json]

1. ed25519: the machine's raw verify rate per CPU-second, libsodium's (PyNaCl: the hub asks it
   first, idlewire.ed25519fast) beside OpenSSL's (cryptography: the node's), the limit for a hub
   process: each receipt carries two signatures (node and buyer), so one core verifies at most
   half that many receipts a second.
2. Receipts verified and stored per second (goal >= 5,000/s): 4 nodes upload co-signed chains in
   batches through the real API (`idlewire hub serve --workers N` on loopback, N = --workers, by
   default one process per core, so the nodes' uploads are verified on every core), each batch after
   the first of a session led by the node's checkpoint, as agent market.py sends them; the count
   stored is checked afterwards. The hub's CPU time per 1000 receipts, and the PostgreSQL server's
   (its processes share the cores).
3. Heartbeats of --nodes simulated nodes (registered through the API first) sent open-loop at
   --rate per second, each node once (10,000 at 333/s: 30 s), 32 keep-alive connections; latency
   from the scheduled send to the answer: p50, p99 (goal <= 50 ms), max.

The client runs on the same 2 cores as the hub (and whatever else the machine runs: the load
average is printed), so the wall-clock figures are a floor for a hub on its own machine; the hub's
own CPU time per receipt and per heartbeat (from /proc) gives what one core of its own would do,
and the client's own CPU time gives the share of the machine it took (and how late its threads
were to send: lateness that is the client's, not the hub's).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "hub"), str(REPO / "agent"), str(REPO / "tools")]

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from hublab import HubProc, Postgres, postgres_missing  # noqa: E402
from idlewire_agent import receipts as rc  # noqa: E402
from idlewire_agent.keys import wg_keypair  # noqa: E402
from idlewire_agent.market import Market  # noqa: E402

CAPS = {"up_mbit": 10, "down_mbit": 50, "max_sessions": 8}


def raw_verify_rate(n: int = 4000, sodium: bool = False) -> float:
    """ed25519 verifies per CPU-second: OpenSSL (cryptography, the node's), or libsodium (PyNaCl),
    which the hub asks first (idlewire.ed25519fast)."""
    key = Ed25519PrivateKey.generate()
    pub = key.public_key()
    msg = b"x" * 200
    sig = key.sign(msg)
    if sodium:
        from nacl.bindings import crypto_sign_open

        raw = pub.public_bytes_raw()
        check = lambda: crypto_sign_open(sig + msg, raw)  # noqa: E731
    else:
        check = lambda: pub.verify(sig, msg)  # noqa: E731
    t = time.process_time()  # CPU time: what one core does, however busy the machine is
    for _ in range(n):
        check()
    return n / (time.process_time() - t)


def sell(db_url: str, node_id: str, sessions, buyer: str) -> None:
    """The sessions as the hub sold them to BUYER (what Hub.answer stores when a node answers a
    buyer's open request): the hub counts usage only in sessions it sold. Written directly, as the
    sales are not what this bench measures."""
    from idlewire.hub import db

    engine = db.make_engine(db_url)
    now = time.time()
    with db.write(engine) as conn:
        conn.execute(db.sessions.insert(), [
            {"node_id": node_id, "session": sid, "buyer_key": buyer, "request_id": os.urandom(12).hex(),
             "state": "open", "opened_at": now, "updated_at": now, "head": ""} for sid in sessions])
    engine.dispose()


def make_chains(key, sessions: int, per_session: int, buyer=None) -> dict[str, list[dict]]:
    buyer = buyer or Ed25519PrivateKey.generate()
    out = {}
    for s in range(sessions):
        sid = os.urandom(8).hex()
        prev, chain = rc.GENESIS, []
        for seq in range(1, per_session + 1):
            up, down, t = seq * 40_000, seq * 120_000, 1_700_000_000 + seq * 5
            r = rc.make_receipt(key, sid, seq, up, down, t, prev, rc.sign_usage(buyer, sid, up, down, t))
            prev = rc.receipt_hash(r)
            chain.append(r)
        out[sid] = chain
        del s
    return out


def bench_receipts(url: str, db_url: str, total: int, batch: int, uploaders: int = 4) -> dict:
    per_node = total // uploaders
    nodes = []
    for _ in range(uploaders):
        key = Ed25519PrivateKey.generate()
        m = Market(url, key, timeout=120)
        m.register(wg_public_key=wg_keypair()[1], payout=rc.payout_statement(key, "bench-payout"), region="DE",
                   caps=CAPS, price_per_gb=0.1, endpoint="", version="bench")
        sessions = max(1, per_node // 2000)
        buyer = Ed25519PrivateKey.generate()
        chains = make_chains(key, sessions, per_node // sessions, buyer)
        sell(db_url, m.node_id, chains, rc.pub_b64(buyer))
        batches = []
        for chain in chains.values():
            for start in range(0, len(chain), batch):
                batches.append(m.batch_for(chain[:start + batch], start))
        nodes.append((m, batches))
    stored, errors = [0], []
    lock = threading.Lock()

    def upload(m, batches):
        for b in batches:
            try:
                got = m.upload(b)["stored"]  # (not `stored[0] += m.upload(b)...`: that reads stored[0] first)
                with lock:
                    stored[0] += got
            except Exception as exc:
                errors.append(str(exc))

    threads = [threading.Thread(target=upload, args=nb) for nb in nodes]
    cpu, t = time.process_time(), time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    client = (time.process_time() - cpu) / elapsed / (os.cpu_count() or 1)
    sent = sum(len(c) for _, bs in nodes for c in bs) - sum(1 for _, bs in nodes for b in bs if rc.is_checkpoint(b[0]))
    return {"receipts": sent, "stored": stored[0], "seconds": round(elapsed, 2),
            "per_second": round(stored[0] / elapsed), "errors": errors[:3], "client_share": round(client, 3)}


def _post(conn_box: list, host: str, path: str, body: bytes, headers: dict) -> int:
    for attempt in (1, 2):
        if conn_box[0] is None:
            conn_box[0] = http.client.HTTPConnection(host, timeout=60)
        try:
            conn_box[0].request("POST", path, body=body, headers=headers)
            resp = conn_box[0].getresponse()
            resp.read()
            return resp.status
        except (OSError, http.client.HTTPException):
            conn_box[0].close()
            conn_box[0] = None
            if attempt == 2:
                return 0
    return 0


def register_many(url: str, n: int, workers: int = 16) -> list[tuple]:
    host = url.split("//")[1]
    keys = [Ed25519PrivateKey.generate() for _ in range(n)]
    out: list = [None] * n
    todo: queue.Queue = queue.Queue()
    for i in range(n):
        todo.put(i)

    def work():
        box = [None]
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            key = keys[i]
            body = json.dumps({"wg_public_key": wg_keypair()[1], "payout": rc.payout_statement(key, "bench-payout"),
                               "region": ["DE", "FR", "US", "BR", "JP"][i % 5], "caps": CAPS, "price_per_gb": 0.1,
                               "endpoint": "", "version": "bench"}).encode()
            h = rc.sign_request(key, "POST", "/v1/nodes", body, int(time.time()), os.urandom(16).hex())
            h["Content-Type"] = "application/json"
            if _post(box, host, "/v1/nodes", body, h) == 200:
                from idlewire.hub.service import node_id

                out[i] = (key, node_id(rc.pub_b64(key)))

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return [x for x in out if x]


def bench_heartbeats(url: str, nodes: list[tuple], rate: float, workers: int = 32) -> dict:
    host = url.split("//")[1]
    n = len(nodes)
    start = time.time()
    jobs = []
    for i, (key, nid) in enumerate(nodes):  # signed ahead: the client's CPU is not the hub's latency
        at = start + i / rate  # (the signed time: within the hub's clock skew of the real send)
        path = f"/v1/nodes/{nid}/heartbeat"
        body = json.dumps({"uptime": 3600 + i, "sessions": [{"session": os.urandom(8).hex(), "head": "a" * 64}]
                           if i % 3 == 0 else []}).encode()
        h = rc.sign_request(key, "POST", path, body, int(at), os.urandom(16).hex())
        h["Content-Type"] = "application/json"
        jobs.append((at, path, body, h))
    shift = time.time() + 0.5 - start  # the schedule starts once every request is signed
    todo: queue.Queue = queue.Queue()
    for at, path, body, h in jobs:
        todo.put((at + shift, path, body, h))
    t0 = start + shift
    lat, late, errors = [], [], [0]
    lock = threading.Lock()

    def work():
        box = [None]
        while True:
            try:
                at, path, body, h = todo.get_nowait()
            except queue.Empty:
                return
            wait = at - time.time()
            if wait > 0:
                time.sleep(wait)
            sent = time.time()
            status = _post(box, host, path, body, h)
            done = time.time()
            with lock:
                lat.append(done - at)
                late.append(sent - at)  # the client's own lag: all its threads busy, or no CPU for it
                if status != 200:
                    errors[0] += 1

    cpu, wall = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    client = (time.process_time() - cpu) / (time.perf_counter() - wall) / (os.cpu_count() or 1)
    span = max(1e-9, (t0 + (n - 1) / rate) - t0)
    lat.sort()
    late.sort()
    return {"heartbeats": n, "target_rate": rate, "achieved_rate": round(n / max(span, lat[-1] + span), 1),
            "p50_ms": round(statistics.median(lat) * 1000, 1), "p99_ms": round(lat[int(0.99 * (n - 1))] * 1000, 1),
            "max_ms": round(lat[-1] * 1000, 1), "errors": errors[0],
            "client_late_p99_ms": round(late[int(0.99 * (n - 1))] * 1000, 1), "client_share": round(client, 3)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the hub has used: the process and its workers (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return own + sum(cpu_seconds(int(k)) for k in kids)


def run_backend(name: str, db_url: str, args, server=None) -> dict:
    """SERVER: the database server's postmaster pid (PostgreSQL), whose CPU time (its backends are its
    children) is taken from the same 2 cores."""
    log = Path(tempfile.mkstemp(prefix=f"bench-hub-{name}-", suffix=".log")[1])
    print(f"[{name}] starting the hub ({db_url})", file=sys.stderr)
    with HubProc(db_url, log=log, workers=args.workers) as hub:
        print(f"[{name}] receipts: {args.receipts} in batches of {args.batch}", file=sys.stderr)
        pid = hub.proc.pid
        cpu, server_cpu = cpu_seconds(pid), cpu_seconds(server) if server else 0.0
        rec = bench_receipts(hub.url, db_url, args.receipts, args.batch)
        rec["hub_cpu_ms_per_1000"] = round((cpu_seconds(pid) - cpu) / max(1, rec["stored"]) * 1e6, 1)
        rec["server_cpu_ms_per_1000"] = round((cpu_seconds(server) - server_cpu) / max(1, rec["stored"]) * 1e6, 1) \
            if server else None
        if rec["errors"]:
            print(f"[{name}] upload errors: {rec['errors']}", file=sys.stderr)
        print(f"[{name}] registering {args.nodes} nodes", file=sys.stderr)
        t, cpu = time.perf_counter(), cpu_seconds(pid)
        nodes = register_many(hub.url, args.nodes)
        reg_rate = len(nodes) / (time.perf_counter() - t)
        reg_cpu = (cpu_seconds(pid) - cpu) / max(1, len(nodes))
        print(f"[{name}] heartbeats: {len(nodes)} at {args.rate}/s", file=sys.stderr)
        cpu = cpu_seconds(pid)
        hb = bench_heartbeats(hub.url, nodes, args.rate)
        hb["hub_cpu_ms_each"] = round((cpu_seconds(pid) - cpu) / max(1, len(nodes)) * 1000, 2)
    return {"receipts": rec, "registrations_per_second": round(reg_rate),
            "registration_cpu_ms": round(reg_cpu * 1000, 2), "registered": len(nodes), "heartbeats": hb}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--receipts", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=333)
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="hub processes (`idlewire hub serve --workers`; default: one per core): signature "
                         "checks are CPU work, so receipts/s scales with the processes up to the cores")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from idlewire import ed25519fast

    openssl = raw_verify_rate()
    verify = raw_verify_rate(sodium=True) if ed25519fast.install() else openssl  # what the hub uses
    results: dict = {"ed25519_verify_per_second": round(verify), "openssl_verify_per_second": round(openssl),
                     "receipt_limit_per_core": round(verify / 2),
                     "load_average_before": os.getloadavg()[0], "hub_processes": args.workers, "backends": {}}
    pg = None
    try:
        for name in args.backends.split(","):
            if name == "sqlite":
                url = f"sqlite:///{tempfile.mkdtemp(prefix='bench-hub-')}/hub.sqlite"
            elif name == "postgresql":
                why = postgres_missing()
                if why:
                    print(f"[postgresql] skipped: {why}", file=sys.stderr)
                    continue
                pg = pg or Postgres(durable=True).start()  # fsync, synchronous_commit on: PostgreSQL's defaults
                url = pg.new_database("benchhub")
            else:
                ap.error(f"--backends: unknown {name!r}; expected sqlite, postgresql")
            server = int((pg.data / "postmaster.pid").read_text().split()[0]) if name == "postgresql" else None
            results["backends"][name] = run_backend(name, url, args, server)
    finally:
        if pg:
            pg.stop()
    results["load_average_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    names = list(results["backends"])
    rows = [
        ("receipts verified+stored /s (goal >= 5000)", lambda r: r["receipts"]["per_second"]),
        ("  stored / sent", lambda r: f"{r['receipts']['stored']}/{r['receipts']['receipts']}"),
        ("  hub CPU ms per 1000 receipts", lambda r: r["receipts"]["hub_cpu_ms_per_1000"]),
        ("  database server CPU ms per 1000 receipts", lambda r: r["receipts"]["server_cpu_ms_per_1000"] or "-"),
        ("  bench client's share of the machine", lambda r: f"{r['receipts']['client_share']:.0%}"),
        ("registrations /s", lambda r: r["registrations_per_second"]),
        ("  hub CPU ms per registration", lambda r: r["registration_cpu_ms"]),
        ("heartbeats achieved /s", lambda r: r["heartbeats"]["achieved_rate"]),
        ("heartbeat p50 ms", lambda r: r["heartbeats"]["p50_ms"]),
        ("heartbeat p99 ms (goal <= 50)", lambda r: r["heartbeats"]["p99_ms"]),
        ("heartbeat max ms", lambda r: r["heartbeats"]["max_ms"]),
        ("heartbeat errors", lambda r: r["heartbeats"]["errors"]),
        ("  hub CPU ms per heartbeat", lambda r: r["heartbeats"]["hub_cpu_ms_each"]),
        ("  bench client's share of the machine", lambda r: f"{r['heartbeats']['client_share']:.0%}"),
        ("  bench client late to send, p99 ms", lambda r: r["heartbeats"]["client_late_p99_ms"]),
    ]
    cores = os.cpu_count() or 1
    print(f"ed25519 verify on one core: {results['ed25519_verify_per_second']}/s (libsodium, the hub's; OpenSSL "
          f"{results['openssl_verify_per_second']}/s) -> at most {results['receipt_limit_per_core']} receipts/s per "
          f"core (2 signatures each), {results['receipt_limit_per_core'] * cores}/s on all {cores} cores with "
          "nothing else running")
    print(f"load average: {results['load_average_before']:.1f} before, {results['load_average_after']:.1f} after "
          f"({os.cpu_count()} cores, shared); hub processes: {args.workers}")
    print("durability: SQLite as the hub opens it (WAL, synchronous=NORMAL); PostgreSQL with its defaults "
          "(fsync=on, synchronous_commit=on: an acknowledged commit is on disk), started for the bench on these cores")
    print(f"{'':46}" + "".join(f"{n:>14}" for n in names))
    for label, get in rows:
        print(f"{label:46}" + "".join(f"{get(results['backends'][n])!s:>14}" for n in names))
    for n in names:
        r = results["backends"][n]
        per_core = 1e6 / r["receipts"]["hub_cpu_ms_per_1000"]
        print(f"{n}: one hub process on a core of its own would verify+store {per_core:.0f} receipts/s "
              f"({per_core / results['receipt_limit_per_core']:.0%} of the verify limit) and take "
              f"{1000 / r['heartbeats']['hub_cpu_ms_each']:.0f} heartbeats/s (from the hub's own CPU time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
