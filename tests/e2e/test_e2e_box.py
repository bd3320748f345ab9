"""From a box to a paid gigabyte: the whole story on the x86_64 image idlewire builds.

One node, booted once under QEMU from the image `idlewire build` made, `idlewire stamp`ed
(`mode: router`) and `idlewire flash`ed to a file, sits behind a home router (namespace: NAT,
Debian's miniupnpd, DHCP) with the owner's laptop on its own LAN port; the hub and a buyer are on
the "internet" (namespaces; tests/e2e/boxlab.py draws it).
The tests run in file order on that one VM, each a step of the README section "From a box to a
paid gigabyte":

1. stamp (hostname, caps, payout address, marketplace, region, router mode) and flash to a file
   with the read-back verify
2. boot behind the home router; the owner's laptop gets its lease from the node and reaches the
   web through it
3. `idlewire console --bootstrap` over the serial socket (once more: the key is there already;
   `--run` gives output and status), then `idlewire verify`, which passes, and names what an
   owner broke by hand (the agent stopped, sshd taking passwords, the isolation table flushed).
   This is the image's console story too: no separate boot of a golden image for it
4. the node maps its port on the home router over UPnP and registers with the hub; a buyer
   connects through the hub, moves traffic at the stamped caps, co-signs, and probes the owner's
   LANs, the node's admin API and private ranges
5. the hub settles an epoch; the node's reward in `idlewire hub earnings` and (after step 6
   restarts its agent) in the node's /health
6. `playbooks/upgrade.yml` rolls a new agent while the buyer is connected
7. a power cut (QEMU killed and started again cold) during a transfer

Each step's figures go to e2e-figures.json in the pytest base temp directory and to the end of
the terminal report.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from boxlab import (
    DRAIN_CONSOLE,
    ENV,
    NODE,
    NODE_LAN,
    NODE_MAC,
    OWNER,
    PROBE_PORT,
    ROOT,
    ROUTER,
    TUNNEL_PORT,
    WEB,
    BoxLab,
    timestamp_lines,
)
from idlewire.economy.rules import Rules
from netlab import Lab, wait_for
from qemu import Vm, golden_image, why_no_qemu

# Part of `make test` (`make e2e` runs it alone): 9 minutes of both cores under TCG on the
# machine that measured it (README "From a box to a paid gigabyte"), most of it the boot, the
# two-minute upgrade, the minute-long epochs and the boot after the power cut.
pytestmark = [pytest.mark.e2e]

IDLEWIRE = [sys.executable, "-m", "idlewire"]
CAP_UP, CAP_DOWN = 4, 8  # Mbit/s, stamped on the unit
POOL_GATEWAY = "10.99.0.1"  # the node's side of the tunnel (roles/agent: agent_tunnel_pool 10.99.0.0/16)
FIGURES: dict = {}


def record(step: str, **figures) -> None:
    FIGURES.setdefault(step, {}).update(figures)
    if FIGURES.get("_path"):
        Path(FIGURES["_path"]).write_text(json.dumps({k: v for k, v in FIGURES.items() if k != "_path"}, indent=1))


def idlewire(*args: str, timeout: float = 600, ns=None) -> subprocess.CompletedProcess:
    pre = ["ip", "netns", "exec", ns.name] if ns else []
    return subprocess.run([*pre, *IDLEWIRE, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=ENV)


class Reports:
    """The buyer client's JSON reports, read as they come (the pipe never fills)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.items = proc, []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.items.append(json.loads(line))

    @property
    def last(self) -> dict:
        return self.items[-1] if self.items else {}


@pytest.fixture(scope="module")
def box(tmp_path_factory, request):
    if why := why_no_qemu():
        pytest.skip(why)
    from homelab import have_homelab

    if why := have_homelab():  # the home router: miniupnpd, upnpc, nft, iperf3
        pytest.skip(why)
    for tool in (["busybox", "udhcpd", "--help"], ["iperf3", "--version"]):
        if not shutil.which(tool[0]) or subprocess.run(tool, capture_output=True).returncode not in (0, 1):
            pytest.skip(f"{' '.join(tool[:2])} is missing (tools/scripts/deps.sh test installs it)")
    tmp = tmp_path_factory.mktemp("e2e")
    FIGURES["_path"] = str(tmp_path_factory.getbasetemp() / "e2e-figures.json")
    request.config.e2e_figures = FIGURES  # printed by tests/conftest.py at the end of the run
    golden = golden_image(tmp_path_factory.mktemp("golden"))
    with Lab() as lab:
        b = BoxLab(lab, tmp)
        b.golden, b.state = golden, {}
        for who in ("vendor", "owner"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"e2e-{who}",
                            "-f", str(tmp / f"{who}_key")], check=True)
        b.vm = None
        try:
            yield b
        finally:
            if b.vm:
                b.stop_stamping.set()
                b.vm.stop()
            for p in b.state.get("clients", []):
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
                    try:
                        p.wait(20)
                    except subprocess.TimeoutExpired:
                        p.kill()
            if b.hub_proc and b.hub_proc.poll() is None:
                b.hub_proc.terminate()


