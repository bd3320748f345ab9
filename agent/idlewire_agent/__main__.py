"""`idlewire-agent`: run the node agent, or check a configuration file."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from . import __version__
from .config import ConfigError, load

DEFAULT_CONFIG = "/etc/idlewire/node.toml"


def _run_config(argv: list[str]) -> str | None:
    """The config path of a plain `run [--config FILE]` command line, else None.

    The service always starts the agent this way: it is parsed without argparse (and without the
    shaping CLI), whose modules would stay in the agent's memory for its whole life (~2 MB RSS).
    """
    if not argv:
        return DEFAULT_CONFIG
    if argv[0] != "run":
        return None
    argv = argv[1:]
    if not argv:
        return DEFAULT_CONFIG
    if len(argv) == 2 and argv[0] == "--config" and not argv[1].startswith("-"):
        return argv[1]
    if len(argv) == 1 and argv[0].startswith("--config=") and len(argv[0]) > 9:
        return argv[0][9:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = _run_config(argv)
    if path is not None:
        return run_agent(path)
    import argparse

    from . import shaping

    parser = argparse.ArgumentParser(
        prog="idlewire-agent", description="idlewire node agent: WireGuard sessions for buyers, a crash-safe "
        "metering ledger, signed usage receipts and a local API.",
        epilog="Example: idlewire-agent check-config /etc/idlewire/node.toml")
    parser.add_argument("--version", action="version", version=f"idlewire-agent {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the agent (what the service does)")
    run.add_argument("--config", default=DEFAULT_CONFIG, help=f"node.toml to use (default {DEFAULT_CONFIG})")
    check = sub.add_parser("check-config", help="validate a node.toml and the unit file it names (unit.toml: "
                           "the stamped payout address and caps); every error, exit 2 on errors",
                           description="Validate node.toml, then the unit's stamped settings ([node] unit_file, "
                           "default /etc/idlewire/unit.toml, when present): every error names its file and key. "
                           "Prints what the unit's caps change.")
    check.add_argument("file")
    check.add_argument("--unit", metavar="UNIT_TOML", help="check this unit file instead of the one node.toml "
                       "names (it must exist)")
    shaping.add_cli(sub)
    args = parser.parse_args(argv)

    if args.command == "shaping":
        return shaping.cli_main(args)

    if args.command == "check-config":
        try:
            cfg = load(args.file, args.unit)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        print(f"{args.file}: OK")
        u = cfg.unit
        if u.present:
            print(f"{u.path}: OK: unit {u.unit or '?'}, payout address {u.payout_address or 'none'}")
            for note in u.notes:
                print(f"{u.path}: {note}")
        return 0
    if args.command in (None, "run"):
        return run_agent(getattr(args, "config", DEFAULT_CONFIG))
    parser.print_help()
    return 2


def run_agent(path: str) -> int:
    try:
        cfg = load(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), format="%(name)s: %(message)s")
    # The agent speaks plain HTTP on the LAN and never TLS: keep http.client from loading the ssl
    # module (about 1 MB of RSS on a small node). Remove this if the agent ever needs https.
    if "ssl" not in sys.modules:
        sys.modules["ssl"] = None  # type: ignore[assignment]
    from . import api
    from .agent import Agent
    from .wg import WgError

    try:
        agent = Agent(cfg)
        agent.sync_interface()
    except (OSError, ValueError, WgError) as exc:
        print(f"idlewire-agent: cannot start: {exc}", file=sys.stderr)
        return 1
    exposed = wan_addresses(cfg)
    bad = [a for a in cfg.api.listen if a in exposed]
    if bad:
        print(f"idlewire-agent: api.listen: {', '.join(bad)} is on the WAN or tunnel interface; expected "
              "management/LAN addresses only", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # `kill -USR1 PID`: every thread's stack to the log (a stuck agent tells where it is)
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        agent.start_policy(stop)
    except Exception as exc:  # OSError, or shaping.TcError (shaping is imported only when enabled)
        shaping = sys.modules.get(f"{__package__}.shaping")
        if not isinstance(exc, OSError) and not (shaping and isinstance(exc, shaping.TcError)):
            raise
        print(f"idlewire-agent: cannot set up shaping: {exc}", file=sys.stderr)
        return 1
    try:
        servers = api.serve(cfg.api.listen, cfg.api.port, agent)
    except OSError as exc:
        print(f"idlewire-agent: cannot listen on {cfg.api.listen} port {cfg.api.port}: "
              f"{exc.strerror}", file=sys.stderr)
        return 1
    logging.getLogger("idlewire.agent").info("running: node key %s, interface %s, polling every %gs",
                                             agent.node_pub, cfg.tunnel.interface, cfg.metering.poll_interval)
    while not stop.wait(cfg.metering.poll_interval):
        try:
            agent.poll()
        except Exception:  # keep metering: one bad cycle must not stop the agent
            logging.getLogger("idlewire.agent").exception("poll cycle failed")
        try:  # between polls: one short step of receipt retention
            agent.prune_receipts()
        except Exception:
            logging.getLogger("idlewire.agent").exception("receipt retention failed")
    agent.poll()
    if agent.home:  # the UPnP mapping is removed from the home router on the way out
        agent.home.close()
    for s in servers:
        s.shutdown()
    agent.ledger.close()
    return 0


def wan_addresses(cfg) -> set[str]:
    """Addresses on the WAN and tunnel interfaces (`ip -j addr`), where the API must never listen."""
    import json
    import subprocess

    out: set[str] = set()
    for dev in (cfg.interfaces.wan, cfg.tunnel.interface):
        p = subprocess.run(["ip", "-j", "addr", "show", "dev", dev], capture_output=True, text=True, check=False)
        try:
            for link in json.loads(p.stdout or "[]"):
                out.update(a.get("local", "") for a in link.get("addr_info", []))
        except ValueError:
            continue
    return out


if __name__ == "__main__":
    sys.exit(main())
