"""The node's hub client (agent/idlewire_agent/market.py) against a real hub on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hublab import HubProc, free_port
from idlewire_agent import receipts as rc
from idlewire_agent.keys import wg_keypair
from idlewire_agent.market import Market, MarketError

CAPS = {"up_mbit": 10, "down_mbit": 50, "max_sessions": 4}


def register(url: str) -> Market:
    key = Ed25519PrivateKey.generate()
    m = Market(url, key)
    m.register(wg_public_key=wg_keypair()[1], payout=rc.payout_statement(key, "bc1qowner0001"), region="NL",
               caps=CAPS, price_per_gb=0.3, endpoint="198.51.100.4:51820", version="0.1.0")
    return m


def test_the_channel_outlives_a_hub_outage(tmp_path):
    hub = HubProc(f"sqlite:///{tmp_path / 'hub.sqlite'}", port=free_port(), log=tmp_path / "hub.log").start()
    try:
        node = register(hub.url)
        hub.stop()
        opened = []
        stop = threading.Event()
        t = threading.Thread(target=node.serve, args=(lambda b, w: opened.append(w) or {"session": "0123456789abcdef"},
                                                      stop), kwargs={"wait": 2, "retry": 0.2}, daemon=True)
        t.start()  # polls a hub that is down: refused connections, retried
        hub.start()
        buyer = Market(hub.url, Ed25519PrivateKey.generate())
        wg = wg_keypair()[1]
        deadline = time.monotonic() + 20
        while True:  # until the node's channel is back (its next poll after the outage)
            try:
                got = buyer.request("POST", "/v1/connect", {"wg_public_key": wg})
                break
            except MarketError as exc:
                if exc.status != 503 or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert got["session"] == {"session": "0123456789abcdef"} and opened == [wg]
        assert got["wg_public_key"] and got["endpoint"] == "198.51.100.4:51820"
    finally:
        stop.set()
        hub.stop()
    t.join(10)
    assert not t.is_alive()


def test_batches_continue_a_chain_with_a_checkpoint():
    key = Ed25519PrivateKey.generate()
    m = Market("http://127.0.0.1:9", key)
    buyer = Ed25519PrivateKey.generate()
    chain, prev = [], rc.GENESIS
    for seq in range(1, 6):
        r = rc.make_receipt(key, "s", seq, seq, seq, seq, prev, rc.sign_usage(buyer, "s", seq, seq, seq))
        prev = rc.receipt_hash(r)
        chain.append(r)
    assert m.batch_for(chain, 0) == chain
    cont = m.batch_for(chain, 3)
    assert cont[0]["type"] == "checkpoint" and cont[0]["hash"] == rc.receipt_hash(chain[2]) and cont[1:] == chain[3:]
    assert rc.verify(cont, rc.pub_b64(key)) is None  # the hub's check, done here too
    assert m.batch_for(chain, 5) == []
    with pytest.raises(ValueError, match="receipt 7 is not in the chain"):
        m.batch_for([*chain, dict(chain[4], seq=9)], 7)  # seq 9 to send, receipt 7 (the last sent) missing


def test_errors_are_one_line():
    with pytest.raises(ValueError, match="marketplace: expected an http"):
        Market("ftp://hub", Ed25519PrivateKey.generate())
    m = Market(f"http://127.0.0.1:{free_port()}", Ed25519PrivateKey.generate(), timeout=2)
    with pytest.raises(MarketError) as exc:
        m.request("GET", "/v1")
    assert exc.value.status == 0 and "\n" not in str(exc.value) and "127.0.0.1" in str(exc.value)
    with pytest.raises(MarketError, match="register first"):
        m.heartbeat(uptime=1, sessions=[])


def test_market_runs_on_the_node_python():
    """Standard library + cryptography only, as everything under agent/."""
    code = ("import json, sys; import idlewire_agent.market; "
            "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules} - set(sys.stdlib_module_names))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(__import__("hublab").ROOT / "agent")})
    loaded = {n for n in json.loads(out.stdout) if not n.startswith("_")}  # (C parts, site hooks)
    assert loaded <= {"idlewire_agent", "cryptography", "cffi"}, out.stdout