@pytest.fixture(autouse=True)
def _guest_kernel_alive(box):
    """A step whose packets killed the guest kernel says so (its serial console is logged)."""
    yield
    vm = getattr(box, "vm", None)
    if vm is None or not vm.serial_log.exists() or box.state.get("panic"):
        return
    lines = vm.serial_log.read_text(errors="replace").splitlines()
    said = [ln.strip() for ln in lines if re.search(r"Kernel panic|Oops:|Workqueue:|RIP: ", ln)]
    if any("Kernel panic" in ln for ln in said):
        box.state["panic"] = said[:6]
        record("guest_kernel_panic", lines=said[:6])
        pytest.fail(f"the node's kernel panicked (serial log {vm.serial_log}): " + " | ".join(said[:6]))


def unit_yml(b: BoxLab, extra: str = "") -> Path:
    path = b.tmp / "unit.yml"
    path.write_text(
        "unit: e2e-0001\nhostname: iw-e2e\nssh_authorized_keys:\n"
        f"  - {(b.tmp / 'vendor_key.pub').read_text().strip()}\n"
        "payout_address: addr-e2e-0001\nmode: router\n"
        f"caps:\n  up_mbit: {CAP_UP}\n  down_mbit: {CAP_DOWN}\n  monthly_gb: 100\n  max_sessions: 4\n" + extra)
    return path


# --- 1. stamp and flash --------------------------------------------------------------------------
def test_1_stamp_and_flash(box):
    b = box
    b.hub_port_url = b.hub_url
    market = f"marketplace: {b.hub_url}\nregion: DE\n"
    res = idlewire("stamp", str(b.golden), "--unit", str(unit_yml(b, market)), "--out", str(b.tmp / "stamped.img"),
                   "--json")
    assert res.returncode == 0, res.stderr
    unit = json.loads(res.stdout)["units"][0]
    b.state["node_public_key"] = unit["node_public_key"]
    target = b.tmp / "card.img"
    res = idlewire("flash", str(b.tmp / "stamped.img"), str(target), "--json")
    assert res.returncode == 0, res.stderr
    card = json.loads(res.stdout)["cards"][0]
    assert card["verified"] and card["mismatch_count"] == 0 and card["error"] is None, card
    b.card = target
    record("1_stamp_flash", unit=unit["unit"], written_bytes=card["written_bytes"],
           write_seconds=card["write_seconds"], verify_seconds=card["verify_seconds"], verified=card["verified"])
    from idlewire import stamp as st

    toml = st.read_boot_file(b.tmp / "stamped.img", st.read_layout(b.golden).boot_offset, "stamp.toml").decode()
    assert b.hub_url in toml and '"DE"' in toml and '"router"' in toml, toml


