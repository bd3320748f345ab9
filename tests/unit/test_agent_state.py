"""The node's state under damage (issue 14.6) and its commands (issue 12.4), with real SQLite files:
a ledger truncated to zero, garbage bytes, a page overwritten, a directory in its place, another
ledger swapped in, a newer schema, a file the agent cannot write, a WAL left by kill -9, a full
disk (a small tmpfs), `idlewire-agent ledger reset`; run.py's one-line errors and timeouts; no
external command while the ledger lock is held."""

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from idlewire_agent import keys, receipts, run
from idlewire_agent.agent import Agent
from idlewire_agent.config import parse
from idlewire_agent.ledger import SCHEMA, Ledger, LedgerError, marker_path
from synthetic import SyntheticTunnel

ROOT = os.geteuid() == 0


def _config(tmp: Path, state: Path | None = None) -> dict:
    return {"node": {"state_dir": str(state or tmp / "state"), "key_file": str(tmp / "node.key")},
            "tunnel": {"pool": "10.99.0.0/29", "private_key_file": str(tmp / "wg.key")},
            "metering": {"poll_interval": 5, "line_rate_mbit": 8, "unpaid_cap_mb": 1},
            "sessions": {"idle_timeout": 60},
            "api": {"admin_token_file": str(tmp / "admin.token"), "listen": ["127.0.0.1"], "port": 1}}


def _toml(data: dict) -> str:
    out = []
    for sec, kv in data.items():
        out.append(f"[{sec}]")
        out += [f"{k} = {json.dumps(v)}" for k, v in kv.items()]
    return "\n".join(out) + "\n"


def agent_cli(tmp: Path, *argv: str, user: int | None = None) -> subprocess.CompletedProcess:
    """`python -m idlewire_agent ARGV --config node.toml` as the service runs it (optionally as `user`)."""
    cfg = tmp / "node.toml"
    if not cfg.exists():
        cfg.write_text(_toml(_config(tmp)))
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    return subprocess.run([*prefix, sys.executable, "-m", "idlewire_agent", *argv, "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def one_line(p: subprocess.CompletedProcess) -> str:
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def made_ledger(tmp: Path) -> Path:
    """A ledger with history: a session, metered bytes, receipts; closed as after a clean stop."""
    a = Agent(parse(_config(tmp)), SyntheticTunnel())
    buyer = Ed25519PrivateKey.generate()
    k = keys.wg_keypair()[1]
    sid = a.open_session(receipts.pub_b64(buyer), k)["session"]
    for i in range(1, 40):
        a.tunnel.traffic(k, 1000, 2000)
        a.poll()
        a.cosign(sid, receipts.pub_b64(buyer), receipts.sign_usage(buyer, sid, 1000 * i, 2000 * i, i))
    a.ledger.close()
    return tmp / "state" / "ledger.sqlite"


# --- damage at start: one line naming the file and the way out ----------------------------------
def _truncate(p: Path):
    p.write_bytes(b"")


def _delete(p: Path):
    p.unlink()


def _garbage(p: Path):
    p.write_bytes(os.urandom(p.stat().st_size))


def _page(p: Path):  # one B-tree page in the middle overwritten (a bad sector, a torn write)
    with open(p, "r+b") as f:
        f.seek(4096 * 3)
        f.write(b"\xa5" * 4096)


def _directory(p: Path):
    p.unlink()
    p.mkdir()


def _swapped(p: Path):  # another (valid, empty) ledger in its place
    marker = p.with_name("ledger.id")
    ours = marker.read_text()
    p.unlink()
    marker.unlink()
    Ledger(str(p)).close()
    marker.write_text(ours)


def _wal_directory(p: Path):
    Path(str(p) + "-wal").mkdir()


def _marker_directory(p: Path):
    marker = p.with_name("ledger.id")
    marker.unlink()
    marker.mkdir()


def _state_file(p: Path):  # the state directory itself replaced by a file
    for f in p.parent.iterdir():
        f.unlink()
    p.parent.rmdir()
    p.parent.write_text("not a directory")


def _newer(p: Path):
    db = sqlite3.connect(p)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA + 1,))
    db.commit()
    db.close()


