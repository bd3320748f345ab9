"""Real hub processes on loopback, and a real PostgreSQL server the tests start themselves."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    pass


class HubProc:
    """`idlewire hub serve` as a real process (uvicorn) on 127.0.0.1."""

    def __init__(self, db_url: str, port: int | None = None, log: Path | None = None, workers: int = 1):
        self.db_url, self.port, self.workers = db_url, port or free_port(), workers
        self.fixed_port = port is not None
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or Path(tempfile.mkstemp(prefix="hub-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> HubProc:
        for _ in range(5):
            try:
                return self._start(timeout)
            except PortTaken:  # another test on this machine took the free port first
                if self.fixed_port:
                    raise
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
        raise RuntimeError("no free port for the hub after 5 tries")

    def _start(self, timeout: float) -> HubProc:
        start = self.log.stat().st_size if self.log.exists() else 0
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tools'}:{ROOT / 'agent'}"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "idlewire", "hub", "serve", "--db", self.db_url,
                                          "--listen", f"127.0.0.1:{self.port}", "--log-level", "warning",
                                          "--workers", str(self.workers)],
                                         stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log.read_text()[start:]
                if "address already in use" in text:
                    raise PortTaken(text)
                raise RuntimeError(f"hub exited {self.proc.returncode}: {text[-2000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/v1", timeout=2) as r:  # noqa: S310
                json.load(r)
                return self
            time.sleep(0.1)
        raise RuntimeError(f"hub did not answer within {timeout} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """kill -9: what a crash or power cut does to the process (and its workers)."""
        if self.proc and self.proc.poll() is None:
            for child in _children(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return str(Path(found[-1]).parent) if found else None


class Postgres:
    """initdb + pg_ctl in a temporary directory as the unprivileged user `nobody`, on 127.0.0.1.

    durable=False (the tests): fsync=off, fast and enough for what they check. durable=True (bench/hub.py):
    PostgreSQL's own defaults for what a commit means, as a production server keeps them (fsync=on,
    synchronous_commit=on, full_page_writes=on): a commit the hub acknowledged is on disk."""

    def __init__(self, durable: bool = False):
        self.durable = durable
        self.bin = pg_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="idlewire-pg-"))
        self.data = self.dir / "data"
        self.user = "nobody"
        self.url = f"postgresql://hub@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.getuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, cwd=self.dir)

    def start(self) -> Postgres:
        if os.getuid() == 0:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run(f"{self.bin}/initdb", "-D", str(self.data), "-U", "hub", "-A", "trust", "-E", "UTF8", "--no-sync")
        self._run(f"{self.bin}/pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                  f"{'' if self.durable else '-c fsync=off '}-c max_connections=300", "start")
        return self

    def new_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=hub dbname=postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://hub@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(f"{self.bin}/pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_missing() -> str | None:
    if pg_bin() is None:
        return "PostgreSQL is not installed (tools/scripts/deps.sh test installs Debian's postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e .)"
    if os.getuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "no unprivileged user 'nobody' to run PostgreSQL as"
    return None
