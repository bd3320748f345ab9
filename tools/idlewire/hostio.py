"""What `flash` and `stamp` need from the host, done one way each.

- `run`: an external command with a timeout; a missing tool or a timeout is a one-line UserError
  naming the Debian package; the caller decides what a non-zero exit means.
- `stream`: an external command's stdout read in chunks (the decompressors), its exit checked.
- `signals_interrupt`: SIGTERM and SIGHUP raise `Interrupted` (a KeyboardInterrupt) in the main
  thread, so every `finally` that cleans up after SIGINT runs for them too.
- `secret_dir`: a private (0700) temporary directory on tmpfs for files that hold private keys:
  nothing of them ever reaches a disk, and the directory goes however the process ends (except
  SIGKILL, and then only until the next reboot).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import UserError

PACKAGE = {"sfdisk": "fdisk", "mcopy": "mtools", "mdir": "mtools", "mmd": "mtools", "mtype": "mtools",
           "xz": "xz-utils", "zstd": "zstd"}
TIMEOUT = 120.0


def _missing(tool: str) -> UserError:
    return UserError(f"{tool} is not installed (Debian package '{PACKAGE.get(tool, tool)}')")


def run(cmd: Sequence[str | os.PathLike[str]], *, timeout: float = TIMEOUT, text: bool = True,
        env: dict[str, str] | None = None, pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess:
    """Run `cmd` to its end with output captured; never raises for a non-zero exit."""
    argv = [os.fspath(c) for c in cmd]
    try:
        return subprocess.run(argv, capture_output=True, text=text, check=False, timeout=timeout,
                              env=None if env is None else {**os.environ, **env}, pass_fds=tuple(pass_fds))
    except FileNotFoundError:
        raise _missing(argv[0]) from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{argv[0]} did not finish within {timeout:.0f}s ({' '.join(argv[:4])} …)") from None


def last_line(res: subprocess.CompletedProcess, keep: int = 160) -> str:
    text = res.stderr or res.stdout or ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = text.strip().splitlines()
    return (lines[-1] if lines else f"exit status {res.returncode}")[-keep:]


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


class StreamFailed(Exception):
    """The streaming command exited non-zero; `reason` is its last line of stderr."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def stream(cmd: Sequence[str | os.PathLike[str]], chunk: int) -> Iterator[bytes]:
    """`cmd`'s stdout in chunks; StreamFailed when it exits non-zero (after its last byte).
    Closing the iterator early stops the command."""
    argv = [os.fspath(c) for c in cmd]
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise _missing(argv[0]) from None
    assert proc.stdout is not None and proc.stderr is not None
    complete = False
    try:
        while data := proc.stdout.read(chunk):
            yield data
        complete = True
    finally:
        proc.stdout.close()
        if not complete:
            proc.kill()
        rc = proc.wait()
        errtext = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
    if rc != 0:
        raise StreamFailed(errtext.split(": ")[-1][-120:] or f"exit status {rc}")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where SIGINT's KeyboardInterrupt would be."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, _frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP behave as SIGINT inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP held back inside the block (delivered when it ends): for the
    few writes that must not be cut in half, such as the record's."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _tmpfs_dirs() -> list[str]:
    uid = os.getuid()
    return [d for d in (os.environ.get("IDLEWIRE_SECRET_DIR"), "/dev/shm", f"/run/user/{uid}", "/run")
            if d]


def _is_tmpfs(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            best, fstype = "", ""
            real = os.path.realpath(path)
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, right.split()[0]
        return fstype in ("tmpfs", "ramfs")
    except OSError:
        return False


def secret_dir(prefix: str, need: int = 0) -> Path:
    """A new 0700 directory on tmpfs with at least `need` bytes free; a UserError when there is
    none (secrets are never spilled to a disk)."""
    tried = []
    for base in _tmpfs_dirs():
        if not (os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK) and _is_tmpfs(base)):
            continue
        sv = os.statvfs(base)
        free = sv.f_bavail * sv.f_frsize
        if free < need:
            tried.append(f"{base} has {free >> 20} MiB free")
            continue
        return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    why = "; ".join(tried) or "no writable tmpfs (/dev/shm, /run/user/UID, /run)"
    raise UserError(f"no room for the units' private keys in memory ({why}; {need >> 20} MiB needed): "
                    "mount a tmpfs and point IDLEWIRE_SECRET_DIR at it, or stamp fewer units at once")


@contextlib.contextmanager
def private_dir(prefix: str, need: int = 0) -> Iterator[Path]:
    """secret_dir() for the length of a block, removed however the block ends (a signal that
    arrives while it is being made is held back until it can be removed again)."""
    d = None
    try:
        with signals_deferred():
            d = secret_dir(prefix, need)
        yield d
    finally:
        if d is not None:
            with signals_deferred():
                shutil.rmtree(d, ignore_errors=True)


def ensure_room(directory: Path, need: int, what: str) -> None:
    """A UserError when the filesystem of `directory` has less than `need` bytes free."""
    sv = os.statvfs(directory)
    free = sv.f_bavail * sv.f_frsize
    if free < need:
        raise UserError(f"{directory}: {free >> 20} MiB free, {need >> 20} MiB needed for {what}; "
                        "point IDLEWIRE_SECRET_DIR at a larger tmpfs, or use fewer units at once")


def write_private(path: Path, data: bytes) -> None:
    """A new file, 0600 from its creation (never briefly world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
