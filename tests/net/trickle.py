"""Slowly trickling HTTP clients, for tests/net/test_agent_api_load.py (run in the buyer's namespace).

    python trickle.py HOST PORT SECONDS RATE < sources.json

Keeps one connection per entry of the JSON list of source addresses open to HOST:PORT, each
sending one byte of a request that never ends every second; reopens what the server closes (at
most RATE new connections a second beyond the first round); stops by itself after SECONDS and
prints {"opened", "closed_by_agent", "peak", "answers": {status: count}} as JSON.
"""

from __future__ import annotations

import collections
import contextlib
import json
import selectors
import socket
import sys
import time


def trickle(target: tuple[str, int], sources: list[str], seconds: float, rate: int) -> dict:
    sel = selectors.DefaultSelector()
    line = b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 4000
    pending = collections.deque(sources)  # one entry per connection to (re)open, oldest first
    out = {"opened": 0, "closed_by_agent": 0, "peak": 0, "answers": {}}
    start = time.monotonic()
    end, next_byte = start + seconds, start + 1
    try:
        while time.monotonic() < end:
            allowed = int((time.monotonic() - start) * rate) + len(sources)  # the first round at once
            while pending and out["opened"] < allowed:
                src = pending.popleft()
                s = socket.socket()
                s.setblocking(False)
                s.bind((src, 0))
                s.connect_ex(target)
                sel.register(s, selectors.EVENT_READ, [src, 0])
                out["opened"] += 1
            out["peak"] = max(out["peak"], len(sel.get_map()))
            for key, _ in sel.select(timeout=0.05):
                s, src = key.fileobj, key.data[0]
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/1.1 "):
                    code = data[9:12].decode()
                    out["answers"][code] = out["answers"].get(code, 0) + 1
                if not data or data.startswith(b"HTTP/"):
                    sel.unregister(s)
                    s.close()
                    out["closed_by_agent"] += 1
                    pending.append(src)
            if time.monotonic() >= next_byte:
                next_byte += 1
                for key in list(sel.get_map().values()):
                    sent = key.data[1]
                    with contextlib.suppress(OSError):
                        key.fileobj.send(line[sent:sent + 1])
                        key.data[1] = sent + 1
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()
    return out


if __name__ == "__main__":
    host, port, seconds, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(trickle((host, port), json.load(sys.stdin), seconds, rate)))
