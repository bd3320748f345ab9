"""`idlewire-agent`: run the node agent, or check a configuration file."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from . import __version__, api, shaping
from .config import ConfigError, load

DEFAULT_CONFIG = "/etc/idlewire/node.toml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="idlewire-agent", description="idlewire node agent")
    parser.add_argument("--version", action="version", version=f"idlewire-agent {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the agent (what the service does)")
    run.add_argument("--config", default=DEFAULT_CONFIG)
    check = sub.add_parser("check-config", help="validate a node.toml and report every error")
    check.add_argument("file")
    shaping.add_cli(sub)
    args = parser.parse_args(argv)

    if args.command == "shaping":
        return shaping.cli_main(args)

    if args.command == "check-config":
        try:
            load(args.file)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        print(f"{args.file}: OK")
        return 0
    if args.command in (None, "run"):
        path = getattr(args, "config", DEFAULT_CONFIG)
        try:
            cfg = load(path)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        logging.basicConfig(level=cfg.log_level.upper(), format="%(name)s: %(message)s")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            servers = api.serve(cfg.api.listen, cfg.api.port)
        except OSError as exc:
            print(f"idlewire-agent: cannot listen on {cfg.api.listen} port {cfg.api.port}: "
                  f"{exc.strerror}", file=sys.stderr)
            return 1
        stop.wait()
        for s in servers:
            s.shutdown()
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
