"""`idlewire console` against fake serial consoles: on a loopback socket (pyserial socket://), on
a real tty device (the slave side of a pseudo-terminal, /dev/pts/N, as a USB serial adapter is a
tty), and over RFC 2217 (a telnet COM-port server built on pyserial's PortManager in front of
such a tty, the way console servers and ser2net export a UART).

The fakes misbehave the way real lines do: garbage bytes and escape noise before the prompt,
prompt look-alikes in the noise, a prompt that comes late, a password prompt, refused logins.
Behind the fake login sits a real POSIX shell on a pseudo-terminal (echo on, CR LF), so the
marker framing is tested against the real thing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pty
import random
import select
import socket
import subprocess
import sys
import termios
import threading
import time
import tty
from pathlib import Path

import pytest
import serial
import serial.rfc2217
from idlewire.console import Console, ConsoleError, classify, clean

ROOT = Path(__file__).resolve().parents[2]


class PtyLine:
    """The node's end of a serial line that is the master side of a pseudo-terminal: the socket
    calls FakeConsole makes, on a file descriptor. Like a UART, bytes sent while nobody listens on
    the other end are lost rather than blocking the node."""

    def __init__(self, fd: int, stop: threading.Event):
        self.fd, self.stop = fd, stop
        self.timeout: float | None = None
        self.blocking = True

    def fileno(self) -> int:
        return self.fd

    def __enter__(self) -> PtyLine:
        return self

    def __exit__(self, *exc) -> None:
        pass  # the fd belongs to FakeConsole, closed once its threads are gone

    def settimeout(self, t: float | None) -> None:
        self.timeout, self.blocking = t, True

    def setblocking(self, flag: bool) -> None:
        self.timeout, self.blocking = None, flag

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.stop.is_set():
            if not select.select([], [self.fd], [], 0.5)[1]:
                return  # nobody reads the line: the bytes are lost, as on a UART
            view = view[os.write(self.fd, view):]

    def recv(self, n: int) -> bytes:
        end = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            if self.stop.is_set():
                return b""
            wait = 0.0 if not self.blocking else 0.1 if end is None else max(0.0, min(0.1, end - time.monotonic()))
            if select.select([self.fd], [], [], wait)[0]:
                try:
                    return os.read(self.fd, n)
                except OSError as exc:
                    if exc.errno == errno.EIO:  # nobody has the tty open right now
                        time.sleep(0.05)
                        continue
                    raise
            if not self.blocking:
                raise BlockingIOError
            if end is not None and time.monotonic() >= end:
                raise TimeoutError


def accept_loop(sock: socket.socket, stop: threading.Event, serve, threads: list) -> None:
    """Accept connections until ``stop``; each is served by ``serve(conn)`` in a thread of its own."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except OSError:
            continue
        t = threading.Thread(target=serve, args=(conn,), daemon=True)
        t.start()
        threads.append(t)


class FakeConsole:
    """A TCP server that plays one scenario per connection; or, with pty(), one scenario on a tty."""

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
        self.fds: list[int] = []
        self.slave: int | None = None
        self.rng = random.Random(7)
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self) -> None:
        accept_loop(self.sock, self.stop, self._serve, self.threads)

    def pty(self) -> str:
        """Play the scenario on a new pseudo-terminal; returns the tty device a client opens.

        The slave is set raw (a UART has no line discipline of its own: no echo, no CR/LF
        mapping) and held open here, so the line stays up between clients."""
        master, slave = pty.openpty()
        tty.setraw(slave)
        self.fds += [master, slave]
        self.slave = slave
        t = threading.Thread(target=self._serve, args=(PtyLine(master, self.stop),), daemon=True)
        t.start()
        self.threads.append(t)
        return os.ttyname(slave)

    def tty_speed(self) -> int:
        """The baud rate the client set on the tty (termios output speed)."""
        speed = termios.tcgetattr(self.slave)[5]
        return next(int(name[1:]) for name in dir(termios)
                    if name.startswith("B") and name[1:].isdigit() and getattr(termios, name) == speed)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for p in self.procs:
            p.kill()
            p.wait()
        for t in self.threads:
            t.join(timeout=2)
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)

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


class PtySerial(serial.Serial):
    """A tty opened with pyserial that has no modem lines (a pty); a UART's would be set."""

    def _update_dtr_state(self) -> None:
        pass

    def _update_rts_state(self) -> None:
        pass

    cts = dsr = cd = property(lambda self: True)
    ri = property(lambda self: False)


class Rfc2217Server:
    """An RFC 2217 (telnet COM port control) server in front of a tty, like ser2net or a console
    server in front of a UART: pyserial's PortManager per client, bytes pumped both ways, baud
    rate and line settings applied to the tty as the client asks."""

    def __init__(self, device: str, answer_set_control: bool = True):
        self.device, self.answer_set_control = device, answer_set_control
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(2)
        self.url = f"rfc2217://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.baudrates: list[int] = []  # what each client session ended with on the tty
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        accept_loop(self.sock, self.stop, self._session, self.threads)

    def _session(self, conn: socket.socket) -> None:
        ser = PtySerial(self.device, timeout=0.05)
        lock = threading.Lock()

        class Net:  # what PortManager writes telnet answers to
            @staticmethod
            def write(data: bytes) -> None:
                with lock:
                    conn.sendall(data)

        pm = serial.rfc2217.PortManager(ser, Net())
        if not self.answer_set_control:  # like servers that never acknowledge SET_CONTROL
            handle = pm._telnet_process_subnegotiation
            pm._telnet_process_subnegotiation = lambda sub: None if sub[1:2] == serial.rfc2217.SET_CONTROL \
                else handle(sub)
        alive = threading.Event()
        alive.set()

        def tty_to_net() -> None:
            while alive.is_set() and not self.stop.is_set():
                try:
                    data = ser.read(ser.in_waiting or 1)
                    if data:
                        Net.write(b"".join(pm.escape(data)))
                except (OSError, serial.SerialException):
                    break
            alive.clear()

        t = threading.Thread(target=tty_to_net, daemon=True)
        t.start()
        conn.settimeout(0.2)
        try:
            while alive.is_set() and not self.stop.is_set():
                try:
                    data = conn.recv(1024)
                except TimeoutError:
                    continue
                if not data:
                    break
                ser.write(b"".join(pm.filter(data)))
        except OSError:
            pass
        finally:
            alive.clear()
            t.join(timeout=2)
            self.baudrates.append(ser.baudrate)
            ser.close()
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for t in self.threads:
            t.join(timeout=3)


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