# --- 2, 3. boot behind the home router, console bootstrap, verify --------------------------------
@pytest.fixture(scope="module")
def node(box):
    b = box
    if not getattr(b, "card", None):
        pytest.skip("step 1 (stamp and flash) failed")
    b.vm = Vm(b.card, "amd64", b.tmp / "vm", b.tmp / "owner_key", memory=1024, console=True, monitor=True,
              reboot=True, nics=b.nics(), netns=b.home.name, ssh_host=NODE_LAN, ssh_netns=b.laptop.name)
    b.vm.start()
    b.stop_stamping = threading.Event()
    threading.Thread(target=timestamp_lines, args=(b.vm.serial_log, b.tmp / "serial.times.log", b.stop_stamping),
                     daemon=True).start()
    time.sleep(0.5)  # QEMU listens: the firmware starts when the console connects
    t0 = time.monotonic()
    b.bootstrap = idlewire("console", b.vm.console_url, "--bootstrap", "--key", str(b.tmp / "owner_key.pub"),
                           "--log", str(b.tmp / "boot.log"), "--timeout", "600", "--json", ns=b.home, timeout=700)
    b.boot_seconds = time.monotonic() - t0
    if b.bootstrap.returncode == 0:  # the console once more, before the drain takes it: the key is
        # there already (authorized_keys left alone), and commands give their output and status
        pub = str(b.tmp / "owner_key.pub")
        b.again = idlewire("console", b.vm.console_url, "--bootstrap", "--key", pub, "--json", "--timeout", "60",
                           ns=b.home, timeout=120)
        b.ran = idlewire("console", b.vm.console_url, "--run", "systemctl is-active idlewire-agent",
                         "--run", "echo out; echo err >&2; exit 4", "--json", "--timeout", "60", ns=b.home, timeout=120)
    b.home.popen(sys.executable, "-c", DRAIN_CONSOLE, str(b.vm.console_port), stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    if b.bootstrap.returncode == 0:
        t0 = time.monotonic()
        b.laptop_lease(300)  # the laptop's lease comes from the node: nothing else on its LAN serves one
        b.lease_seconds = time.monotonic() - t0
    return b


def health(vm: Vm) -> dict:
    out = vm.ssh("python3 -c \"import urllib.request as u;"
                 "print(u.urlopen('http://127.0.0.1:8740/health', timeout=5).read().decode())\"", timeout=60)
    return json.loads(out.stdout)


def test_2_3_boot_console_bootstrap_verify(node):
    b, vm = node, node.vm
    res = b.bootstrap
    assert res.returncode == 0, f"console bootstrap failed ({b.boot_seconds:.0f}s): {res.stderr[-1500:]}"
    out = json.loads(res.stdout)
    assert out["key"] == "installed", out
    # the home router's DHCP gave the node its WAN address on the home LAN; its own LAN is br-lan's
    assert any(a["address"].startswith(f"{NODE}/") for a in out["addresses"]), out["addresses"]
    assert any(a["address"].startswith(f"{NODE_LAN}/") for a in out["addresses"]), out["addresses"]
    assert out["login"] == "shell" and out["uid"] == 0 and out["key_user"] == "idlewire", out  # serial autologin
    ssh_s = vm.wait_ssh(300)  # from the owner's laptop on the node's LAN, with the key the console installed
    assert vm.ssh("hostname").stdout.strip() == "iw-e2e"
    modes = vm.ssh("stat -c '%a %U' .ssh/authorized_keys .ssh").stdout.split("\n")[:2]
    assert modes == ["600 idlewire", "700 idlewire"], modes
    log = (b.tmp / "boot.log").read_bytes()  # the whole boot, firmware to autologin
    assert b"BdsDxe" in log and b"ttyS0" in log and b"(automatic login)" in log
    assert vm.ssh("cat /proc/sys/kernel/printk").stdout.split()[0] == "1"  # kernel messages off the console
    # a second bootstrap finds the key there and leaves authorized_keys alone (vendor's + owner's)
    assert b.again.returncode == 0 and json.loads(b.again.stdout)["key"] == "already present", b.again.stderr
    assert vm.ssh("wc -l < .ssh/authorized_keys").stdout.strip() == "2"
    assert b.ran.returncode == 4, b.ran.stderr  # `console --run`: each command's output and exit status
    r = json.loads(b.ran.stdout)["results"]
    assert (r[0]["exit_status"], r[0]["output"]) == (0, "active\n")
    assert r[1]["exit_status"] == 4 and "out\n" in r[1]["output"] and "err\n" in r[1]["output"]
    # the vendor's stamped key logs in too (the stamp was consumed at first boot)
    argv = vm.ssh_argv()
    argv[argv.index(str(vm.key))] = str(b.tmp / "vendor_key")
    argv.insert(argv.index("ssh") + 1, "-oIdentitiesOnly=yes")
    vendor = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=60)
    assert vendor.returncode == 0, vendor.stderr
    h = health(vm)
    assert h["node_key"] == b.state["node_public_key"] and h["unit"]["payout_address"] == "addr-e2e-0001", h
    assert h["caps"]["up_mbit"] == CAP_UP and h["caps"]["down_mbit"] == CAP_DOWN, h["caps"]
    b.inventory = b.tmp / "inventory.yml"
    write_inventory(b, {})
    t0 = time.monotonic()
    res = idlewire("verify", "-i", str(b.inventory), "--junit", str(b.tmp / "verify.xml"), "--json",
                   ns=b.laptop, timeout=600)
    assert res.returncode in (0, 1), res.stderr[-2000:]
    host = json.loads(res.stdout)["hosts"][0]
    assert host["status"] == "ok", host["failed"]
    record("2_3_boot_console_verify", console_bootstrap_s=round(b.boot_seconds, 1),
           laptop_lease_s=round(b.lease_seconds, 1), ssh_after_bootstrap_s=round(ssh_s, 1),
           verify_s=round(time.monotonic() - t0, 1), verify_passed=len(host["passed"]),
           verify_skipped=len(host["skipped"]), verify_checks=sorted(host["passed"]))
    assert any("router" in name for name in host["passed"]), host["passed"]


