"""The one way the agent runs an external command (ip, wg, wireguard-go, tc, nft).

Every command gets an argument list (never a shell), a timeout, and, when it fails, ONE line that
names the command and what went wrong: "tc -batch -: no answer in 10 s (killed)". Each command is
logged at debug level, a killed one as a warning. A command that does not answer (a wedged
wireguard-go behind its control socket, a tc stuck in the kernel) is killed after its timeout, so
no caller waits for ever. Callers must not hold the ledger's lock while a command runs (agent.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence

log = logging.getLogger("idlewire.run")

TIMEOUT = 10.0  # seconds; `ip`, `wg`, `tc` and `nft` answer in milliseconds when they answer at all


class CommandError(Exception):
    """An external command failed, was not found or did not answer; str() is one line."""


# Locks no command may run under (the agent registers its ledger lock): a command started while one
# is held is logged as an error (a bug: a wedged command would stall everything behind that lock).
_forbidden: list = []


def forbid_under(lock) -> None:
    """Report every command started while `lock` (a threading.RLock) is held by the caller."""
    _forbidden.append(lock)


def _check_locks(argv: Sequence[str]) -> None:
    if any(lk._is_owned() for lk in _forbidden):
        log.error("%s runs while the ledger lock is held (a bug: a wedged command would stall the API and "
                  "the metering)", _name(argv))


def _name(argv: Sequence[str], words: int = 8) -> str:
    """The command as the error shows it: its first words (never a key given on stdin)."""
    return " ".join(argv[:words])


def _not_found(argv: Sequence[str], error: type[CommandError]) -> CommandError:
    return error(f"{argv[0]}: not found on PATH; install it (it ships with iproute2, wireguard-tools or "
                 "nftables) or fix PATH in the service's environment")


def _timed_out(argv: Sequence[str], timeout: float, error: type[CommandError]) -> CommandError:
    log.warning("%s: no answer in %g s, killed", _name(argv), timeout)
    return error(f"{_name(argv)}: no answer in {timeout:g} s (killed)")


def _kill(p: subprocess.Popen) -> None:
    """SIGKILL the command's whole process group (it was started in a session of its own)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        with contextlib.suppress(OSError):
            p.kill()


def run(argv: Sequence[str], *, input: str | None = None, timeout: float | None = None, check: bool = True,
        env: dict | None = None, capture: bool = True,
        error: type[CommandError] = CommandError) -> subprocess.CompletedProcess:
    """Run `argv` and wait at most `timeout` s (TIMEOUT by default).

    Raises `error` (a CommandError subclass the caller chooses) when the command is missing or
    killed, and, with `check`, when it exits non-zero (the message carries its stderr's first line).
    `capture=False` sends its output to /dev/null (a daemon that forks, like wireguard-go).
    """
    argv = [str(a) for a in argv]
    _check_locks(argv)
    limit = TIMEOUT if timeout is None else timeout
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    t0 = time.monotonic()
    try:  # its own process group: a timeout kills what it started too (those would hold the pipes open)
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE, stdout=out,
                             stderr=out, text=True, env=env, start_new_session=True)
    except FileNotFoundError:
        raise _not_found(argv, error) from None
    except OSError as exc:
        raise error(f"{_name(argv)}: cannot run it: {exc.strerror or exc}") from None
    with p:
        try:
            stdout, stderr = p.communicate(input, timeout=limit)
        except subprocess.TimeoutExpired:
            _kill(p)
            raise _timed_out(argv, limit, error) from None
    p = subprocess.CompletedProcess(argv, p.returncode, stdout, stderr)
    log.debug("%s: exit %d in %.3f s", _name(argv, 12), p.returncode, time.monotonic() - t0)
    if check and p.returncode != 0:
        why = ((p.stderr or p.stdout or "").strip().splitlines() or [f"exit status {p.returncode}"])[0]
        raise error(f"{_name(argv)}: {why}")
    return p


def lines(argv: Sequence[str], *, timeout: float | None = None,
          error: type[CommandError] = CommandError) -> Iterator[str]:
    """Yield `argv`'s stdout line by line as it comes (a long output never sits in memory whole).

    Killed after `timeout` s in all; raises `error` at the end when it was killed or failed. Consume
    the iterator to the end (or close it), or the command is left running until the timeout.
    """
    argv = [str(a) for a in argv]
    _check_locks(argv)
    limit = TIMEOUT if timeout is None else timeout
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    except FileNotFoundError:
        raise _not_found(argv, error) from None
    except OSError as exc:
        raise error(f"{_name(argv)}: cannot run it: {exc.strerror or exc}") from None
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        _kill(p)

    watchdog = threading.Timer(limit, kill)
    watchdog.daemon = True
    watchdog.start()
    try:
        with p:
            yield from p.stdout
            err = p.stderr.read()
    finally:
        watchdog.cancel()
        if p.poll() is None:  # the caller stopped reading early
            _kill(p)
            p.wait()
    if killed.is_set():
        raise _timed_out(argv, limit, error)
    if p.returncode != 0:
        raise error(f"{_name(argv)}: {(err.strip().splitlines() or [f'exit status {p.returncode}'])[0]}")
