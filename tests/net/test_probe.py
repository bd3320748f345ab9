"""The hub's prober in the namespace lab (tests/net/marketlab.py): a node behind a home NAT that
advertises 100 Mbit/s down while its home line carries 10 (a tbf on the home router's WAN) fails
the probes `idlewire hub probe` runs from the internet through its tunnel, and the epoch's
settlement slashes it with the probe ids and measurements as evidence."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "hub"))

from agentlab import wait_for
from marketlab import ENV, WEB, MarketLab
from netlab import Lab, have_netns

pytestmark = pytest.mark.skipif(have_netns() is not None, reason=str(have_netns()))

STREAM_PORT = 7100


def test_a_node_that_claims_100_and_delivers_10_fails_its_probes_and_is_slashed(tmp_path):
    from idlewire.economy.rules import Rules
    from idlewire.hub import db
    from idlewire.hub import economy as eco_db

    with Lab() as lab:
        m = MarketLab(lab, tmp_path)
        try:
            m.cfg.write_text(m.cfg.read_text() + "\n[shaping]\ncap_down_mbit = 100\n")
            # the home line's upload (what the node sends its buyers) at 10 Mbit/s instead of the lab's 200
            m.nat.run("tc", "qdisc", "replace", "dev", "wan0", "root", "tbf", "rate", "10mbit", "burst", "32kb",
                      "latency", "100ms")
            m.web.popen(sys.executable, "-c", (  # an endless HTTP download, for what came through the node
                "import socket, threading\n"
                f"s = socket.create_server(('{WEB}', {STREAM_PORT}), backlog=64)\n"
                "def serve(c):\n"
                "    try:\n"
                "        c.recv(4096)\n"
                "        c.sendall(b'HTTP/1.0 200 OK\\r\\nContent-Type: application/octet-stream\\r\\n\\r\\n')\n"
                "        while True: c.sendall(bytes(65536))\n"
                "    except OSError: c.close()\n"
                "while True:\n"
                "    c, a = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()\n"),
                stdout=subprocess.DEVNULL)
            m.start_hub()
            m.start_agent()
            node = wait_for(lambda: next((n for n in m.hub("/v1/nodes") if n["channel_open"]), None), timeout=20)
            assert node["caps"]["down_mbit"] == 100

            (tmp_path / "rules.toml").write_text("epoch_seconds = 3600\n")
            (tmp_path / "prices.csv").write_text("0,0.25\n")
            opts = ["--rules", str(tmp_path / "rules.toml"), "--prices", str(tmp_path / "prices.csv"),
                    "--key", str(tmp_path / "hub.key")]
            eco = eco_db.load(tmp_path / "rules.toml", tmp_path / "hub.key", tmp_path / "prices.csv")
            engine = db.make_engine(f"sqlite:///{m.hub_db}")
            meta = eco_db.genesis(engine, eco)
            eco_db.stake(engine, eco, node["id"], Rules().staking.min_stake, src="treasury")

            rows = []
            for _ in range(3):
                wait_for(lambda: next(n for n in m.hub("/v1/nodes") if n["id"] == node["id"])["open_sessions"] == 0,
                         timeout=20)
                out = m.buyer.run(sys.executable, "-m", "idlewire", "hub", "probe", "--db", f"sqlite:///{m.hub_db}",
                                  "--hub", m.hub_url, "--target", f"http://{WEB}:{STREAM_PORT}/",
                                  "--seconds", "3", "--interface", m.buyer_wg, "--json", *opts,
                                  env=ENV, timeout=120, check=False)
                assert out.returncode == 0, out.stderr
                rows += json.loads(out.stdout)
            assert [r["reached"] for r in rows] == [True] * 3, rows
            assert all(3 <= r["mbit"] <= 12 and r["advertised_mbit"] == 100 for r in rows), rows

            s = eco_db.settle_epoch(engine, eco, now=meta["genesis_at"] + 3600 + 1)
            assert time.time() < meta["genesis_at"] + 3600, "the probes crossed an hour boundary: run it again"
            (sl,) = [x for x in s.statement["slashes"] if x["kind"] == "failed_probes"]
            assert sl["node"] == node["id"]
            assert sorted(sl["evidence"]) == sorted(r["id"] for r in rows)
            assert sl["amount"] == Rules().staking.min_stake * Rules().staking.slash_failed_probes_ppm // 1_000_000
            (mine,) = [r for r in eco_db.earnings(engine) if r["node_id"] == node["id"]]
            assert mine["uptime_ppm"] == 0 and mine["reward"] == 0
            engine.dispose()
        finally:
            m.close()
