"""Drive a node's serial console: log in, run commands framed by markers, bootstrap SSH access.

A serial console is a raw byte stream: the shell echoes what we type, lines end in CR LF, the
kernel and systemd print into it, terminals emit ANSI escapes, and a slow UART drops characters
when a long line arrives at once. So this module

- waits for the line to go quiet before typing, and recognises login, password and shell prompts
  on the last line only (a prompt seen earlier is never acted on twice);
- proves a shell with arithmetic the shell must do (`echo X$((a+b))`), so a prompt look-alike in
  line noise is not taken for a shell;
- frames every command between markers that the echo of the typed line cannot contain
  (`printf '%s%s' __IWB TOKEN` prints `__IWBTOKEN`, the echo shows `__IWB TOKEN`), and takes the
  exit status from the end marker;
- writes files (an SSH key, a script) in short chunks and reads them back before using them.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .errors import UserError

# ANSI/VT escape sequences: CSI, OSC, DCS/SOS/PM/APC strings, and two-byte escapes.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[ -/]*[0-~]?"
)
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_LOGIN = re.compile(r"(?i)(?:\blogin|\busername)\s*:\s*$")
_PASSWORD = re.compile(r"(?i)\bpassword(?: for [^:]*)?:\s*$")
_SHELL = re.compile(r"[#$%>]\s*$")
_REFUSED = re.compile(r"(?i)login incorrect|authentication fail|permission denied")
_KEY = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-\S+)\s+[A-Za-z0-9+/=]+(\s[ -~]*)?$")


class ConsoleError(UserError):
    """The console did not give us a shell, or a command did not come back."""

    exit_code = 1


def clean(text: str) -> str:
    """Console bytes (decoded) → plain text: escapes and control characters gone, LF line ends."""
    text = _ANSI.sub("", text)
    text = text.replace("\r\n", "\n").replace("\n\r", "\n")
    return _CTRL.sub("", text.replace("\t", "    "))


def classify(tail: str) -> str | None:
    """What the last line of the console shows: 'login', 'password', 'shell' or None."""
    line = tail.rsplit("\n", 1)[-1].rstrip()
    if len(line) > 200:
        return None
    if _PASSWORD.search(line):
        return "password"
    if _LOGIN.search(line):
        return "login"
    if _SHELL.search(line):
        return "shell"
    return None


@dataclass
class Result:
    command: str
    status: int
    output: str
    seconds: float

    def as_dict(self) -> dict:
        return {"command": self.command, "exit_status": self.status, "output": self.output,
                "seconds": round(self.seconds, 3)}


@dataclass
class Console:
    """A serial console opened with pyserial (`/dev/ttyUSB0`, `socket://HOST:PORT`, `rfc2217://…`)."""

    port: str
    baud: int = 115200
    line_delay: float = 0.0  # seconds after each line (and chunk) typed: for slow UARTs
    chunk: int = 64  # characters typed at once
    quiet: float = 1.0  # the line counts as quiet after this long without a byte
    log: BinaryIO | None = None  # every byte received, as received
    on_data: Callable[[bytes], None] | None = None
    _ser: object = field(default=None, repr=False)
    _pending: bytearray = field(default_factory=bytearray, repr=False)
    user: str | None = None
    uid: int | None = None

    # ---- the byte stream ----------------------------------------------------------------
    def open(self) -> Console:
        import serial

        rfc2217 = self.port.lower().startswith("rfc2217://")
        # pyserial's RFC 2217 client refuses a write timeout (NotImplementedError); its writes go
        # to a TCP socket that has its own timeout.
        try:
            self._ser = serial.serial_for_url(self.port, baudrate=self.baud, timeout=0.05,
                                              write_timeout=None if rfc2217 else 10)
        except (serial.SerialException, ValueError, OSError, NotImplementedError) as exc:
            hint = "give a device (/dev/ttyUSB0) or a pyserial URL (socket://HOST:PORT)"
            text = " ".join(str(exc).split())
            if rfc2217 and "RFC2217" in text:
                hint = ("the server did not negotiate RFC 2217 (telnet COM port control) in time: for a "
                        "raw TCP port (ser2net 'raw') use socket://HOST:PORT; on a slow link allow "
                        "longer with rfc2217://HOST:PORT?timeout=10")
            elif rfc2217 and "control" in text:
                hint = ("the server does not acknowledge flow-control settings (some ser2net versions): "
                        "add ?ign_set_control to the URL")
            raise ConsoleError(f"cannot open serial console {self.port}: {text}; {hint}") from None
        return self

    def close(self) -> None:
        if self._ser is not None:
            self._ser.close()
            self._ser = None

    def __enter__(self) -> Console:
        return self.open() if self._ser is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, wait: float = 0.05) -> bytes:
        """Whatever arrives within `wait` seconds (at least one read)."""
        import serial

        end = time.monotonic() + wait
        got = bytearray()
        while True:
            try:
                n = self._ser.in_waiting
                data = self._ser.read(n or 1)
            except (serial.SerialException, OSError) as exc:
                raise ConsoleError(f"serial console {self.port} failed: {exc}") from None
            if data:
                got += data
            if time.monotonic() >= end:
                break
        if got:
            self._pending += got
            if self.log is not None:
                self.log.write(got)
                self.log.flush()
            if self.on_data is not None:
                self.on_data(bytes(got))
        return bytes(got)

    def text(self) -> str:
        """Everything received since the last `consume()`, cleaned."""
        return clean(self._pending.decode("utf-8", errors="replace"))

    def consume(self) -> None:
        self._pending.clear()

    def wait_quiet(self, quiet: float | None = None, limit: float = 5.0) -> bool:
        """Read until nothing arrived for `quiet` seconds (True) or `limit` passed (False)."""
        quiet = self.quiet if quiet is None else quiet
        end = time.monotonic() + limit
        last = time.monotonic()
        while time.monotonic() < end:
            if self.read(0.05):
                last = time.monotonic()
            elif time.monotonic() - last >= quiet:
                return True
        return False

    def write(self, data: bytes) -> None:
        import serial

        try:
            self._ser.write(data)
            self._ser.flush()
        except (serial.SerialException, OSError) as exc:
            raise ConsoleError(f"serial console {self.port} failed while writing: {exc}") from None

    def type_line(self, line: str) -> None:
        """Type one line and Enter, in chunks, pausing `line_delay` between them."""
        data = line.encode()
        for i in range(0, len(data), self.chunk):
            self.write(data[i:i + self.chunk])
            if self.line_delay:
                time.sleep(self.line_delay)
            self.read(0.0)
        self.write(b"\r")
        if self.line_delay:
            time.sleep(self.line_delay)

    # ---- logging in ---------------------------------------------------------------------
    def probe_shell(self, timeout: float = 5.0) -> bool:
        """True when a shell answers arithmetic (a prompt look-alike in noise cannot)."""
        a, b = 1000 + secrets.randbelow(9000), 1000 + secrets.randbelow(9000)
        want = re.compile(rf"(?m)^__IWOK{a + b}\s*$")
        self.consume()
        self.type_line(f"echo __IWOK$(({a}+{b}))")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.read(0.1)
            if want.search(self.text()):
                self.wait_quiet(0.3, limit=2)
                self.consume()
                return True
        return False

    def login(self, user: str = "root", password: str | None = None, timeout: float = 120.0,
              status: Callable[[str], None] = lambda _m: None) -> str:
        """Get a shell prompt: autologin shell, or login (and password) prompts. Returns how."""
        deadline = time.monotonic() + timeout
        status("waiting for the line to go quiet")
        self.wait_quiet(limit=min(10.0, timeout))
        refused = 0
        last_nudge = 0.0
        typed_user = False
        seen_any = bool(self._pending)
        while time.monotonic() < deadline:
            txt = self.text()
            seen_any = seen_any or bool(txt.strip())
            state = classify(txt)
            if typed_user and _REFUSED.search(txt):  # (boot messages may say "permission denied")
                refused += 1
                self.consume()
                if refused >= 3:
                    raise ConsoleError(f"{self.port}: login as {user!r} refused {refused} times "
                                       "(Login incorrect): check --user and the password "
                                       "(--password-env)")
                continue
            if state == "shell":
                status("shell prompt seen, checking it answers")
                if self.probe_shell(min(5.0, max(1.0, deadline - time.monotonic()))):
                    self.user = user
                    return "password login" if typed_user else "shell"
                # noise that looked like a prompt, or a half-typed line: interrupt, look again
                self.write(b"\x03")
                self.wait_quiet(0.5, limit=2)
                continue
            if state == "login":
                status(f"login prompt: logging in as {user}")
                self.consume()
                self.type_line(user)
                typed_user = True
                self.wait_quiet(0.7, limit=5)
                continue
            if state == "password":
                if password is None:
                    raise ConsoleError(f"{self.port}: the console asks for a password for {user!r} and "
                                       "none was given: put it in an environment variable named by "
                                       "--password-env (idlewire images have none: they log the "
                                       "serial console in automatically, see base_serial_autologin)")
                status("password prompt")
                self.consume()
                self.type_line(password)
                self.wait_quiet(0.7, limit=8)
                continue
            now = time.monotonic()
            if now - last_nudge >= 3.0:
                # Enter: wakes a getty, re-prints a prompt, answers "press Enter to activate"
                self.write(b"\r")
                last_nudge = now
            self.wait_quiet(limit=min(3.0, max(0.1, deadline - time.monotonic())))
        last = self.text().strip().rsplit("\n", 1)[-1][-80:]
        if not seen_any:
            why = ("nothing was received: is the node powered, the cable's TX/RX crossed, the "
                   "port right?")
        else:
            why = (f"last line seen: {last!r}; if it is garbage, check the baud rate (--baud, "
                   f"now {self.baud})")
        raise ConsoleError(f"{self.port}: no shell within {timeout:.0f}s (no login, password or shell "
                           f"prompt recognised); {why}")

    # ---- commands -----------------------------------------------------------------------
    def run(self, command: str, timeout: float = 60.0, check: bool = False) -> Result:
        """Run `command` in a subshell of the logged-in shell (`exit N` ends only the command, as
        over SSH); its output (stdout and stderr, as the terminal shows them) and exit status."""
        token = secrets.token_hex(4)
        begin = f"__IWB{token}"
        end_re = re.compile(rf"(?m)^__IWE{token}:(\d+)\s*$")
        line = (f"printf '%s%s\\n' __IWB {token}; (eval {shlex.quote(command)}) </dev/null; "
                f"printf '\\n%s%s:%s\\n' __IWE {token} \"$?\"")
        t0 = time.monotonic()
        self.consume()
        self.type_line(line)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            self.read(0.05)
            txt = self.text()
            m = end_re.search(txt)
            if m:
                start = re.search(rf"(?m)^{begin}\s*$", txt)
                body = txt[start.end() + 1 if start else 0:m.start()]
                body = body[:-1] if body.endswith("\n") else body
                self._pending = bytearray(self._pending_after_marker(token))
                res = Result(command, int(m.group(1)), body, time.monotonic() - t0)
                if check and res.status != 0:
                    raise ConsoleError(f"{self.port}: `{command}` exited {res.status}: "
                                       f"{res.output.strip()[-200:]}")
                return res
        tail = self.text().strip()[-120:]
        self.write(b"\x03")  # leave the shell usable for the next command
        self.wait_quiet(0.5, limit=3)
        self.consume()
        raise ConsoleError(f"{self.port}: `{command}` did not finish within {timeout:.0f}s "
                           f"(last output: {tail!r}); try a longer --command-timeout or a larger "
                           "--line-delay if the console drops characters")

    def _pending_after_marker(self, token: str) -> bytes:
        raw = bytes(self._pending)
        i = raw.find(f"__IWE{token}:".encode())
        j = raw.find(b"\n", i) if i >= 0 else -1
        return raw[j + 1:] if j >= 0 else b""

    def setup(self) -> None:
        """After login: silence kernel messages on the console, learn who we are."""
        self.run("dmesg -n 1 2>/dev/null || true", timeout=20)
        res = self.run("id -u", timeout=20)
        try:
            self.uid = int(res.output.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.uid = None

    def put_file(self, path: str, content: str, tries: int = 3) -> None:
        """Write `content` (printable ASCII, newlines) to `path` in chunks; read back to verify."""
        if any(not (c == "\n" or " " <= c <= "~") for c in content):
            raise UserError(f"{path}: only printable ASCII can be written over the console")
        for _attempt in range(tries):
            self.run(f"rm -f {shlex.quote(path)}; (umask 077; : > {shlex.quote(path)})", timeout=20,
                     check=True)
            for i in range(0, len(content), self.chunk):
                part = content[i:i + self.chunk]
                self.run(f"printf '%s' {shlex.quote(part)} >> {shlex.quote(path)}", timeout=20, check=True)
            back = self.run(f"cat {shlex.quote(path)}; echo .", timeout=30)
            if back.status == 0 and back.output == content + ".\n":
                return
        raise ConsoleError(f"{self.port}: could not write {path} intact in {tries} tries: the console "
                           "drops or garbles characters; try --line-delay 0.05 or a lower --baud")

    def install_key(self, key_line: str, user: str = "idlewire") -> str:
        """Add an OpenSSH public key to USER's authorized_keys; 'installed' or 'already present'."""
        key_line = check_key(key_line)
        token = secrets.token_hex(4)
        keyf, script = f"/tmp/.idlewire-key.{token}", f"/tmp/.idlewire-key.{token}.sh"
        self.put_file(keyf, key_line)
        self.put_file(script, _INSTALL_KEY.replace("@USER@", shlex.quote(user)).replace("@KEY@", keyf))
        cmd = f"sh {script}"
        if self.uid not in (0, None) and user != self.user:
            cmd = f"sudo -n {cmd}"
        res = self.run(f"{cmd}; _rc=$?; rm -f {keyf} {script}; (exit $_rc)", timeout=30)
        if res.status != 0:
            raise ConsoleError(f"{self.port}: installing the key for {user!r} failed "
                               f"(exit {res.status}): {res.output.strip()[-200:]}")
        return res.output.strip().splitlines()[-1] if res.output.strip() else "installed"

    def addresses(self) -> list[dict]:
        """The node's addresses (not loopback): [{'interface', 'family', 'address'}]."""
        res = self.run("ip -j addr show 2>/dev/null", timeout=30)
        out: list[dict] = []
        if res.status == 0:
            try:
                for link in json.loads(res.output.strip() or "[]"):
                    for a in link.get("addr_info", []):
                        if link.get("ifname") == "lo":
                            continue
                        out.append({"interface": link.get("ifname"), "family": a.get("family"),
                                    "address": f"{a.get('local')}/{a.get('prefixlen')}",
                                    "scope": a.get("scope")})
                return out
            except (ValueError, AttributeError):
                out = []
        res = self.run("ip -o addr show", timeout=30)  # busybox ip: no -j
        for m in re.finditer(r"(?m)^\d+:\s+(\S+)\s+(inet6?)\s+(\S+)(?:.*?scope (\S+))?", res.output):
            if m.group(1) != "lo":
                out.append({"interface": m.group(1), "family": m.group(2), "address": m.group(3),
                            "scope": m.group(4)})
        return out

    def hostname(self) -> str:
        return self.run("uname -n", timeout=20).output.strip()