# ---- a real tty, and RFC 2217 ----------------------------------------------------------------
def test_login_and_run_on_a_tty_device(fake):
    f = fake("noisy", garbage_s=1.5)
    dev = f.pty()
    assert dev.startswith("/dev/pts/")
    with Console(dev, baud=57600, quiet=0.6) as con:
        assert f.tty_speed() == 57600  # the baud rate reached the tty
        assert con.login("root", "s3cret", timeout=40) == "password login"
        con.setup()
        res = con.run("echo tty-$((6*7)); exit 3")
        assert (res.status, res.output) == (3, "tty-42\n")


def test_cli_on_a_tty_device(fake, tmp_path):
    f = fake("noisy", garbage_s=1.0, password=None)
    dev = f.pty()
    log = tmp_path / "tty.log"
    res = subprocess.run([sys.executable, "-m", "idlewire", "console", dev, "--baud", "9600", "--run", "uname -s",
                          "--json", "--log", str(log), "--timeout", "30"],
                         capture_output=True, text=True, cwd=ROOT, timeout=90)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [(r["exit_status"], r["output"]) for r in out["results"]] == [(0, os.uname().sysname + "\n")]
    assert b"fake login:" in log.read_bytes()
    assert f.tty_speed() == 9600


@pytest.fixture
def rfc2217(fake):
    made: list[Rfc2217Server] = []

    def make(scenario: str, answer_set_control: bool = True, **kwargs) -> tuple[FakeConsole, Rfc2217Server]:
        f = fake(scenario, **kwargs)
        made.append(Rfc2217Server(f.pty(), answer_set_control))
        return f, made[-1]

    yield make
    for srv in made:
        srv.close()


def test_login_and_run_over_rfc2217(rfc2217):
    f, srv = rfc2217("noisy", garbage_s=1.5)
    with Console(srv.url, baud=38400, quiet=0.6) as con:
        assert con.login("root", "s3cret", timeout=40) == "password login"
        con.setup()
        res = con.run("printf '%s\\n' \"it's $((6*7))\" '" + "z" * 300 + "'")
        assert (res.status, res.output) == (0, "it's 42\n" + "z" * 300 + "\n")
        # 0xff is the telnet escape byte: it must cross the line doubled and arrive single.
        res = con.run("printf 'a\\377b\\n' | od -An -tx1")
        assert res.output.split() == ["61", "ff", "62", "0a"], res.output
        assert f.tty_speed() == 38400  # the server applied the client's baud rate to its tty


def test_cli_over_rfc2217_run_and_passthrough(rfc2217):
    _, srv = rfc2217("noisy", garbage_s=1.0, password=None)
    res = subprocess.run([sys.executable, "-m", "idlewire", "console", srv.url, "--run", "echo one",
                          "--run", "sh -c 'exit 5'", "--json", "--timeout", "30"],
                         capture_output=True, text=True, cwd=ROOT, timeout=90)
    assert res.returncode == 5, res.stderr
    assert [(r["exit_status"], r["output"]) for r in json.loads(res.stdout)["results"]] == [(0, "one\n"), (5, "")]
    _, srv2 = rfc2217("shell")
    res = subprocess.run([sys.executable, "-m", "idlewire", "console", srv2.url],
                         input="echo passthrough-$((2+3))\n", capture_output=True, text=True, cwd=ROOT,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    assert "passthrough-5" in res.stdout


def test_rfc2217_refusals_are_one_line(tmp_path):
    # A plain TCP port that never speaks telnet (a raw ser2net port, a wrong port number).
    with socket.socket() as raw:
        raw.bind(("127.0.0.1", 0))
        raw.listen(1)
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "idlewire", "console",
                              f"rfc2217://127.0.0.1:{raw.getsockname()[1]}", "--run", "true"],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "RFC 2217" in res.stderr and "socket://" in res.stderr, res.stderr
    assert time.monotonic() - t0 < 20
    res = subprocess.run([sys.executable, "-m", "idlewire", "console", "rfc2217://127.0.0.1:1", "--run", "true"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 1 and "cannot open serial console" in res.stderr and "Traceback" not in res.stderr


def test_rfc2217_server_that_ignores_set_control(rfc2217):
    _, srv = rfc2217("shell", answer_set_control=False)
    res = subprocess.run([sys.executable, "-m", "idlewire", "console", srv.url, "--run", "true"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "?ign_set_control" in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-m", "idlewire", "console", srv.url + "?ign_set_control",
                          "--run", "echo ok-$((1+1))", "--timeout", "30"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0 and res.stdout == "ok-2\n", res.stderr
