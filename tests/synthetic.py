"""A synthetic WireGuard counter source with the Tunnel interface (unit tests and bench/meter.py).

It stands in for `wg show IF dump` where a real interface is not the point: the counters are
plain integers the test drives, including resets (a new ifindex) and peers going missing.
"""

from __future__ import annotations

from idlewire_agent.wg import Peer


class SyntheticTunnel:
    ifname = "synthetic0"
    public_key = "c3ludGhldGljLW5vZGUta2V5LTMyLWJ5dGVzLi4uLi4="

    def __init__(self) -> None:
        self.index = 7
        self.exists = True
        self.peers: dict[str, list[int]] = {}  # key -> [rx, tx]
        self.calls: list[tuple] = []

    def ifindex(self):
        return self.index if self.exists else None

    def ensure(self) -> bool:
        created = not self.exists
        if created:
            self.exists = True
            self.index += 1
            self.peers = {}
        return created

    def recreate(self) -> None:
        """The interface went away and came back: new index, no peers, zero counters."""
        self.index += 1
        self.peers = {}

    def dump(self) -> dict[str, Peer]:
        return {k: Peer(k, rx, tx) for k, (rx, tx) in self.peers.items()}

    def add_peer(self, key: str, address: str) -> None:
        self.calls.append(("add", key, address))
        self.peers[key] = [0, 0]

    def remove_peer(self, key: str) -> None:
        self.calls.append(("remove", key))
        self.peers.pop(key, None)

    def traffic(self, key: str, rx: int, tx: int) -> None:
        p = self.peers[key]
        p[0] += rx
        p[1] += tx
