"""The real agent (wireguard-go, the reference client, real packets) when its parts fail: a wedged
`tc`, a full disk under the ledger, a ledger truncated to zero bytes after kill -9 (issues 12.4, 14.6).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agentlab import NodeLab, metric, wait_for
from tinyfs import tiny_fs as tiny_fs_mount

pytestmark = pytest.mark.net


def timed(fn) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


@pytest.fixture
def nodes(lab, tmp_path):
    made = []

    def make(start=True, **overrides):
        n = NodeLab(lab, tmp_path, 151, **overrides)
        made.append(n)
        if start:
            n.start()
        return n

    yield make
    for n in made:
        n.stop()


def test_a_wedged_tc_stalls_neither_the_api_nor_the_metering(nodes, tmp_path):
    """Shaping on; `tc` then hangs (a stand-in first on the agent's PATH sleeps instead of running).
    A buyer opens a session: its shaping change waits in tc, but the tunnel carries traffic, /health
    and /metrics answer at once and the polls go on; tc is killed after run.TIMEOUT with one line."""
    from idlewire_agent.policy import SHAPING_STATE_PATH

    real_tc = shutil.which("tc")
    fake = tmp_path / "bin"
    fake.mkdir()
    wedge, called = tmp_path / "wedge", tmp_path / "tc-wedged"
    (fake / "tc").write_text(f"#!/bin/sh\nif [ -e {wedge} ]; then touch {called}; exec sleep 3600; fi\n"
                             f"exec {real_tc} \"$@\"\n")
    (fake / "tc").chmod(0o755)
    node = nodes(start=False, shaping__enabled=True, shaping__line_up_mbit=1000, shaping__line_down_mbit=1000,
                 shaping__cap_up_mbit=500, shaping__cap_down_mbit=500)
    node.python = ["env", f"PATH={fake}:{os.environ['PATH']}", sys.executable]
    try:
        node.start()
        assert "htb" in node.node.run("tc", "qdisc", "show", "dev", "v2a").stdout  # shaping set up for real
        wedge.touch()
        client = node.client("--interval", "1")
        node.wait_tunnel()  # the session works while its shaping change waits in tc
        wait_for(called.exists, timeout=10)
        polls = metric(node, "idlewire_polls_total")
        lat = [timed(lambda: node.get("/health")) for _ in range(10)]
        lat += [timed(lambda: node.get("/metrics")) for _ in range(10)]
        lat += [timed(lambda: node.open_sessions()) for _ in range(5)]
        time.sleep(2)
        assert metric(node, "idlewire_polls_total") >= polls + 3  # ~0.5 s poll interval, not stalled
        assert not node.log.read_text().count("no answer in 10 s")  # tc still wedged while we measured
        print(f"while tc was wedged: API latency median {statistics.median(lat) * 1000:.1f} ms, "
              f"max {max(lat) * 1000:.1f} ms over {len(lat)} calls; polls went on")
        assert max(lat) < 1.0, lat
        wait_for(lambda: "shaping add_session" in (log := node.log.read_text()) and "no answer in 10 s (killed)" in log,
                 timeout=30)
        wedge.unlink()
        log = node.log.read_text()
        assert "Traceback" not in log
        node.stop_client(client)
        assert "ledger lock is held" not in node.log.read_text()  # run.py reports any command under it
        (s,) = node.get("/sessions", admin=True)
        assert s["state"] == "closed"
    finally:
        Path(SHAPING_STATE_PATH).unlink(missing_ok=True)  # the agent's, on this host's /run


def test_the_line_device_that_comes_and_goes_is_shaped_each_time_it_comes(nodes):
    """Router mode over PPPoE: the line is ppp0, absent until pppd dials and a new link after each
    redial (its qdiscs gone with the old one). The agent starts without it (the buyers' trees are
    set up, the line's wait), shapes it when it appears, and again when it comes back. A veth
    stands in for ppp0 (this host's kernel has no PPP; the booted image dials for real)."""
    from idlewire_agent.policy import SHAPING_STATE_PATH

    line = "ppx0"
    node = nodes(start=False, interfaces__wan=line, shaping__enabled=True, shaping__line_up_mbit=100,
                 shaping__line_down_mbit=100, shaping__cap_up_mbit=50, shaping__cap_down_mbit=50)
    try:
        node.start()
        assert "htb" in node.node.run("tc", "qdisc", "show", "dev", node.wg).stdout  # the buyers' tree
        for _ in range(2):  # the first dial, then a redial
            node.node.run("ip", "link", "add", line, "type", "veth", "peer", "name", "ppx0p")
            node.node.run("ip", "link", "set", line, "up")
            wait_for(lambda: "htb" in node.node.run("tc", "qdisc", "show", "dev", line).stdout, timeout=10)
            assert "ingress" in node.node.run("tc", "qdisc", "show", "dev", line).stdout  # download via its IFB
            node.node.run("ip", "link", "del", line)
        log = node.log.read_text()
        assert "the line ppx0 is not up yet" in log and log.count(f"shaping: {line} is up") == 2, log[-2000:]
        assert "Traceback" not in log
    finally:
        Path(SHAPING_STATE_PATH).unlink(missing_ok=True)


@pytest.fixture
def tiny_fs(tmp_path):
    with tiny_fs_mount(tmp_path, "3m") as fs:
        yield fs


def test_a_full_disk_mid_session_loses_no_byte(nodes, tmp_path, tiny_fs):
    """The state directory on a 3 MB tmpfs, filled up while a buyer moves 20 MB through the tunnel:
    one log line, the API answers, nobody is cut off (co-signing: 503, the client retries); once space
    returns every byte is counted once (ledger equal to the buyer's WireGuard counters)."""
    node = nodes(node__state_dir=str(tiny_fs.path / "state"))
    node.state = tiny_fs.path / "state"
    client = node.client("--interval", "1")
    node.wait_tunnel()
    (s,) = node.open_sessions()
    tiny_fs.fill()
    assert node.iperf(20).returncode == 0
    wait_for(lambda: "the disk is full" in node.log.read_text(), timeout=10)
    time.sleep(2)
    mid = node.session(s["session"])
    b_up, _ = node.buyer_counters()
    assert mid["state"] == "open" and mid["up"] < b_up - 10e6  # not committed: the disk is full
    assert node.get("/health")["status"] == "ok"
    tiny_fs.free()
    wait_for(lambda: "writable again" in node.log.read_text(), timeout=10)
    time.sleep(1.5)
    b_up, b_down = node.buyer_counters()
    ses = node.session(s["session"])
    err, err_down = (ses["up"] - b_up) / b_up, (ses["down"] - b_down) / b_down
    print(f"after the disk was full: ledger up {ses['up']} / down {ses['down']}, buyer counted {b_up} / {b_down} "
          f"({err:+.4%} / {err_down:+.4%})")
    assert abs(err) <= 0.01 and abs(err_down) <= 0.01
    log = node.log.read_text()
    assert log.count("the disk is full") == 1 and "Traceback" not in log, log[-3000:]
    assert "ledger lock is held" not in log
    node.stop_client(client)
    assert node.integrity() == "ok"


def test_a_ledger_truncated_after_kill9_stops_the_agent_until_reset(nodes, tmp_path):
    """kill -9 mid-session, the ledger truncated to zero bytes: the agent refuses to start (one
    line naming the file and the way out) instead of starting over empty and cutting the buyer off;
    `idlewire-agent ledger reset` moves the files aside and the next start begins a fresh ledger."""
    node = nodes()
    client = node.client("--interval", "1")
    node.wait_tunnel()
    assert node.iperf(5).returncode == 0
    time.sleep(1.5)
    node.kill9()
    ledger = node.state / "ledger.sqlite"
    size = ledger.stat().st_size
    assert size > 0
    ledger.write_bytes(b"")
    p = node.node.run(sys.executable, "-m", "idlewire_agent", "run", "--config", str(node.cfg), check=False,
                      timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert str(ledger) in lines[0] and "empty (0 bytes)" in lines[0] and "ledger reset" in lines[0]
    assert ledger.stat().st_size == 0  # not replaced by an empty ledger behind the owner's back
    r = subprocess.run([sys.executable, "-m", "idlewire_agent", "ledger", "reset", "--config", str(node.cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "moved aside" in r.stdout, r.stderr
    assert list(node.state.glob("ledger.sqlite.damaged-*"))
    node.start()
    assert node.get("/usage", admin=True)["lifetime"] == {"up": 0, "down": 0}
    client.kill()
    client.wait()


def test_receipts_of_a_real_session_end_final_and_truncation_is_caught(nodes, tmp_path):
    """The reference client co-signs, closes and saves the chain; `idlewire receipts verify` passes
    it, pinned to both keys, and calls the same chain without its final receipt truncated."""
    node = nodes()
    rfile = tmp_path / "r.json"
    client = node.client("--interval", "0.5", "--receipts", str(rfile))
    node.wait_tunnel()
    assert node.iperf(5).returncode == 0
    time.sleep(1.5)
    node.stop_client(client)
    saved = json.loads(rfile.read_text())
    rs = saved["receipts"]
    sid = rs[0]["session"]
    assert saved["closed"] == [sid] and rs[-1]["final"] == "buyer" and len(rs) >= 3
    buyer_key = rs[0]["buyer_key"]
    node_key = node.get("/health")["node_key"]

    def verify(path, *extra):
        return subprocess.run([sys.executable, "-m", "idlewire", "receipts", "verify", str(path), "--json", *extra],
                              capture_output=True, text=True)

    ok = verify(rfile, "--node-key", node_key, "--buyer-key", buyer_key)
    assert ok.returncode == 0 and json.loads(ok.stdout)["totals"][sid]["final"] == "buyer", ok.stdout
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps({**saved, "receipts": rs[:-1]}))
    bad = verify(cut)
    assert bad.returncode == 1 and "truncated" in json.loads(bad.stdout)["first_bad"]["reason"]
    other = verify(rfile, "--buyer-key", node_key)  # any other key than the buyer's
    assert other.returncode == 1 and "buyer key given" in json.loads(other.stdout)["first_bad"]["reason"]
    # The API reads request bodies as strictly: a duplicated key is a 400 naming it, never a pick.
    import secrets
    import urllib.error
    import urllib.request

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from idlewire_agent import keys, receipts

    w1, w2 = keys.wg_keypair()[1], keys.wg_keypair()[1]
    body = json.dumps({"wg_public_key": w1}).replace("{", f'{{"wg_public_key": "{w2}", ', 1).encode()
    hdrs = receipts.sign_request(Ed25519PrivateKey.generate(), "POST", "/sessions", body, int(time.time()),
                                 secrets.token_hex(16))
    req = urllib.request.Request(node.url + "/sessions", data=body, method="POST", headers=hdrs)  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)  # noqa: S310 (loopback forwarder)
    assert e.value.code == 400 and "duplicate key 'wg_public_key'" in json.loads(e.value.read())["error"]
