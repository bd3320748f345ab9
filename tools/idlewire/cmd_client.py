"""`idlewire client connect URL`: the reference buyer. Opens a session on a node, brings up
WireGuard, co-signs usage periodically and prints throughput and cost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from .clikit import App, Arg, Opt
from .errors import UserError

DEFAULT_KEY = Path.home() / ".config" / "idlewire" / "buyer.key"


class NodeError(UserError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def load_key(path: Path):
    """The buyer's ed25519 key (base64 raw 32 bytes, 0600), created if missing."""
    from idlewire_agent import keys

    try:
        return keys.ed25519_private(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot use the buyer key: {exc}; delete it to make a new one") from None


class Buyer:
    """Talks to a node's API with requests signed by the buyer's key."""

    def __init__(self, url: str, key, timeout: float = 10):
        self.url = url.rstrip("/")
        self.key = key
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None, sign: bool = True):
        import secrets
        import urllib.error
        import urllib.request

        from idlewire_agent import receipts

        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if sign:
            headers.update(receipts.sign_request(self.key, method, path, data, int(time.time()),
                                                 secrets.token_hex(16)))
        req = urllib.request.Request(self.url + path, data=data if body is not None else None,  # noqa: S310
                                     method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (URL given by the user)
                raw = resp.read() or b"null"
            try:
                return receipts.strict_loads(raw)
            except ValueError as exc:
                raise NodeError(0, f"{method} {self.url}{path}: the node answered with bad JSON ({exc})") from None
        except urllib.error.HTTPError as exc:
            try:
                msg = json.loads(exc.read()).get("error", "")
            except ValueError:
                msg = ""
            raise NodeError(exc.code, f"{method} {self.url}{path}: HTTP {exc.code} {msg}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise NodeError(0, f"cannot reach the node at {self.url}: {reason}") from None

    def open(self, wg_public_key: str) -> dict:
        return self.request("POST", "/sessions", {"wg_public_key": wg_public_key})

    def cosign(self, session: str, up: int, down: int) -> dict:
        from idlewire_agent import receipts

        stmt = receipts.sign_usage(self.key, session, up, down, int(time.time()))
        return self.request("POST", f"/sessions/{session}/usage", stmt)

    def close(self, session: str) -> dict:
        return self.request("DELETE", f"/sessions/{session}")

    def receipts(self, session: str) -> list:
        return self.request("GET", f"/receipts?session={session}")


class HubBuyer(Buyer):
    """A buyer who came through a hub: the same signed calls to the node's session API, carried by
    the hub over the channel the node opened (POST /v1/nodes/NODE/relay). The node checks the
    buyer's signature and nonce itself; the hub only carries them (it can neither forge a
    co-signature nor replay one), and the node's API never faces the internet or the tunnel."""

    def __init__(self, hub_url: str, key, timeout: float = 20):
        super().__init__(hub_url, key, timeout)
        self.node = ""

    def hub(self, method: str, path: str, body: dict | None = None):
        try:
            return super().request(method, path, body)
        except NodeError as exc:
            raise NodeError(exc.status, str(exc).replace("the node at", "the hub at")) from None

    def connect(self, wg_public_key: str, region: str | None) -> dict:
        out = self.hub("POST", "/v1/connect", {"wg_public_key": wg_public_key, "region": region})
        self.node = out["node"]
        return out

    def request(self, method: str, path: str, body: dict | None = None, sign: bool = True):
        import secrets

        from idlewire_agent import receipts

        data = json.dumps(body).encode() if body is not None else b""
        inner = {"method": method, "path": path, "body": data.decode(),
                 "headers": receipts.sign_request(self.key, method, path, data, int(time.time()),
                                                  secrets.token_hex(16))}
        out = self.hub("POST", f"/v1/nodes/{self.node}/relay", {"request": inner})
        if not isinstance(out, dict) or not isinstance(out.get("status"), int):
            raise NodeError(0, f"{method} {path} via the hub: unexpected answer {str(out)[:100]}")
        if out["status"] >= 400:
            msg = out["body"].get("error", "") if isinstance(out.get("body"), dict) else ""
            raise NodeError(out["status"], f"{method} {path} (node {self.node} via the hub): "
                                           f"HTTP {out['status']} {msg}")
        return out["body"]


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT -> (host, port)."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"the hub gave the node's endpoint as {endpoint!r}; expected HOST:PORT")
    return host.strip("[]"), int(port)


def _run(*argv: str, input: str | None = None) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if p.returncode != 0:
        raise UserError(f"{' '.join(argv[:4])} failed: {p.stderr.strip()}; are you root, with wireguard-tools?")
    return p.stdout


def bring_up(ifname: str, private_key: str, session: dict, endpoint_host: str, routes: list[str] = ()) -> None:
    """A WireGuard interface for the session (kernel WireGuard, else wireguard-go), routing the node's
    tunnel network and `routes` through it."""
    if not shutil.which("wg"):
        raise UserError("`wg` not found: install wireguard-tools")
    if not Path(f"/sys/class/net/{ifname}").exists():
        ok = subprocess.run(["ip", "link", "add", ifname, "type", "wireguard"], capture_output=True,
                            check=False).returncode == 0
        if not ok:
            if not shutil.which("wireguard-go"):
                raise UserError("no WireGuard kernel module and no wireguard-go: install one of them")
            env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1", "LOG_LEVEL": "error"}
            subprocess.run(["wireguard-go", ifname], env=env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            for _ in range(100):
                if Path(f"/sys/class/net/{ifname}").exists():
                    break
                time.sleep(0.05)
    host = session.get("endpoint_host") or endpoint_host
    endpoint = f"[{host}]:{session['endpoint_port']}" if ":" in host else f"{host}:{session['endpoint_port']}"
    nets = [session["allowed_ips"], *routes]
    _run("wg", "set", ifname, "private-key", "/dev/stdin", "peer", session["wg_public_key"], "endpoint", endpoint,
         "allowed-ips", ",".join(nets), "persistent-keepalive", "25", input=private_key + "\n")
    _run("ip", "address", "replace", session["address"], "dev", ifname)
    _run("ip", "link", "set", ifname, "up")
    for net in nets:
        _run("ip", "route", "replace", net, "dev", ifname)


def counters(ifname: str) -> tuple[int, int]:
    """(up, down): bytes this buyer sent to / received from the node, per `wg show dump`."""
    lines = _run("wg", "show", ifname, "dump").splitlines()[1:]
    up = down = 0
    for line in lines:
        f = line.split("\t")
        down += int(f[5])
        up += int(f[6])
    return up, down


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def tear_down(ifname: str) -> None:
    subprocess.run(["ip", "link", "del", ifname], capture_output=True, check=False)


def _wg_keypair() -> tuple[str, str]:
    from idlewire_agent import keys

    return keys.wg_keypair()


def _routes(routes: list[str]) -> list[str]:
    import ipaddress

    out = []
    for r in routes:
        try:
            out.append(str(ipaddress.ip_network(r, strict=False)))
        except ValueError:
            raise UserError(f"--route: expected a network like 192.0.2.0/24, got {r!r}") from None
    return out


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def register(app: App) -> None:
    client = App(help="The reference buyer client: rent bandwidth from a node.")
    app.add_group(client, "client")

    @client.command()
    def connect(
        url: Annotated[str, Arg(help="The node's API on your LAN, e.g. http://192.168.1.20:8740 (or --hub).")] = "",
        hub: Annotated[str, Opt("--hub", help="Buy from a hub instead, e.g. https://hub.example: it picks a "
                                "node, which answers over the channel it opened; usage is co-signed through "
                                "the hub.")] = "",
        region: Annotated[str, Opt("--region", help="With --hub: a node in this country (ISO 3166 code, "
                                   "e.g. DE).")] = "",
        key: Annotated[Path, Opt("--key", help="Your buyer key (ed25519, made if missing, 0600).")] =
            DEFAULT_KEY,
        interface: Annotated[str, Opt("--interface", "-i", help="WireGuard interface to create.")] =
            "iwbuyer0",
        interval: Annotated[float, Opt("--interval", help="Seconds between co-signed usage reports.")] =
            5.0,
        duration: Annotated[float, Opt("--duration", help="Disconnect after this many seconds "
                                       "(0 = until Ctrl-C).")] = 0,
        receipts_out: Annotated[Path | None, Opt("--receipts", help="Save the session's receipts "
                                                         "here at the end (for `idlewire receipts verify`).")] = None,
        route: Annotated[list[str] | None, Opt("--route", help="Also send this network through the "
                                                       "node (repeatable), e.g. 192.0.2.0/24.")] = None,
        keep: Annotated[bool, Opt("--keep", help="Leave the session and interface up at exit.")] = False,
        as_json: Annotated[bool, Opt("--json", help="One JSON object per report on stdout.")] = False,
    ):
        """Open a session on the node at URL and route its tunnel network through WireGuard.

        Every --interval seconds the client reads its own WireGuard counters, signs them (its payment
        promise for the bytes so far) and sends them to the node, which answers with a signed receipt.
        Prints throughput and the cost at the node's price. Needs root (it creates an interface).
        Ctrl-C or SIGTERM (systemd, `timeout`, `kill`) closes the session and saves the receipts.

        With --hub, the hub picks a node (--region, free capacity, price) and asks it over the
        channel the node opened (it works behind any NAT); the node's WireGuard is reached at the
        public endpoint it reported. The co-signatures, receipts and the close go through the hub
        too, signed by your key for the node, which checks them itself.

        Example:  sudo idlewire client connect http://192.168.1.20:8740 --duration 60 --receipts r.json
        Example:  sudo idlewire client connect --hub https://hub.example --region DE --duration 60
        """
        target = hub or url
        what = "--hub: expected http(s)://HOST[:PORT] of the hub" if hub else \
            "URL: expected http://HOST:PORT of the node's API (or --hub URL)"
        if bool(hub) == bool(url) or urlsplit(target).scheme not in ("http", "https") or \
                not urlsplit(target).hostname:
            raise UserError(f"{what}, got {target!r}" if target else "give the node's URL or --hub URL")
        if region:
            from idlewire_agent import schema

            try:  # the node's own key (node.region): the hub takes what the node may claim
                region = schema.NODE["node"]["region"].check(region)
            except schema.Invalid as exc:
                raise UserError(f"--region: expected {exc}, got {schema.shown(region)}") from None
        priv, pub = _wg_keypair()
        if hub:
            buyer = HubBuyer(hub, load_key(key))
            got = buyer.connect(pub, region.upper() or None)
            s = got["session"]
            if s.get("node_key") != got["node_key"] or s.get("wg_public_key") != got["wg_public_key"]:
                raise UserError(f"node {got['node']}: its answer does not match what the hub registered; "
                                "try again (another node)")
            if not got.get("endpoint"):
                raise UserError(f"node {got['node']} reported no public endpoint (not reachable from the "
                                "internet); try again")
            host, port = parse_endpoint(got["endpoint"])
            s = {**s, "endpoint_host": host, "endpoint_port": port}
        else:
            buyer = Buyer(url, load_key(key))
            s = buyer.open(pub)
        sid = s["session"]
        out = sys.stderr
        # SIGTERM ends the session as Ctrl-C does (closed on the node, receipts saved)
        signal.signal(signal.SIGTERM, _interrupt)
        print(f"session {sid}: address {s['address']}, node {s['wg_public_key']}, "
              f"price {s['price_per_gb']}/GB", file=out)
        try:
            bring_up(interface, priv, s, urlsplit(target).hostname or "", _routes(route or []))
            start = last_t = time.monotonic()
            last_total = 0
            while True:
                time.sleep(interval)
                up, down = counters(interface)
                try:
                    r = buyer.cosign(sid, up, down)
                except NodeError as exc:
                    if exc.status not in (0, 502, 503, 504):  # the node refused: the session is over
                        # (503: the node cannot record now, e.g. its disk is full; 502/504: the hub could not
                        # reach the node, e.g. it is rebooting after a power cut: try again)
                        raise
                    print(f"warning: {exc}; retrying", file=out, flush=True)
                    continue
                check_receipt(r["receipt"], s, buyer, sid, up, down)
                now = time.monotonic()
                rate = (up + down - last_total) * 8 / max(now - last_t, 1e-6) / 1e6
                last_t, last_total = now, up + down
                cost = (up + down) / 1e9 * s["price_per_gb"]
                if as_json:
                    print(json.dumps({"session": sid, "up": up, "down": down, "mbit_s": round(rate, 3),
                                      "cost": round(cost, 9), "seq": r["receipt"]["seq"],
                                      "agreed": r["agreed"]}), flush=True)
                else:
                    print(f"up {_human(up)}  down {_human(down)}  {rate:.2f} Mbit/s  cost {cost:.6f}  "
                          f"receipt #{r['receipt']['seq']}{'' if r['agreed'] else ' (node counts more)'}",
                          file=out, flush=True)
                if r.get("state") != "open":
                    print(f"the node closed the session ({r.get('reason')})", file=out, flush=True)
                    break
                if duration and now - start >= duration:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            closed = False  # known closed: its chain must end in the node's final receipt
            if not keep:
                try:
                    closed = buyer.close(sid).get("state") == "closed"
                except NodeError as exc:
                    print(f"warning: {exc}", file=out)
                tear_down(interface)
        if receipts_out:
            save_receipts(buyer, sid, s, receipts_out, closed=closed, out=out)


def check_receipt(r: dict, session: dict, buyer: Buyer, sid: str, up: int, down: int) -> None:
    """The node's answer to a co-signature: its receipt for this session, signed by the node key of
    the session, binding this buyer's key and acknowledging what was just signed."""
    from idlewire_agent import receipts

    me = receipts.pub_b64(buyer.key)
    stmt = r.get("buyer") if isinstance(r.get("buyer"), dict) else {}
    why = None
    if r.get("node") != session["node_key"] or r.get("session") != sid or not receipts.node_signed(r):
        why = "not signed for this session by its node key"
    elif r.get("buyer_key") not in (None, me):
        why = "binds another buyer key than ours"
    elif (stmt.get("up"), stmt.get("down"), stmt.get("key")) != (up, down, me):
        why = "acknowledges other figures than the ones just signed"
    if why is not None:
        raise UserError(f"session {sid}: the node's receipt #{r.get('seq')} is not valid: {why}; stop using this node")


def save_receipts(buyer: Buyer, sid: str, session: dict, path: Path, closed: bool, out) -> None:
    """The session's chain, checked (node key, our buyer key, ends in the final receipt once closed),
    saved as {"receipts": [...], "closed": [SESSION]} for `idlewire receipts verify` (which then
    calls a chain that lost its final receipt truncated)."""
    from idlewire_agent import receipts

    rs = buyer.receipts(sid)
    problem = receipts.verify(rs, session["node_key"], receipts.pub_b64(buyer.key), closed=closed)
    if problem is not None:
        print(f"warning: the node's receipts for session {sid} do not verify: {problem}", file=out)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"receipts": rs, "closed": [sid] if closed else []}, indent=1))
    tmp.replace(path)
    print(f"{len(rs)} receipts saved to {path}", file=out)
