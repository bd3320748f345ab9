"""A fleet of booted Debian hosts for Ansible: systemd-nspawn containers on a lab bridge.

Every host is `systemd-nspawn --boot --register=no --keep-unit` on an overlay of one Debian trixie
rootfs (the x86_64 target's, from the image pipeline's cache), in its own network namespace with
`eth0` on a bridge in the controller namespace. Ansible and ssh run inside the controller
namespace (`Fleet.run`), so all traffic stays in the lab.

Each host looks like a freshly installed node: sshd with its own new host keys, an `idlewire`
account with the test key and passwordless sudo, nothing of ours installed.

    with Lab() as lab, Fleet(lab, n=5, workdir=tmp) as fleet:
        fleet.run("ansible-playbook", "-i", fleet.inventory, "playbooks/site.yml")

Run as a script to keep a fleet up by hand: `python tests/fleet.py 5` (Ctrl-C or SIGTERM tears it
down).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from netlab import Lab, Netns, sh

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "idlewire"
WG_GO = shutil.which("wireguard-go")
# The buyers' caps the fleet's inventory sets (Mbit/s; not the role defaults, so a check that
# reads the defaults instead of the inventory fails).
CAP_UP_MBIT, CAP_DOWN_MBIT = 8, 40


def cache_dir() -> Path:
    if env := os.environ.get("IDLEWIRE_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "idlewire"


def why_no_fleet() -> str | None:
    if os.geteuid() != 0:
        return "the fleet needs root (namespaces, overlay mounts, systemd-nspawn)"
    for tool in ("systemd-nspawn", "ip", "ssh", "ssh-keygen", "mmdebstrap"):
        if not shutil.which(tool):
            return f"{tool} is missing (make deps-test installs it)"
    return None


def rootfs_tar(cache: Path | None = None) -> Path:
    """The x86_64 target's Debian rootfs tarball, built (and cached) by the image pipeline if needed."""
    cache = cache or cache_dir()
    found = sorted((cache / "rootfs").glob("x86_64-*.tar"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1]
    out = cache / "fleet-build-out"
    subprocess.run([sys.executable, "-m", "idlewire", "build", "--target", "x86_64",
                    "--allow-no-login", "--no-xz", "--out", str(out)], check=True, cwd=ROOT,
                   env={**os.environ, "IDLEWIRE_CACHE": str(cache)}, capture_output=True)
    shutil.rmtree(out, ignore_errors=True)
    return rootfs_tar(cache)


def template(tar: Path, cache: Path | None = None) -> Path:
    """The unpacked rootfs with the admin account (key-less), shared read-only by every host."""
    base = (cache or cache_dir()) / "fleet"
    base.mkdir(parents=True, exist_ok=True)
    dest = base / tar.stem
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / ".fleet-ready").exists():
            return dest
        tmp = base / f"{tar.stem}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        sh("tar", "-xpf", str(tar), "-C", str(tmp), "--numeric-owner")
        sh("chroot", str(tmp), "useradd", "-m", "-s", "/bin/bash", "-G", "sudo", ADMIN)
        sudoers = tmp / "etc/sudoers.d/fleet-admin"
        sudoers.write_text(f"{ADMIN} ALL=(ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
        # Host keys are made per host; an empty machine-id gives each boot its own.
        for key in (tmp / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        (tmp / "etc/machine-id").write_text("")
        (tmp / ".fleet-ready").write_text(tar.name + "\n")
        tmp.rename(dest)
        return dest


def _cgroup_mounts() -> list[Path]:
    """Where this process's cgroup is, per hierarchy nspawn uses: the unified (cgroup2) one and, on
    a hybrid host, systemd's named v1 one."""
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        fstype, _src, opts = [*post.split(), "", ""][:3]
        if fstype == "cgroup2":
            mounts.setdefault("", Path(pre.split()[4]))
        elif fstype == "cgroup" and "name=systemd" in opts.split(","):
            mounts.setdefault("name=systemd", Path(pre.split()[4]))
    out = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctl, path = line.split(":", 2)
        if ctl in mounts:
            out.append(mounts[ctl] / path.lstrip("/"))
    return out


def own_cgroups(name: str) -> list[Path]:
    """A new cgroup NAME below this process's own, in each hierarchy (see Fleet.start)."""
    made = []
    for base in _cgroup_mounts():
        cg = base / name
        cg.mkdir(exist_ok=True)
        made.append(cg)
    return made


def release_cgroups(cgroups: list[Path]) -> None:
    """Remove a host's cgroups once it is stopped: whatever still runs in them (only that host's
    processes can) is killed first."""
    for cg in cgroups:
        if not cg.exists():
            continue
        for _ in range(50):
            dirs = sorted((d for d in cg.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts))
            for d in [*dirs, cg]:
                with contextlib.suppress(OSError):
                    d.rmdir()
            if not cg.exists():
                break
            kill = cg / "cgroup.kill"
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
            else:
                for procs in cg.rglob("cgroup.procs"):
                    for pid in procs.read_text().split():
                        with contextlib.suppress(ProcessLookupError, ValueError):
                            os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.1)


@dataclass
class Host:
    name: str
    addr: str
    ns: Netns
    dir: Path
    proc: subprocess.Popen | None = None
    cgroups: list[Path] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.dir / "merged"


class Fleet:
    def __init__(self, lab: Lab, n: int, workdir: Path, subnet: int | None = None,
                 groups: dict[str, list[int]] | None = None) -> None:
        self.lab, self.n, self.workdir = lab, n, Path(workdir)
        # 10.(200..249).x.0/24: one /24 per lab, from the lab's random prefix.
        self.net = f"10.{200 + (subnet if subnet is not None else int(lab.prefix[2:], 16) % 50)}." \
                   f"{int(lab.prefix[2:], 16) % 250}"
        self.hosts: list[Host] = []
        self.ctl: Netns | None = None
        self.key = self.workdir / "id_ed25519"
        self.inventory = self.workdir / "inventory.yml"
        self.known_hosts = self.workdir / "known_hosts"
        self.groups = groups

    # -- life cycle ---------------------------------------------------------------------------
    def __enter__(self) -> Fleet:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, boot_timeout: float = 120) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lower = template(rootfs_tar())
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "idlewire-fleet-test",
           "-f", str(self.key))
        pub = self.key.with_suffix(".pub").read_text()
        self.ctl = self.lab.ns("ctl")
        self.ctl.run("ip", "link", "add", "br0", "type", "bridge")
        self.ctl.run("ip", "addr", "add", f"{self.net}.1/24", "dev", "br0")
        self.ctl.run("ip", "link", "set", "br0", "up")
        uid = gid = None
        for line in (lower / "etc/passwd").read_text().splitlines():
            f = line.split(":")
            if f[0] == ADMIN:
                uid, gid = int(f[2]), int(f[3])
        known = []
        for i in range(1, self.n + 1):
            name = f"node{i:02d}"
            ns = self.lab.ns(name)
            veth, _ = self.lab.link(self.ctl, None, ns, f"{self.net}.{10 + i}/24",
                                    names=(f"p{i}", "eth0"))
            self.ctl.run("ip", "link", "set", veth, "master", "br0")
            ns.run("ip", "route", "add", "default", "via", f"{self.net}.1")
            h = Host(name, f"{self.net}.{10 + i}", ns, self.workdir / name)
            for d in ("upper", "work", "merged"):
                (h.dir / d).mkdir(parents=True, exist_ok=True)
            up = h.dir / "upper"
            (up / "etc/ssh").mkdir(parents=True)
            sh("ssh-keygen", "-A", "-f", str(up))
            (up / "etc/hostname").write_text(name + "\n")
            ssh_dir = up / "home" / ADMIN / ".ssh"
            ssh_dir.mkdir(parents=True)
            (ssh_dir / "authorized_keys").write_text(pub)
            for p, mode in ((ssh_dir.parent, 0o755), (ssh_dir, 0o700),
                            (ssh_dir / "authorized_keys", 0o600)):
                os.chown(p, uid, gid)
                p.chmod(mode)
            hk = (up / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
            known.append(f"{h.addr} {hk[0]} {hk[1]}")
            sh("mount", "-t", "overlay", f"iwfleet-{name}", "-o",
               f"lowerdir={lower},upperdir={up},workdir={h.dir / 'work'}", str(h.root))
            self.hosts.append(h)
        self.known_hosts.write_text("\n".join(known) + "\n")
        self.write_inventory()
        for h in self.hosts:
            self.start(h)
        self.wait_ssh(boot_timeout)

    def start(self, h: Host) -> None:
        # The host's systemd (trixie) only runs on a unified cgroup hierarchy.
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        # Its own cgroup first: `--keep-unit` puts the container below nspawn's cgroup (as
        # .../payload); started from one shared cgroup, every host of every fleet on the machine
        # would share .../payload/system.slice/X.service, and stopping X on one host waits 90 s
        # for the other hosts' processes, which it can neither see nor kill.
        h.cgroups = own_cgroups(f"{self.lab.prefix}-{h.name}")
        env["IWFLEET_CGROUPS"] = " ".join(str(c) for c in h.cgroups)
        with open(h.dir / "console.log", "ab") as log:
            h.proc = subprocess.Popen(
                ["sh", "-c", 'for c in $IWFLEET_CGROUPS; do echo $$ > "$c/cgroup.procs" || exit 1; done; '
                 'exec "$@"', "sh",
                 "systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--quiet",
                 "--console=passive", "--private-network",  # with the lab namespace below
                 # This machine's kernel has no WireGuard: lend the hosts wireguard-go and a tun.
                 *([f"--bind-ro={WG_GO}:/usr/local/bin/wireguard-go", "--bind=/dev/net/tun"]
                   if WG_GO else []),
                 "-D", str(h.root), "-M", f"{self.lab.prefix}-{h.name}",
                 f"--network-namespace-path=/run/netns/{h.ns.name}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)

    def stop(self, h: Host, timeout: float = 10) -> None:
        if h.proc and h.proc.poll() is None:
            h.proc.send_signal(signal.SIGTERM)  # nspawn asks the host's systemd to power off
            try:
                h.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                h.proc.wait()
        release_cgroups(h.cgroups)
        h.cgroups = []

    def down(self) -> None:
        with ThreadPoolExecutor(max(1, len(self.hosts))) as pool:
            list(pool.map(self.stop, self.hosts))
        for h in self.hosts:
            for _ in range(20):
                if sh("umount", str(h.root), check=False).returncode == 0 or not os.path.ismount(h.root):
                    break
                time.sleep(0.2)
            else:
                sh("umount", "-l", str(h.root), check=False)
            shutil.rmtree(h.dir, ignore_errors=True)
        self.hosts.clear()

    # -- access ---------------------------------------------------------------------------
    def ssh_args(self) -> list[str]:
        return ["-i", str(self.key), "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5"]

    def ssh(self, h: Host, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("ssh", *self.ssh_args(), f"{ADMIN}@{h.addr}", command, check=check)

    def run(self, *argv: str, check: bool = True, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
        """Run a command in the controller namespace (where the fleet is reachable)."""
        env = {**os.environ, "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.workdir / "cp"),
               "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), **(env or {})}
        return subprocess.run(["ip", "netns", "exec", self.ctl.name, *argv], check=check,
                               capture_output=True, text=True, env=env, cwd=kw.pop("cwd", ROOT), **kw)

    def wait_ssh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.hosts)
        while pending:
            for h in list(pending):
                if h.proc.poll() is not None:
                    raise RuntimeError(f"{h.name}: systemd-nspawn exited {h.proc.returncode}: "
                                       f"{(h.dir / 'console.log').read_text()[-2000:]}")
                if self.ssh(h, "true", check=False).returncode == 0:
                    pending.remove(h)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"no SSH on {', '.join(h.name for h in pending)} after {timeout:.0f}s")
            if pending:
                time.sleep(1)

    def write_inventory(self) -> None:
        groups = self.groups or {"x86": list(range(1, self.n + 1))}
        lines = ["---", "# Generated by tests/fleet.py: the nspawn fleet", "all:", "  children:",
                 "    idlewire:", "      children:"]
        for group, idx in groups.items():
            lines += [f"        {group}:", "          hosts:"]
            for i in idx:
                h = self.hosts[i - 1]
                lines += [f"            {h.name}:", f"              ansible_host: {h.addr}"]
        pub = self.key.with_suffix(".pub").read_text().strip()
        lines += [
            "      vars:",
            f"        ansible_user: {ADMIN}",
            f"        ansible_ssh_private_key_file: {self.key}",
            f"        ansible_ssh_common_args: -o UserKnownHostsFile={self.known_hosts}"
            " -o StrictHostKeyChecking=yes",
            "        ansible_python_interpreter: /usr/bin/python3",
            "        base_ssh_authorized_keys:",
            f"          - {pub}",
            "        # The lab gives eth0 its address; networkd must not take the link over.",
            "        base_manage_network: false",
            "        base_hostname: \"{{ inventory_hostname }}\"",
            "        # A network namespace other than the host's may only pick congestion controls",
            "        # listed in the host's tcp_allowed_congestion_control: leave it to the host.",
            "        base_sysctl:",
            "          net.ipv4.ip_forward: 1",
            "          net.ipv6.conf.all.forwarding: 1",
            "          net.ipv4.conf.all.rp_filter: 2",
            "        # Shaping on, with caps other than the defaults: the verify suite checks the tc",
            "        # trees, the isolation table and the WireGuard port against these values.",
            "        agent_shaping_enabled: true",
            "        agent_wan_interface: eth0",
            "        firewall_wan_interface: eth0",
            f"        agent_cap_up_mbit: {CAP_UP_MBIT}",
            f"        agent_cap_down_mbit: {CAP_DOWN_MBIT}",
            "        # Node mode measures the owner by latency here (no UPnP router in this lab, the",
            "        # default public reflectors unreachable): the controller answers the pings.",
            f"        agent_idle_reflectors: [\"{self.net}.1\"]",
        ]
        self.inventory.write_text("\n".join(lines) + "\n")


def main() -> int:
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with Lab() as lab, Fleet(lab, n, Path(tempfile.mkdtemp(prefix="iwfleet-"))) as fleet:
        print(f"fleet up: inventory {fleet.inventory}; controller namespace {fleet.ctl.name}")
        print(f"  ip netns exec {fleet.ctl.name} ansible-playbook -i {fleet.inventory} playbooks/site.yml")
        # Ctrl-C, or SIGTERM when run in the background (where SIGINT is ignored).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
