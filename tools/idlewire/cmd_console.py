"""`idlewire console PORT`: the serial console, interactive or scripted (bootstrap, run, log)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

from .clikit import App, Arg, LazyConsole, Opt
from .errors import UserError

err = LazyConsole(stderr=True, highlight=False)


def register(app: App) -> None:
    app.command(name="console")(console)


def console(
    port: Annotated[str, Arg(help="Serial device (/dev/ttyUSB0, /dev/ttyAMA0) or pyserial URL "
                             "(socket://127.0.0.1:4555 for a raw TCP port, rfc2217://HOST:PORT "
                             "for a console server; add ?timeout=10 on a slow link, "
                             "?ign_set_control for servers that do not acknowledge flow "
                             "control).")],
    bootstrap: Annotated[bool, Opt("--bootstrap", help="Log in, install an SSH key (--key) for "
                                   "--key-user, print the node's addresses.")] = False,
    run: Annotated[list[str] | None, Opt("--run", help="Log in and run CMD; repeatable. Exit "
                                         "status: the first failing command's.")] = None,
    until_prompt: Annotated[bool, Opt("--until-prompt", help="Only wait for a login or shell "
                                      "prompt (boot finished), then exit; with --log: a boot "
                                      "log.")] = False,
    log: Annotated[Path | None, Opt("--log", help="Write every byte received to FILE (the boot "
                                    "log when connected before power-on).")] = None,
    key: Annotated[Path | None, Opt("--key", help="Public key to install (default: "
                                    "~/.ssh/id_ed25519.pub, id_ecdsa.pub, id_rsa.pub).")] = None,
    key_user: Annotated[str, Opt("--key-user", help="Account the key is for (base_admin_user "
                                 "on idlewire images; root uses /etc/dropbear on "
                                 "OpenWrt).")] = "idlewire",
    user: Annotated[str, Opt("--user", help="Login name typed at a login prompt (idlewire images "
                             "log root in automatically).")] = "root",
    password_env: Annotated[str, Opt("--password-env", help="Environment variable holding the "
                                     "password, for systems that ask one (never on the command "
                                     "line).")] = "IDLEWIRE_CONSOLE_PASSWORD",  # noqa: S107
    baud: Annotated[int, Opt("--baud", help="Baud rate of a serial device.")] = 115200,
    line_delay: Annotated[float, Opt("--line-delay", help="Seconds to pause after each typed "
                                     "chunk: 0.02-0.1 for slow UARTs that drop "
                                     "characters.")] = 0.0,
    timeout: Annotated[float, Opt("--timeout", help="Seconds to wait for a shell (a booting "
                                  "node: boot time plus a margin).")] = 120.0,
    command_timeout: Annotated[float, Opt("--command-timeout", help="Seconds each --run "
                                          "command may take.")] = 60.0,
    as_json: Annotated[bool, Opt("--json", help="Print JSON results on stdout.")] = False,
) -> None:
    """Talk to a node over its serial console; with no action flag, an interactive terminal.

    Interactive: keys go to the node, the node's output to you; leave with Ctrl-].

    Scripted (--bootstrap, --run, --until-prompt): waits for the line to go quiet, recognises a
    login, password or shell prompt (idlewire images log root in on the serial console, see
    roles/base/README.md), silences kernel messages (dmesg -n 1), and runs each command between
    markers so its output and exit status come back intact over a raw console.

    Examples:
      idlewire console /dev/ttyUSB0 --bootstrap --key ~/.ssh/id_ed25519.pub
      idlewire console socket://127.0.0.1:4555 --log boot.log --until-prompt --timeout 300
      idlewire console /dev/ttyUSB0 --run 'systemctl is-active idlewire-agent' --json
    """
    from .console import Console, ConsoleError, check_key, default_key

    if baud <= 0:
        raise UserError(f"--baud {baud}: expected a positive rate such as 115200")
    if line_delay < 0 or timeout <= 0 or command_timeout <= 0:
        raise UserError("--line-delay must be ≥ 0 and --timeout/--command-timeout > 0")
    key_line = None
    if bootstrap:
        key = key or default_key()
        if key is None:
            raise UserError("--bootstrap needs a public key: give --key FILE.pub (no ~/.ssh/id_*.pub found)")
        try:
            key_line = check_key(key.read_text(), str(key))
        except OSError as exc:
            raise UserError(f"{key}: cannot read: {exc.strerror}") from None
    password = os.environ.get(password_env) if password_env else None
    interactive = not (bootstrap or run or until_prompt)

    with _log_file(log) as logf:
        con = Console(port, baud=baud, line_delay=line_delay, log=logf)
        with con:
            if interactive:
                return _passthrough(con)
            say = (lambda m: err.print(f"[dim]{m}[/dim]")) if not as_json else (lambda _m: None)
            t0 = time.monotonic()
            if until_prompt:
                _wait_prompt(con, timeout, say)
                if as_json:
                    print(json.dumps({"prompt": True, "seconds": round(time.monotonic() - t0, 1),
                                      "log": str(log) if log else None}))
                else:
                    err.print(f"[green]prompt[/green] after {time.monotonic() - t0:.0f}s")
                return
            how = con.login(user, password, timeout, status=say)
            con.setup()
            say(f"logged in ({how}), uid {con.uid}; kernel messages silenced")
            out: dict = {"port": port, "login": how, "uid": con.uid}
            status = 0
            if bootstrap:
                out["key_user"] = key_user
                out["key"] = con.install_key(key_line, key_user)
                out["hostname"] = con.hostname()
                out["addresses"] = con.addresses()
                if not as_json:
                    err.print(f"[green]key {out['key']}[/green] for {key_user} on {out['hostname']}")
                    for a in out["addresses"]:
                        print(f"{a['interface']:12} {a['family']:6} {a['address']}")
                    ipv4 = [a["address"].split("/")[0] for a in out["addresses"] if a["family"] == "inet"]
                    if ipv4:
                        err.print(f"next: ssh {key_user}@{ipv4[0]}")
            results = []
            for cmd in run or []:
                try:
                    res = con.run(cmd, timeout=command_timeout)
                except ConsoleError:
                    raise
                results.append(res)
                if not as_json:
                    sys.stdout.write(res.output + ("\n" if res.output and not res.output.endswith("\n") else ""))
                    if res.status:
                        err.print(f"[red]exit {res.status}[/red]: {cmd}")
                if res.status and not status:
                    status = res.status
            if run:
                out["results"] = [r.as_dict() for r in results]
            if as_json:
                print(json.dumps(out, indent=1))
            if status:
                raise SystemExit(status)


@contextlib.contextmanager
def _log_file(path: Path | None):
    """The log is written to PATH.part and renamed at the end (also after an error: it is the record)."""
    if path is None:
        yield None
        return
    part = path.with_name(path.name + ".part")
    try:
        f = part.open("wb")
    except OSError as exc:
        raise UserError(f"--log {path}: cannot write: {exc.strerror}") from None
    try:
        yield f
    finally:
        f.close()
        part.replace(path)


def _wait_prompt(con, timeout: float, say) -> None:
    from .console import ConsoleError, classify

    say("waiting for a login or shell prompt")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        con.read(0.2)
        if classify(con.text()) in ("login", "shell"):
            con.wait_quiet(0.5, limit=2)
            if classify(con.text()) in ("login", "shell"):
                return
    raise ConsoleError(f"{con.port}: no login or shell prompt within {timeout:.0f}s")


def _passthrough(con) -> None:
    """Raw terminal: stdin → console, console → stdout, until Ctrl-] (or EOF on a pipe)."""
    stop = threading.Event()
    out = sys.stdout.buffer
    fd = sys.stdin.fileno()
    tty_in = os.isatty(fd)

    def pump() -> None:
        while not stop.is_set():
            try:
                data = con.read(0.05)
            except Exception:  # the port went away; the main loop reports it
                stop.set()
                return
            if data:
                out.write(data)
                out.flush()
            con.consume()

    t = threading.Thread(target=pump, daemon=True)
    old = None
    if tty_in:
        import termios
        import tty

        old = termios.tcgetattr(fd)
        tty.setraw(fd)
        err.print(f"[dim]connected to {con.port}; Ctrl-] leaves[/dim]\r")
    t.start()
    try:
        while not stop.is_set():
            data = os.read(fd, 1024)
            if not data:
                time.sleep(1.0)  # a pipe ended: let the answer arrive
                break
            if b"\x1d" in data:
                con.write(data.split(b"\x1d", 1)[0])
                break
            con.write(data if tty_in else data.replace(b"\n", b"\r"))
    finally:
        stop.set()
        t.join(timeout=1)
        if old is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, old)
            err.print("\n[dim]disconnected[/dim]")
