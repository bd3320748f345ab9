"""`idlewire console` against fake serial consoles on a loopback socket (pyserial socket://).

The fakes misbehave the way real lines do: garbage bytes and escape noise before the prompt,
prompt look-alikes in the noise, a prompt that comes late, a password prompt, refused logins.
Behind the fake login sits a real POSIX shell on a pseudo-terminal (echo on, CR LF), so the
marker framing is tested against the real thing.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import random
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from idlewire.console import Console, ConsoleError, classify, clean

ROOT = Path(__file__).resolve().parents[2]


class FakeConsole:
    """A TCP server that plays one scenario per connection."""

    def __init__(self, scenario: str, garbage_s: float = 2.0, password: str | None = "s3cret"):  # noqa: S107
        self.scenario, self.garbage_s, self.password = scenario, garbage_s, password
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.url = f"socket://127.0.0.1:{self.port}"
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.procs: list[subprocess.Popen] = []
        self.rng = random.Random(7)
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for p in self.procs:
            p.kill()
            p.wait()

    # ---- pieces ------------------------------------------------------------------------
    def _garbage(self, conn: socket.socket, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.stop.is_set():
            pick = self.rng.random()
            if pick < 0.3:
                chunk = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 40)))
            elif pick < 0.5:
                chunk = b"\x1b[0;3%dm[ %5.1f] noise\x1b[0m\r\n" % (self.rng.randrange(8), time.monotonic() % 100)
            elif pick < 0.6:
                chunk = b"\x1b]104\x07\x1b[?2004h\x1b[6n"
            elif pick < 0.7:
                chunk = b"\r\nnot-a-shell$ "  # a prompt look-alike the shell probe must see through
            else:
                chunk = b"\xff\xfe\x00 trailing \xc3("
            conn.sendall(chunk)
            time.sleep(self.rng.uniform(0.0, 0.15))
        self._drain(conn)

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        """Discard what was typed so far (a getty flushes input before its prompt)."""
        conn.setblocking(False)
        try:
            while conn.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        conn.setblocking(True)

    def _readline(self, conn: socket.socket, timeout: float = 30) -> str | None:
        buf = b""
        conn.settimeout(timeout)
        try:
            while not buf.endswith((b"\r", b"\n")):
                b = conn.recv(1)
                if not b:
                    return None
                conn.sendall(b if b not in (b"\r", b"\n") else b"\r\n")  # echo
                buf += b
        except OSError:
            return None
        return buf.decode(errors="replace").strip()

    def _shell(self, conn: socket.socket) -> None:
        """A real sh on a pty, its output sprinkled with escape noise."""
        master, slave = pty.openpty()
        env = {"PATH": os.environ["PATH"], "PS1": "fake# ", "HOME": "/tmp", "TERM": "vt220"}
        p = subprocess.Popen(["sh", "-i"], stdin=slave, stdout=slave, stderr=slave, env=env,
                             start_new_session=True)
        self.procs.append(p)
        os.close(slave)
        conn.setblocking(False)
        try:
            while not self.stop.is_set() and p.poll() is None:
                r, _, _ = select.select([master, conn], [], [], 0.1)
                if master in r:
                    data = os.read(master, 4096)
                    if self.rng.random() < 0.5:
                        data = b"\x1b[1m" + data + b"\x1b[?2004h"
                    conn.sendall(data)
                if conn in r:
                    data = conn.recv(4096)
                    if not data:
                        break
                    os.write(master, data)
        except OSError:
            pass
        finally:
            p.kill()
            os.close(master)

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the client went away
            self._play(conn)

    def _play(self, conn: socket.socket) -> None:
        with conn:
            if self.scenario == "silent":
                while not self.stop.wait(0.2):
                    pass
                return
            if self.scenario == "shell":
                self._shell(conn)
                return
            if self.scenario == "garbage-forever":
                self._garbage(conn, 3600)
                return
            self._garbage(conn, self.garbage_s)
            time.sleep(1.5)  # quiet, then the late prompt
            while not self.stop.is_set():
                conn.sendall(b"\r\n\x1b[1mDebian GNU/Linux 13 fake ttyS0\x1b[0m\r\n\r\nfake login: ")
                name = self._readline(conn)
                if name is None:
                    return
                if not name:
                    continue
                if self.password is not None:
                    conn.sendall(b"Password: ")
                    pw = self._readline(conn)
                    if pw is None:
                        return
                    ok = name == "root" and pw == self.password and self.scenario != "refuse"
                else:
                    ok = name == "root"
                if ok:
                    self._shell(conn)
                    return
                time.sleep(0.2)
                conn.sendall(b"\r\nLogin incorrect\r\n")


@pytest.fixture
def fake():
    made: list[FakeConsole] = []

    def make(*args, **kwargs) -> FakeConsole:
        made.append(FakeConsole(*args, **kwargs))
        return made[-1]

    yield make
    for f in made:
        f.close()


def test_clean_and_classify():
    raw = "\x1b[?2004hroot@node:~# \x1b]104\x07"
    assert clean(raw) == "root@node:~# "
    assert classify(clean(raw)) == "shell"
    assert classify("boot\r\nnode login: ".replace("\r\n", "\n")) == "login"
    assert classify("Password: ") == "password"
    assert classify("[   12.3] booting") is None
    assert clean("a\r\nb\rc\x07\x1b[6n") == "a\nbc"


def test_login_through_noise_late_prompt_and_password(fake):
    f = fake("noisy", garbage_s=2.5)
    t0 = time.monotonic()
    with Console(f.url, quiet=0.6) as con:
        how = con.login("root", "s3cret", timeout=40)
        assert how == "password login"
        con.setup()
        res = con.run("echo hello; printf 'x\\ny'; exit_code() { return 7; }; exit_code")
        assert (res.status, res.output) == (7, "hello\nx\ny")
        # Quotes, dollar signs and a long line survive the framing.
        res = con.run("printf '%s\\n' \"it's $((6*7))\" '" + "z" * 300 + "'")
        assert res.status == 0 and res.output == "it's 42\n" + "z" * 300 + "\n"
        assert con.run("true").output == ""
        # A file written in chunks arrives intact.
        target = f"/tmp/iw-console-test-{os.getpid()}"
        try:
            content = "line one\n" + "ssh-ed25519 " + "A" * 150 + " o'hara@x\n"
            con.put_file(target, content)
            assert Path(target).read_text() == content
            assert oct(Path(target).stat().st_mode & 0o777) == "0o600"
        finally:
            Path(target).unlink(missing_ok=True)
    assert time.monotonic() - t0 < 40


def test_gives_up_on_garbage_with_clear_message(fake):
    f = fake("garbage-forever")
    t0 = time.monotonic()
    with Console(f.url, quiet=0.5) as con, pytest.raises(ConsoleError) as exc:
        con.login("root", None, timeout=6)
    took = time.monotonic() - t0
    assert 5 <= took <= 14, took
    msg = str(exc.value)
    assert "no shell within 6s" in msg and "--baud" in msg


def test_gives_up_on_silence_naming_the_cable(fake):
    f = fake("silent")
    with Console(f.url, quiet=0.5) as con, pytest.raises(ConsoleError) as exc:
        con.login("root", None, timeout=4)
    assert "nothing was received" in str(exc.value)


def test_refused_login_and_missing_password(fake):
    f = fake("refuse", garbage_s=0.5)
    with Console(f.url, quiet=0.5) as con, pytest.raises(ConsoleError) as exc:
        con.login("root", "wrong", timeout=60)
    assert "refused 3 times" in str(exc.value)
    f2 = fake("noisy", garbage_s=0.5)
    with Console(f2.url, quiet=0.5) as con, pytest.raises(ConsoleError) as exc:
        con.login("root", None, timeout=30)
    assert "asks for a password" in str(exc.value) and "--password-env" in str(exc.value)


def test_cli_run_json_and_log(fake, tmp_path):
    f = fake("noisy", garbage_s=1.0, password=None)
    log = tmp_path / "console.log"
    res = subprocess.run([sys.executable, "-m", "idlewire", "console", f.url, "--run", "echo one",
                          "--run", "sh -c 'exit 3'", "--json", "--log", str(log), "--timeout", "30"],
                         capture_output=True, text=True, cwd=ROOT, timeout=90)
    assert res.returncode == 3, res.stderr
    out = json.loads(res.stdout)
    assert [(r["exit_status"], r["output"]) for r in out["results"]] == [(0, "one\n"), (3, "")]
    assert b"fake login:" in log.read_bytes()
    assert not (tmp_path / "console.log.part").exists()


def test_cli_bad_input(tmp_path):
    priv = tmp_path / "id"
    priv.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n-----END OPENSSH PRIVATE KEY-----\n")
    res = subprocess.run([sys.executable, "-m", "idlewire", "console", "socket://127.0.0.1:1",
                          "--bootstrap", "--key", str(priv)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "PRIVATE key" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "idlewire", "console", "/dev/nonexistent-tty",
                          "--run", "true"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1 and "cannot open serial console" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_interactive_passthrough_from_a_pipe(fake):
    f = fake("shell")
    res = subprocess.run([sys.executable, "-m", "idlewire", "console", f.url],
                         input="echo passthrough-$((2+3))\n", capture_output=True, text=True, cwd=ROOT,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    assert "passthrough-5" in res.stdout


def test_cli_until_prompt_captures_the_boot(fake, tmp_path):
    f = fake("noisy", garbage_s=1.0)
    log = tmp_path / "boot.log"
    res = subprocess.run([sys.executable, "-m", "idlewire", "console", f.url, "--until-prompt", "--log", str(log),
                          "--timeout", "30", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["prompt"] is True
    data = log.read_bytes()
    assert b"noise" in data and data.rstrip().endswith(b"fake login:")
