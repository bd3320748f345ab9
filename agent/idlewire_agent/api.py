"""The local HTTP API (standard library server). Listens on management/LAN addresses only."""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import __version__

log = logging.getLogger("idlewire.api")


class Handler(BaseHTTPRequestHandler):
    server_version = f"idlewire-agent/{__version__}"

    def log_message(self, fmt, *args):  # route to logging, not stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self._send(200, {"status": "ok", "version": __version__})
        else:
            self._send(404, {"error": "not found"})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _server(addr: str, port: int) -> ThreadingHTTPServer:
    cls = type("S", (_Server,), {"address_family": socket.AF_INET6 if ":" in addr else socket.AF_INET})
    return cls((addr, port), Handler)


def serve(listen: list[str], port: int) -> list[ThreadingHTTPServer]:
    servers = [_server(a, port) for a in listen]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True, name=f"api-{s.server_address}").start()
        log.info("API listening on %s port %d", s.server_address[0], port)
    return servers