# Runs on the node (POSIX sh, busybox too): USER's home from /etc/passwd; OpenWrt's dropbear
# keeps root's keys in /etc/dropbear. Appends the key once, fixes modes and owner.
_INSTALL_KEY = """\
u=@USER@; f=@KEY@
h=$(awk -F: -v u="$u" '$1 == u {print $6}' /etc/passwd)
[ -n "$h" ] || { echo "no account $u on this node" >&2; exit 3; }
if [ "$u" = root ] && [ -d /etc/dropbear ]; then d=/etc/dropbear; else d="$h/.ssh"; fi
a="$d/authorized_keys"
mkdir -p "$d" && chmod 700 "$d" && touch "$a" && chmod 600 "$a" || exit 4
if grep -qxF "$(cat "$f")" "$a"; then echo "already present"; exit 0; fi
if [ -s "$a" ] && [ "$(tail -c 1 "$a" | wc -l)" -eq 0 ]; then echo >> "$a"; fi
cat "$f" >> "$a" && echo >> "$a" || exit 5
if [ "$d" != /etc/dropbear ]; then chown "$u:$(id -gn "$u")" "$d" "$a" || exit 6; fi
echo installed
"""


def check_key(key_line: str, where: str = "key") -> str:
    key_line = key_line.strip()
    if "PRIVATE KEY" in key_line:
        raise UserError(f"{where}: this is a PRIVATE key; give the public one (the .pub file)")
    if "\n" in key_line or not _KEY.match(key_line):
        raise UserError(f"{where}: not one OpenSSH public key line (ssh-ed25519 AAAA… comment); "
                        "give a .pub file")
    return key_line


def default_key() -> Path | None:
    for name in ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"):
        p = Path.home() / ".ssh" / name
        if p.is_file():
            return p
    return None