def test_2_owner_laptop_behind_the_node(node):
    """The owner's laptop on the node's LAN port: a lease of the node's pool, the node as router and
    DNS server, and the web reached through it (the node's NAT, then the home router's)."""
    b = node
    if not getattr(b, "lease", None):
        pytest.skip("steps 2-3 failed: no lease")
    ip, mask, gw, dns = b.lease
    assert ip.startswith(NODE_LAN.rsplit(".", 1)[0] + ".") and (mask, gw, dns) == ("24", NODE_LAN, NODE_LAN), b.lease
    code = ("import socket,sys\n"
            "print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).recv(1).decode())\n")
    r = b.laptop.run(sys.executable, "-c", code, WEB, str(PROBE_PORT), check=False, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "x", r.stderr
    b.state["laptop"] = ip
    record("2_laptop", lease=ip, router=gw, dns=dns, web_reached=True)


def test_3_verify_names_what_broke(node):
    """What an owner breaks by hand, `idlewire verify` names: the agent stopped, sshd taking
    passwords again, the buyers' isolation table flushed. All at once, one run (each check is its
    own test in the suite); everything is put back before the market steps."""
    b, vm = node, node.vm
    if not getattr(b, "inventory", None):
        pytest.skip("step 3 failed: no inventory")
    vm.ssh("sudo systemctl stop idlewire-agent && sudo nft flush table inet idlewire && "
           "echo 'PasswordAuthentication yes' | sudo tee /etc/ssh/sshd_config.d/00-broken.conf >/dev/null && "
           "sudo systemctl reload ssh")
    try:
        res = idlewire("verify", "-i", str(b.inventory), "--json", ns=b.laptop, timeout=600)
    finally:
        vm.ssh("sudo rm -f /etc/ssh/sshd_config.d/00-broken.conf && sudo systemctl reload ssh && "
               "sudo systemctl restart idlewire-firewall idlewire-agent")
    assert res.returncode == 1, res.stderr[-2000:]
    failed = {f["test"]: f["message"] for f in json.loads(res.stdout)["hosts"][0]["failed"]}
    named = {"test_agent_service_active_and_enabled", "test_ssh_password_authentication_off",
             "test_nft_isolation_table_loaded"}
    assert named <= set(failed), failed
    # the agent's own checks follow from it being stopped; nothing else is blamed
    assert set(failed) <= named | {"test_api_listens_on_management_only", "test_api_health_ok",
                                   "test_wireguard_port_on_wan"}, failed
    assert "passwordauthentication" in failed["test_ssh_password_authentication_off"]
    record("3_verify_broken", failed=sorted(failed))
    wait_for(lambda: agent_up(vm), timeout=120, every=2, what="the agent after the breakage was undone")


def write_inventory(b: BoxLab, agent_vars: dict) -> None:
    lines = ["all:", "  children:", "    idlewire:", "      hosts:", "        e2e-0001:",
             f"          ansible_host: {NODE_LAN}", "          ansible_user: idlewire",
             f"          ansible_ssh_private_key_file: {b.tmp / 'owner_key'}",
             "          ansible_ssh_common_args: -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"]
    if agent_vars:
        lines.append("      vars:")
        lines += [f"        {k}: {json.dumps(v)}" for k, v in agent_vars.items()]
    b.inventory.write_text("\n".join(lines) + "\n")


# node.toml edits of step 4 and the role variables that render the same (upgrade.yml re-renders it)
# (the marketplace and region come with the stamp; the tunnel's public endpoint from the UPnP mapping)
def market_config(wan: str) -> tuple[dict, dict]:
    toml = {"interfaces": {"wan": json.dumps(wan)},
            "metering": {"poll_interval": "1.0"},
            "shaping": {"enabled": "true"}}
    role = {"agent_wan_interface": wan, "agent_poll_interval": 1, "agent_shaping_enabled": True}
    return toml, role


EDIT_TOML = r"""
import json, os, re, shutil, sys
edits = json.loads(sys.argv[1]); path = "/etc/idlewire/node.toml"; out = []; section = None
for line in open(path).read().splitlines():
    m = re.match(r"\[(\w+)\]\s*$", line)
    section = m[1] if m else section
    k = re.match(r"(\w+)\s*=", line)
    if k and k[1] in edits.get(section, {}):
        line = f"{k[1]} = {edits[section].pop(k[1])}"
    out.append(line)
left = {s: v for s, v in edits.items() if v}
assert not left, f"not in node.toml: {left}"
open(path + ".e2e", "w").write("\n".join(out) + "\n"); shutil.copystat(path, path + ".e2e")
os.replace(path + ".e2e", path)
"""


def ledger(vm: Vm, sql: str, *args) -> list:
    """A read-only query on the node's ledger (over SSH, as its owner would)."""
    code = ("import json, sqlite3, sys; db = sqlite3.connect('file:/var/lib/idlewire-agent/ledger.sqlite?mode=ro', "
            "uri=True, timeout=10); print(json.dumps(db.execute(sys.argv[1], json.loads(sys.argv[2])).fetchall()))")
    out = vm.ssh(f"sudo python3 -c {shlex.quote(code)} {shlex.quote(sql)} {shlex.quote(json.dumps(args))}",
                 timeout=60)
    return json.loads(out.stdout)


def session_row(vm: Vm, sid: str) -> dict:
    rows = ledger(vm, "SELECT state, reason, rx, tx, closed_at FROM sessions WHERE id = ?", sid)
    return dict(zip(("state", "reason", "rx", "tx", "closed_at"), rows[0], strict=True)) if rows else {}


def verify_chain(b: BoxLab, chain: list[dict], name: str) -> subprocess.CompletedProcess:
    """`idlewire receipts verify` on a session's chain as the hub holds it (closed: it must end in
    the node's final receipt)."""
    path = b.tmp / f"{name}.hub-chain.json"
    path.write_text(json.dumps(chain))
    return idlewire("receipts", "verify", str(path), "--node-key", b.state["node_public_key"], "--closed", "--json")


def agent_up(vm: Vm) -> bool:
    try:
        return bool(health(vm))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError):
        return False