@pytest.mark.parametrize("damage, words", [
    (_truncate, "empty (0 bytes), but"), (_delete, "missing, but"), (_garbage, "damaged"), (_page, "damaged"),
    (_directory, "is a directory"), (_wal_directory, "-wal: is a directory"), (_swapped, "is another ledger"),
    (_newer, "newer agent"), (_marker_directory, "cannot read the ledger marker"),
    (_state_file, "must be a directory"),
])
def test_a_damaged_ledger_stops_the_agent_with_one_line(tmp_path, damage, words):
    path = made_ledger(tmp_path)
    before = path.read_bytes() if damage is not _directory else b""
    damage(path)
    if damage is not _state_file:
        with pytest.raises(LedgerError, match=re.escape(words)):
            Ledger(str(path))
    p = agent_cli(tmp_path, "run")
    line = one_line(p)
    named = {_state_file: path.parent, _marker_directory: path.with_name("ledger.id")}.get(damage, path)
    assert p.returncode == 1 and str(named) in line and words in line, line
    if damage not in (_newer, _directory, _wal_directory, _marker_directory, _state_file):
        assert "idlewire-agent ledger reset" in line and "backup" in line
    # Nothing was written over it: the same bytes are still there for a restore or a post-mortem.
    if damage in (_garbage, _page):
        assert path.read_bytes() != before and path.stat().st_size == len(before)


def test_ledger_reset_moves_the_damage_aside_and_the_agent_starts_again(tmp_path):
    path = made_ledger(tmp_path)
    _page(path)
    damaged = path.read_bytes()
    assert "damaged" in one_line(agent_cli(tmp_path, "run"))
    # Refused while an agent holds the state directory.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from idlewire_agent.__main__ import "
                               f"state_lock; h = state_lock({str(path.parent)!r}); print(h is not None, flush=True);"
                               " time.sleep(30)"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "True"
        p = agent_cli(tmp_path, "ledger", "reset")
        assert p.returncode == 1 and "stop it first" in one_line(p)
        assert path.exists()
    finally:
        holder.kill()
        holder.wait()
    p = agent_cli(tmp_path, "ledger", "reset")
    assert p.returncode == 0, p.stderr
    moved = sorted(path.parent.glob("*.damaged-*"))
    assert {m.name.split(".damaged-")[0] for m in moved} >= {"ledger.sqlite", "ledger.id"}
    (kept,) = [m for m in moved if m.name.startswith("ledger.sqlite.damaged-")]
    assert kept.read_bytes() == damaged  # moved, never deleted or rewritten
    led = Ledger(str(path))  # what the next start does: an empty ledger, a new marker
    assert led.lifetime() == (0, 0) and Path(marker_path(str(path))).read_text().strip() == led.meta("ledger_id")


