"""`idlewire-agent`: run the node agent, or check a configuration file."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from . import __version__
from .config import ConfigError, load, market_problem

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
    check.add_argument("--before-stamp", action="store_true", help="FILE is for a golden image whose units are "
                       "stamped later: a fact the stamp may still give (region for a marketplace) is a note, "
                       "not an error")
    check.add_argument("--unit", metavar="UNIT_TOML", help="check this unit file instead of the one node.toml "
                       "names (it must exist)")
    mode = sub.add_parser("mode", help="print the mode this node runs in: node or router (node.toml [home] mode, "
                          "the stamped unit's mode winning)",
                          description="Print node or router: [home] mode of node.toml, replaced by the unit file's "
                          "mode when the unit was stamped with one. idlewire-mode.service sets up the network from it "
                          "at boot. Exit 2 (and print nothing on stdout) when the configuration is invalid.",
                          epilog="Example: idlewire-agent mode --config /etc/idlewire/node.toml")
    mode.add_argument("--config", default=DEFAULT_CONFIG, help=f"node.toml (default {DEFAULT_CONFIG})")
    mode.add_argument("--wan", action="store_true", help="print how the WAN reaches the ISP instead: dhcp or "
                      "pppoe (a router with [home] wan = \"pppoe\" and its login file)")
    shaping.add_cli(sub)
    led = sub.add_parser("ledger", help="the metering ledger's state",
                         description="The metering ledger (STATE_DIR/ledger.sqlite) is checked at every start; "
                         "when it is damaged the agent stops and names it. Restore it from a backup, or reset it.")
    lsub = led.add_subparsers(dest="ledger_command", required=True)
    reset = lsub.add_parser("reset", help="move the ledger aside (never deleted) so the next start begins an "
                            "empty one", description="Move ledger.sqlite, its -wal/-shm files and its marker "
                            "(ledger.id) aside as *.damaged-UTCTIME in the state directory; nothing is deleted. The "
                            "next start creates an empty ledger: totals, receipts and open sessions start over "
                            "(keep the moved files: they are the old history). Refused while the agent runs.",
                            epilog="Example: systemctl stop idlewire-agent; idlewire-agent ledger reset; "
                            "systemctl start idlewire-agent")
    reset.add_argument("--config", default=DEFAULT_CONFIG, help=f"node.toml (default {DEFAULT_CONFIG})")
    stamp = sub.add_parser(
        "consume-stamp", help="apply the unit stamp on the boot partition (first boot), erase its secrets",
        description="Apply BOOT/idlewire/stamp.toml and node.key (left by `idlewire stamp`) to this node: "
        "/etc/idlewire/node.key and unit.toml, the admin's SSH keys, hostname, Wi-Fi; then erase the "
        "secrets from the boot partition and leave stamp.done. A stamp with a bad value is refused whole "
        "(one line, exit 2), its secrets erased all the same. No stamp: nothing to do, exit 0.",
        epilog="Example: idlewire-agent consume-stamp   (idlewire-firstboot runs it at every boot)")
    stamp.add_argument("--boot", metavar="DIR", help="the mounted boot partition (default: /boot/firmware or "
                       "/boot/efi, mounted from fstab when needed)")
    stamp.add_argument("--root", metavar="DIR", default="/", help="the root filesystem to apply it to (default /)")
    stamp.add_argument("--admin", metavar="USER", default="idlewire", help="the account whose "
                       "authorized_keys get the stamped SSH keys (default idlewire)")
    args = parser.parse_args(argv)

    if args.command == "consume-stamp":
        from .consume import consume

        return consume(args.boot, args.root, args.admin)

    if args.command == "mode":
        cfg = _load(args.config)
        if cfg is None:
            return 2
        if args.wan:
            from . import schema
            from .config import wan_kind

            kind = wan_kind(cfg)
            if kind != cfg.policy.home.wan and cfg.policy.home.mode == "router":
                print(f"PPPoE refused: no login in {schema.PPPOE_FILE}; stamp the unit with pppoe.user and "
                      "pppoe.password (or set the roles' idlewire_pppoe_user/_password); the WAN uses DHCP",
                      file=sys.stderr)
            print(kind)
        else:
            print(cfg.policy.home.mode)
        return 0
    if args.command == "shaping":
        return shaping.cli_main(args)
    if args.command == "ledger":
        return ledger_reset(args.config)

    if args.command == "check-config":
        try:
            cfg = load(args.file, args.unit)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        problem = market_problem(cfg, args.file)
        if problem and not args.before_stamp:
            print(problem, file=sys.stderr)
            return 2
        print(f"{args.file}: OK")
        if problem:
            print(f"{args.file}: note: marketplace {cfg.marketplace} without a region: each unit's stamp must "
                  "give region (unit.yml region:), or the agent refuses to start")
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


def _load(path: str):
    """node.toml, or None after printing its errors."""
    try:
        return load(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def run_agent(path: str) -> int:
    cfg = _load(path)
    if cfg is None:
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), format="%(name)s: %(message)s")
    problem = market_problem(cfg, path)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if cfg.marketplace.startswith("https:"):
        try:
            import ssl  # noqa: F401
        except ImportError:
            print(f"{path}: [node] marketplace: {cfg.marketplace} is https:// but this Python has no ssl module: "
                  "install it (OpenWrt: opkg install python3-openssl)", file=sys.stderr)
            return 2
    # The agent speaks plain HTTP on the LAN and never TLS: keep http.client from loading the ssl
    # module (about 1 MB of RSS on a small node), unless the marketplace is an https:// hub.
    if "ssl" not in sys.modules and not cfg.marketplace.startswith("https:"):
        sys.modules["ssl"] = None  # type: ignore[assignment]
    from . import api
    from .agent import Agent
    from .ledger import LedgerError, explain
    from .wg import WgError

    try:
        hold = state_lock(cfg.state_dir)
    except OSError as exc:
        where = exc.filename or cfg.state_dir
        err = explain(exc, where)
        print(f"idlewire-agent: cannot start: {err if err.full else f'{where}: {exc.strerror}'}; [node] state_dir "
              "must be a directory the agent can write", file=sys.stderr)
        return 1
    if hold is None:
        print(f"idlewire-agent: cannot start: another agent runs on {cfg.state_dir} (it holds "
              f"{os.path.join(cfg.state_dir, LOCK_FILE)}); stop it first", file=sys.stderr)
        return 1
    try:
        agent = Agent(cfg)
        try:
            agent.sync_interface()
        except LedgerError as exc:  # a full disk: run on, the polls retry (ledger.py); else stop
            if not exc.full:
                raise
            logging.getLogger("idlewire.agent").error("%s; metering retries every poll", exc)
    except LedgerError as exc:
        print(f"idlewire-agent: cannot start: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, WgError) as exc:
        if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC: the file it names, in one line
            exc = explain(exc, exc.filename or cfg.state_dir)
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
    try:  # the market runs in threads of its own; with marketplace = "" it is not even imported
        if cfg.marketplace:
            from .market import Seller

            Seller(agent, cfg.marketplace).start(stop)
        else:
            agent.ledger.disable_uploads()
    except LedgerError as exc:  # a full disk at start: the market starts with the next start
        logging.getLogger("idlewire.agent").error("marketplace: %s", exc)
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
    hold.close()
    return 0


LOCK_FILE = "agent.lock"


def state_lock(state_dir: str):
    """An exclusive lock on STATE_DIR/agent.lock for the agent's life (an open file), or None when
    another process holds it: one agent per ledger, and no `ledger reset` under a running one."""
    import fcntl

    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    f = open(os.path.join(state_dir, LOCK_FILE), "a")  # noqa: SIM115 (held open for the agent's life)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def ledger_reset(config: str) -> int:
    """`idlewire-agent ledger reset`: move the ledger's files aside (never delete them)."""
    import time

    from .ledger import marker_path

    cfg = _load(config)
    if cfg is None:
        return 2
    path = os.path.join(cfg.state_dir, "ledger.sqlite")
    try:
        hold = state_lock(cfg.state_dir)
    except OSError as exc:
        print(f"idlewire-agent: {cfg.state_dir}: {exc.strerror}", file=sys.stderr)
        return 1
    if hold is None:
        print(f"idlewire-agent: the agent is running on {cfg.state_dir}: stop it first "
              "(systemctl stop idlewire-agent, or /etc/init.d/idlewire-agent stop)", file=sys.stderr)
        return 1
    try:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved = []
        for p in (path, path + "-wal", path + "-shm", marker_path(path)):
            if os.path.lexists(p):
                dest = f"{p}.damaged-{stamp}"
                os.rename(p, dest)
                moved.append(dest)
    except OSError as exc:
        print(f"idlewire-agent: cannot move {exc.filename} aside: {exc.strerror}", file=sys.stderr)
        return 1
    finally:
        hold.close()
    if not moved:
        print(f"{path}: no ledger there; the next start creates an empty one")
        return 0
    for dest in moved:
        print(f"moved aside: {dest}")
    print(f"{path}: the next start creates an empty ledger (the moved files are the old history: keep them)")
    return 0


def wan_addresses(cfg) -> set[str]:
    """Addresses on the WAN and tunnel interfaces (`ip -j addr`), where the API must never listen."""
    import json

    from . import run

    out: set[str] = set()
    for dev in (cfg.interfaces.wan, cfg.tunnel.interface):
        try:
            p = run.run(["ip", "-j", "addr", "show", "dev", dev], check=False)
        except run.CommandError as exc:
            logging.getLogger("idlewire.agent").warning("api.listen check: %s", exc)
            continue
        try:
            for link in json.loads(p.stdout or "[]"):
                out.update(a.get("local", "") for a in link.get("addr_info", []))
        except ValueError:
            continue
    return out


if __name__ == "__main__":
    sys.exit(main())