def connect(b: BoxLab, name: str) -> tuple[subprocess.Popen, Reports, str]:
    receipts = b.tmp / f"{name}.receipts.json"
    proc = b.client(receipts, "192.168.0.0/16", "10.0.0.0/8", "172.16.0.0/12")
    b.state.setdefault("clients", []).append(proc)
    reports = Reports(proc)
    wait_for(lambda: reports.items or proc.poll() is not None, timeout=90, what="the buyer's first co-signature")
    if not reports.items:  # the node's side of it (its channel to the hub), for whoever reads the failure
        journal = b.vm.ssh("sudo journalctl -u idlewire-agent -n 40 --no-pager -o short-monotonic", check=False)
        (b.tmp / f"{name}.agent-journal.txt").write_text(journal.stdout + journal.stderr)
        pytest.fail(f"client exited {proc.returncode}: {b.client_said()[-2000:]}\n"
                    f"the agent's journal, last lines:\n{journal.stdout[-3000:]}")
    return proc, reports, reports.last["session"]


# --- 4. register, buy, shape, co-sign, isolate ---------------------------------------------------
def test_4_register_buy_at_the_cap_and_reach_nothing_private(node):
    b, vm = node, node.vm
    if not getattr(b, "inventory", None):
        pytest.skip("steps 2-3 failed")
    links = json.loads(vm.ssh("ip -j link").stdout)
    wan = next(link["ifname"] for link in links if link.get("address") == NODE_MAC)
    toml, role = market_config(wan)
    subprocess.run([*vm.ssh_argv(), "sudo python3 - " + shlex.quote(json.dumps(toml))], input=EDIT_TOML,
                   capture_output=True, text=True, check=True, timeout=60)
    check = vm.ssh("sudo idlewire-agent check-config /etc/idlewire/node.toml", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    write_inventory(b, role)
    b.start_hub()
    vm.ssh("sudo systemctl restart idlewire-agent")
    t0 = time.monotonic()
    registered = wait_for(lambda: [n for n in b.nodes() if n.get("node_key") == b.state["node_public_key"]],
                          timeout=120, every=1, what="the node on the hub")[0]
    reg_s = time.monotonic() - t0
    # the endpoint the hub holds is the UPnP mapping on the home router, to the node's WireGuard port
    def reachability() -> dict:  # the API may still be starting when the hub has the node already
        try:
            return health(vm).get("reachability", {})
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError):
            return {}

    reach = wait_for(reachability, timeout=90, every=2, what="the agent's /health")
    assert reach.get("reachable") and reach.get("how") and reach.get("endpoint"), reach
    assert registered["endpoint"] == reach["endpoint"] and registered["region"] == "DE", (registered, reach)
    host, ext_port = registered["endpoint"].rsplit(":", 1)
    assert host == b.public, registered
    mapped = b.homelab.nat_rules()
    assert f"dport {ext_port} dnat ip to {NODE}:{TUNNEL_PORT}" in mapped, mapped
    b.state["node_id"] = registered["id"]
    # the first economy command makes the genesis allocation (minute-long epochs, step 5 settles them);
    # the node earns only with the rules' minimum stake bonded
    res = economy(b, "stake", registered["id"], str(Rules().staking.min_stake // 10**Rules().market.decimals),
                  "--from", "treasury")
    assert res.returncode == 0, res.stderr

    proc, reports, sid = connect(b, "s1")
    b.state.update(client1=(proc, reports, sid))
    up = b.iperf(seconds=8)
    down = b.iperf("-R", seconds=8)
    up_mbit = up["end"]["sum_received"]["bits_per_second"] / 1e6
    down_mbit = down["end"]["sum_received"]["bits_per_second"] / 1e6
    probes = [(WEB, PROBE_PORT), (b.state.get("laptop", "192.168.8.100"), PROBE_PORT), (OWNER, PROBE_PORT),
              (ROUTER, PROBE_PORT), ("10.0.0.1", PROBE_PORT), ("172.16.0.1", PROBE_PORT),
              *[(host, port) for host in (NODE, NODE_LAN, POOL_GATEWAY, b.public) for port in (8740, 22)]]
    reached = b.reach(probes)
    control = reached.pop(f"{WEB}:{PROBE_PORT}")
    time.sleep(3)  # a few more co-signatures
    node_row = session_row(vm, sid)
    chain = b.hub_chain(sid)
    qdiscs = sorted({q["kind"] for q in json.loads(vm.ssh("/usr/sbin/tc -j qdisc show").stdout)})
    record("4_market", wan_interface=wan, registered_s=round(reg_s, 1), endpoint=registered["endpoint"],
           mapped_by=reach["how"], qdiscs=qdiscs,
           up_mbit=round(up_mbit, 2), cap_up_mbit=CAP_UP, up_ratio=round(up_mbit / CAP_UP, 3),
           down_mbit=round(down_mbit, 2), cap_down_mbit=CAP_DOWN, down_ratio=round(down_mbit / CAP_DOWN, 3),
           probes=reached, probes_reached=sum(reached.values()), control_probe_reached=control,
           cosigned_reports=len(reports.items), agreed=sum(r["agreed"] for r in reports.items),
           hub_receipts=len(chain),
           bytes_node={"rx": node_row["rx"], "tx": node_row["tx"]},
           bytes_hub={"up": chain[-1]["up"], "down": chain[-1]["down"]} if chain else None,
           bytes_buyer={"up": reports.last["up"], "down": reports.last["down"]})
    assert control, "the buyer reached nothing through the tunnel (control probe to the web)"
    assert not any(reached.values()), f"the buyer reached private/admin addresses: {reached}"
    assert 0.6 * CAP_UP <= up_mbit <= 1.1 * CAP_UP, (up_mbit, CAP_UP)
    assert 0.6 * CAP_DOWN <= down_mbit <= 1.1 * CAP_DOWN, (down_mbit, CAP_DOWN)
    assert len(reports.items) >= 10 and reports.items[-1]["seq"] > reports.items[0]["seq"]
    assert chain and all("buyer" in r for r in chain[1:]), "receipts at the hub lack the buyer's co-signature"
    # what the buyer signed for and the node counted are the same traffic (WireGuard bytes on both ends)
    assert node_row["state"] == "open"


# --- 5. settlement ------------------------------------------------------------------------------
EPOCH_S = 60  # the lab's epoch: a minute (the reference rules: a day); heartbeats every 60 s as ever


def economy(b: BoxLab, *args: str) -> subprocess.CompletedProcess:
    """`idlewire hub CMD … --json` on the hub's database with the lab's rules, prices and statement key."""
    rules, prices = b.tmp / "rules.toml", b.tmp / "prices.csv"
    if not rules.exists():
        rules.write_text(f"epoch_seconds = {EPOCH_S}\n")
        prices.write_text("0,0.25\n")  # from epoch 0: a token is worth $0.25
    opts = ["--db", f"sqlite:///{b.hub_db}", "--rules", str(rules), "--prices", str(prices),
            "--key", str(b.tmp / "hub-statement.key")]
    return idlewire("hub", *args, *(opts if args[0] != "earnings" else opts[:2]), "--json", timeout=120)


def settle_ended(b: BoxLab) -> list[dict]:
    """`idlewire hub settle` until the next epoch has not ended yet; the statements it made."""
    out = []
    while (res := economy(b, "settle")).returncode == 0:
        out.append(json.loads(res.stdout))
    assert "has not ended" in res.stderr, res.stderr
    return out


def test_5_epoch_settles_and_earnings_show(node):
    b = node
    if "client1" not in b.state:
        pytest.skip("step 4 failed: no connected buyer")
    # Settle what ended since genesis, at an epoch boundary: the next epoch then has a whole
    # epoch of heartbeats (uptime counts those since the last settlement) and the traffic below.
    wait = EPOCH_S - time.time() % EPOCH_S
    time.sleep(wait + 1)
    early = settle_ended(b)
    t0 = time.time()
    up = b.iperf(seconds=5)
    time.sleep(max(0.0, EPOCH_S - time.time() % EPOCH_S) + 3)  # the epoch ends; its receipts are in
    (st,) = settle_ended(b)
    epoch = st["epoch"]
    assert st["statement"]["rewarded"] >= 1 and st["statement"]["minted"] > 0, st["statement"]
    res = economy(b, "earnings", b.state["node_id"], "--epoch", str(epoch))
    assert res.returncode == 0, res.stderr
    (mine,) = json.loads(res.stdout)
    b.state["earned"] = mine
    record("5_settlement", epoch_s=EPOCH_S, epochs_settled_before=len(early), epoch=epoch, statement=st["hash"],
           minted=st["statement"]["minted"], burned=st["statement"]["burned"], reward=mine["reward"],
           verified_bytes=mine["verified_bytes"], uptime_ppm=mine["uptime_ppm"],
           multiplier_ppm=mine["multiplier_ppm"], why_not=mine.get("why_not"),
           iperf_bytes=up["end"]["sum_received"]["bytes"], waited_s=round(wait + time.time() - t0, 1))
    assert mine["reward"] > 0 and mine["verified_bytes"] >= up["end"]["sum_received"]["bytes"], mine
    # what the node shows in /health is checked after step 6 restarts its agent: the node looks
    # at its earnings when it starts and every 10 minutes after


# --- 6. rolling upgrade while the buyer is connected ----------------------------------------------
def test_6_upgrade_drains_the_buyer_with_a_final_receipt(node):
    b, vm = node, node.vm
    if "client1" not in b.state:
        pytest.skip("step 4 failed: no connected buyer")
    proc, reports, sid = b.state["client1"]
    assert proc.poll() is None, "the buyer is not connected before the upgrade"
    new = b.tmp / "new-agent" / "idlewire_agent"
    shutil.copytree(ROOT / "agent" / "idlewire_agent", new, ignore=shutil.ignore_patterns("__pycache__"))
    init = new / "__init__.py"
    old_version = re.search(r'__version__ = "([^"]+)"', init.read_text())[1]
    version = old_version + "+e2e"
    init.write_text(init.read_text().replace(f'__version__ = "{old_version}"', f'__version__ = "{version}"'))
    node_t0 = float(vm.ssh("date +%s.%N").stdout)
    t0 = time.monotonic()
    bin_dir = Path(sys.executable).parent
    res = subprocess.run(["ip", "netns", "exec", b.laptop.name, str(bin_dir / "ansible-playbook"),
                          "-i", str(b.inventory), "playbooks/upgrade.yml", "-e", f"upgrade_agent_source={new}",
                          "-e", "upgrade_batch=1"], capture_output=True, text=True, cwd=ROOT, timeout=1500,
                         env={**ENV, "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
                              "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks"})
    upgrade_s = time.monotonic() - t0
    (b.tmp / "upgrade.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    row = session_row(vm, sid)
    assert row["state"] == "closed" and row["reason"] == "admin", row
    drain_s = row["closed_at"] - node_t0
    h = health(vm)
    assert h["version"] == version
    if earned := b.state.get("earned"):  # step 5: the restarted agent looked at its earnings at once
        shown = wait_for(lambda: (health(vm).get("earnings") or {}).get("epoch") is not None and health(vm),
                         timeout=60, every=2, what="earnings in the node's /health")["earnings"]
        record("5_settlement", health_earnings=shown)
        assert shown["state"] == "verified" and shown["epoch"] == earned["epoch"], shown
        assert shown["reward"] == earned["reward"] and shown["verified_bytes"] == earned["verified_bytes"], shown
    # the buyer is told and its client ends; the chain (as the hub holds it) ends in the final receipt
    proc.wait(90)
    wait_for(lambda: not ledger(vm, "SELECT count(*) FROM uploads WHERE session = ?", sid)[0][0],
             timeout=60, what="the node's receipt uploads")
    chain = b.hub_chain(sid)
    final = chain[-1] if chain else {}
    ver = verify_chain(b, chain, "s1")
    saved = b.tmp / "s1.receipts.json"
    record("6_upgrade", version=version, upgrade_s=round(upgrade_s, 1), drain_s=round(drain_s, 1),
           final_receipt=final.get("final"), final_seq=final.get("seq"), receipts_verify_rc=ver.returncode,
           client_rc=proc.returncode, client_saved_receipts=saved.exists(),
           bytes_node={"rx": row["rx"], "tx": row["tx"]},
           bytes_hub={"up": final.get("up"), "down": final.get("down")},
           bytes_buyer={"up": reports.last.get("up"), "down": reports.last.get("down")})
    assert final.get("final") == "admin", final
    assert (final["up"], final["down"]) == (row["rx"], row["tx"]), (final, row)
    assert ver.returncode == 0, ver.stdout + ver.stderr
    # the buyer reconnects and moves bytes again
    t1 = time.monotonic()
    proc2, reports2, sid2 = connect(b, "s2")
    assert sid2 != sid
    assert b.reach([(WEB, PROBE_PORT)])[f"{WEB}:{PROBE_PORT}"]
    b.state["client2"] = (proc2, reports2, sid2)
    record("6_upgrade", reconnect_s=round(time.monotonic() - t1, 1))


# --- 7. power cut during a transfer ---------------------------------------------------------------
def test_7_power_cut_during_a_transfer(node):
    b, vm = node, node.vm
    if "client2" not in b.state:
        pytest.skip("step 6 failed: no reconnected buyer")
    proc, reports, sid = b.state["client2"]
    transfer = b.buyer.popen("iperf3", "-c", WEB, "-R", "-t", "30", stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    time.sleep(8)
    before = session_row(vm, sid)
    hub_before = b.hub_chain(sid)
    (b.tmp / "serial.times.log").open("a").write("---- power cut ----\n")
    t0 = time.monotonic()
    vm.power_cut()  # QEMU killed and started again: see Vm.power_cut for why not system_reset
    boot_s = vm.wait_ssh(900)
    after = session_row(vm, sid)
    integrity = ledger(vm, "PRAGMA integrity_check")[0][0]
    wait_for(lambda: agent_up(vm), timeout=180, every=2, what="the agent after the reset")
    # the transfer's 30 s are over by now; its client waits for a report over a connection the
    # power cut killed (it would wait minutes): stop it
    if transfer.poll() is None:
        transfer.kill()
    transfer.wait(10)
    # a co-signature made after the reboot: the buyer's counters then hold every byte of the transfer
    # (the last one before the cut may trail the node's ledger by up to one --interval of traffic)
    seen = len(reports.items)
    wait_for(lambda: len(reports.items) > seen or proc.poll() is not None, timeout=60,
             what="the buyer's first co-signature after the reboot")
    resumed = len(reports.items)
    proc.send_signal(signal.SIGINT)
    proc.wait(120)
    final = session_row(vm, sid)
    wait_for(lambda: not ledger(vm, "SELECT count(*) FROM uploads")[0][0], timeout=90,
             what="the node's receipt uploads")
    chain = b.hub_chain(sid)
    ver = verify_chain(b, chain, "s2")
    node_total = ledger(vm, "SELECT sum(rx), sum(tx) FROM sessions")[0]
    hub_total = [0, 0]
    for (s,) in b.hub_sql("SELECT DISTINCT session FROM receipts"):
        last = b.hub_chain(s)[-1]
        hub_total[0] += last["up"]
        hub_total[1] += last["down"]
    daily = ledger(vm, "SELECT sum(rx), sum(tx) FROM daily")[0]
    seqs = [r["seq"] for r in chain]
    record("7_power_cut", reboot_to_ssh_s=round(boot_s, 1), reset_to_ssh_s=round(time.monotonic() - t0, 1),
           ledger_before={"rx": before["rx"], "tx": before["tx"]},
           ledger_after_boot={"rx": after["rx"], "tx": after["tx"], "state": after["state"]},
           ledger_final={"rx": final["rx"], "tx": final["tx"], "reason": final["reason"]},
           hub_last_before_reset=({"seq": hub_before[-1]["seq"], "up": hub_before[-1]["up"],
                                   "down": hub_before[-1]["down"]} if hub_before else None),
           hub_final={"seq": chain[-1]["seq"], "up": chain[-1]["up"], "down": chain[-1]["down"]} if chain else None,
           buyer_last={"up": reports.last.get("up"), "down": reports.last.get("down")},
           integrity=integrity, receipts=len(chain), transfer_rc=transfer.returncode, receipts_verify_rc=ver.returncode,
           node_total=node_total, hub_total=hub_total, daily_total=daily, reports_total=resumed)
    assert integrity == "ok"
    assert after["rx"] <= final["rx"] and after["tx"] <= final["tx"], (after, final)
    # nothing the hub had a receipt for was lost with the power
    if hub_before:
        assert after["rx"] >= hub_before[-1]["up"] and after["tx"] >= hub_before[-1]["down"], (after, hub_before[-1])
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # the chain continues, no gap, no repeat
    assert ver.returncode == 0, ver.stdout + ver.stderr
    assert (chain[-1]["up"], chain[-1]["down"]) == (final["rx"], final["tx"])
    assert list(node_total) == hub_total, (node_total, hub_total)
    # nothing counted twice: the node never counts more than the buyer's own WireGuard counters saw,
    # as its last co-signature (made after the reboot, with no traffic since) reported them
    buyer_total = reports.last["up"] + reports.last["down"]
    assert final["rx"] + final["tx"] <= buyer_total * 1.05 + 2_000_000, (final, reports.last)