def test_a_wal_left_by_kill9_is_replayed_not_refused(tmp_path):
    path = tmp_path / "state" / "ledger.sqlite"
    path.parent.mkdir()
    code = ("import os, sys; from idlewire_agent.ledger import Ledger, Delta;"
            "led = Ledger(sys.argv[1]);"
            "led.db.execute('PRAGMA wal_autocheckpoint=0');"
            "led.db.execute(\"INSERT INTO peers VALUES ('k', 's', 0, 0)\");"
            "[led.record([Delta('k', 's', i * 10, i * 20, 10, 20)], 1e9 + i) for i in range(1, 51)];"
            "os.kill(os.getpid(), 9)")
    p = subprocess.run([sys.executable, "-c", code, str(path)],
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == -9
    assert Path(str(path) + "-wal").stat().st_size > 0  # committed pages only in the WAL
    led = Ledger(str(path))
    assert led.lifetime() == (500, 1000) and led.integrity() == "ok"


def test_a_garbage_wal_is_ignored_and_the_committed_ledger_kept(tmp_path):
    path = made_ledger(tmp_path)
    totals = Ledger(str(path)).lifetime()
    Path(str(path) + "-wal").write_bytes(os.urandom(20000))  # not a WAL SQLite wrote: no valid frame
    Path(str(path) + "-shm").write_bytes(os.urandom(32768))
    led = Ledger(str(path))
    assert led.lifetime() == totals and led.integrity() == "ok"


@pytest.mark.skipif(not ROOT, reason="needs root to hand the state to another user")
def test_a_ledger_the_agent_cannot_write_is_one_line():
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="iw-perm-"))  # under /tmp, reachable by another user
    try:
        tmp.chmod(0o755)
        path = made_ledger(tmp)
        nobody = 65534
        (tmp / "node.toml").write_text(_toml(_config(tmp)))
        for p in [path.parent, *path.parent.iterdir(), *(tmp / n for n in ("node.key", "wg.key", "admin.token",
                                                                          "node.toml"))]:
            if p.exists() and p != path:
                os.chown(p, nobody, nobody)
        path.chmod(0o600)  # still root's: the agent's user cannot open it
        p = agent_cli(tmp, "run", user=nobody)
        line = one_line(p)
        assert p.returncode == 1 and str(path) in line and "writable by the agent" in line, line
    finally:
        shutil.rmtree(tmp)


# --- a full disk -------------------------------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MB tmpfs as the state directory, and a way to fill it up and free it."""
    if not ROOT:
        pytest.skip("needs root to mount a tmpfs")
    from tinyfs import tiny_fs

    with tiny_fs(tmp_path) as fs:
        yield fs


def test_a_full_disk_mid_run_loses_nothing_and_is_one_line(tmp_path, tiny_fs, caplog):
    a = Agent(parse(_config(tmp_path, tiny_fs.path / "state")), SyntheticTunnel())
    buyer = Ed25519PrivateKey.generate()
    k = keys.wg_keypair()[1]
    sid = a.open_session(receipts.pub_b64(buyer), k)["session"]
    a.tunnel.traffic(k, 1000, 2000)
    a.poll()
    tiny_fs.fill()
    for _ in range(5):  # a busy while the disk is full: nothing commits, nothing is dropped
        a.tunnel.traffic(k, 70_000, 30_000)
        a.clock = lambda: time.time() + 3600  # far past idle_timeout: still not closed for the full disk
        assert a.poll() == []
    assert a.stats.poll_errors == 5 and a.ledger.full
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "the disk is full" in errors[0].getMessage() and not errors[0].exc_info
    with pytest.raises(Exception) as e:  # a new session: refused with the reason, not a 500
        a.open_session(receipts.pub_b64(buyer), keys.wg_keypair()[1])
    assert getattr(e.value, "status", None) == 503 and "disk is full" in str(e.value)
    assert a.describe(sid)["state"] == "open" and a.describe(sid)["up"] == 1000
    with pytest.raises(Exception) as e:  # a close needs the ledger: refused, the peer (and its bytes) kept
        a.close_session(sid, "buyer")
    assert getattr(e.value, "status", None) == 503 and k in a.tunnel.peers
    tiny_fs.free()
    a.clock = time.time
    a.poll()
    s = a.describe(sid)
    assert (s["up"], s["down"]) == (1000 + 5 * 70_000, 2000 + 5 * 30_000)  # every byte, once
    assert a.ledger.lifetime() == (s["up"], s["down"]) and not a.ledger.full
    assert any("writable again" in r.getMessage() for r in caplog.records)


def test_a_full_disk_at_a_restart_is_one_line_and_loses_nothing(tmp_path, tiny_fs):
    """SQLite cannot even create the ledger's -shm file: the agent stops with one line; the
    committed totals are intact and counted on once there is space."""
    data = _config(tmp_path, tiny_fs.path / "state")
    (tmp_path / "node.toml").write_text(_toml(data))
    a = Agent(parse(data), t := SyntheticTunnel())
    buyer = Ed25519PrivateKey.generate()
    sid = a.open_session(receipts.pub_b64(buyer), k := keys.wg_keypair()[1])["session"]
    t.traffic(k, 5000, 7000)
    a.poll()
    a.ledger.close()
    tiny_fs.fill()
    p = agent_cli(tmp_path, "run")
    line = one_line(p)
    assert p.returncode == 1 and "disk is full" in line and "nothing metered is lost" in line, line
    tiny_fs.free()
    t.traffic(k, 1, 1)
    b = Agent(parse(data), t)
    b.poll()
    assert (b.describe(sid)["up"], b.describe(sid)["down"]) == (5001, 7001)


def test_a_full_disk_at_first_start_is_one_line(tmp_path, tiny_fs):
    data = _config(tmp_path, tiny_fs.path / "state")
    (tmp_path / "node.toml").write_text(_toml(data))
    tiny_fs.fill()
    p = agent_cli(tmp_path, "run")
    line = one_line(p)
    assert p.returncode == 1 and "disk is full" in line and str(tiny_fs.path) in line, line


# --- commands ----------------------------------------------------------------------------------
def test_run_names_the_command_and_what_to_do(tmp_path):
    with pytest.raises(run.CommandError, match=r"^no-such-tool-x: not found on PATH; install it"):
        run.run(["no-such-tool-x", "a"])
    with pytest.raises(run.CommandError, match=r"^sh -c echo oops >&2; exit 3: oops$"):
        run.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert run.run(["sh", "-c", "exit 3"], check=False).returncode == 3
    t0 = time.monotonic()
    with pytest.raises(run.CommandError, match=r"^sleep 30: no answer in 0\.3 s \(killed\)$"):
        run.run(["sleep", "30"], timeout=0.3)
    with pytest.raises(run.CommandError, match=r"no answer in 0\.3 s"):
        list(run.lines(["sh", "-c", "echo a; sleep 30"], timeout=0.3))
    assert time.monotonic() - t0 < 5
    assert list(run.lines(["printf", "a\\nb\\n"])) == ["a\n", "b\n"]
    with pytest.raises(run.CommandError, match="exit status 1"):
        list(run.lines(["false"]))


def test_a_command_under_the_ledger_lock_is_reported(tmp_path, caplog):
    a = Agent(parse(_config(tmp_path)), SyntheticTunnel())
    run.run(["true"])
    assert "ledger lock is held" not in caplog.text
    with a.lock:
        run.run(["true"])
    assert "true runs while the ledger lock is held" in caplog.text


def test_every_agent_command_goes_through_run():
    src = Path(run.__file__).parent
    offenders = [f.name for f in src.glob("*.py") if f.name != "run.py" and
                 ("subprocess.run(" in f.read_text() or "subprocess.Popen(" in f.read_text())]
    assert offenders == []


class WedgedTunnel(SyntheticTunnel):
    """`wg show` that hangs (wireguard-go stopped) until released."""

    def __init__(self):
        super().__init__()
        self.wedged = threading.Event()
        self.release = threading.Event()

    def dump(self):
        if self.wedged.is_set():
            self.release.wait(30)
        return super().dump()


def test_a_wedged_command_holds_no_ledger_lock(tmp_path):
    t = WedgedTunnel()
    a = Agent(parse(_config(tmp_path)), t)
    buyer = Ed25519PrivateKey.generate()
    sid = a.open_session(receipts.pub_b64(buyer), k := keys.wg_keypair()[1])["session"]
    t.traffic(k, 10, 10)
    t.wedged.set()
    poller = threading.Thread(target=a.poll)
    poller.start()
    time.sleep(0.3)
    assert poller.is_alive()  # waiting in the wedged command
    t0 = time.monotonic()
    assert "idlewire_sessions_open 1" in a.metrics()
    a.cosign(sid, receipts.pub_b64(buyer), receipts.sign_usage(buyer, sid, 0, 0, 1))
    assert a.ledger.use_nonce("n" * 16, 2e9, 1e9) and a.usage()["sessions"]
    assert time.monotonic() - t0 < 1  # the API's ledger work did not wait for the command
    t.release.set()
    poller.join(10)
    assert a.describe(sid)["up"] == 10
