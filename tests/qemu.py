"""Boot idlewire images under QEMU (TCG: this machine's /dev/kvm cannot run ordinary guests).

x86_64 images boot through OVMF exactly as a mini-PC would (GPT, ESP, systemd-boot). arm64
images are booted with `qemu-system-aarch64 -M virt` using the kernel and initrd the image
carries on its boot partition (the Pi firmware cannot be emulated), and the image's own root
filesystem. The serial console goes to a log file; SSH is forwarded to a free loopback port.

Options for tests that need more of the machine (tests/image, tests/e2e): the first serial port
on a TCP socket QEMU serves and waits on (console=True: `idlewire console socket://…` drives
the boot), a monitor socket (monitor=True: `system_reset` is a power cut; reboot=True so the
reset reboots rather than ends QEMU), the WAN NIC on a tap device instead of user networking
(nics=…, QEMU started inside a network namespace with netns=…), and SSH to an address inside a
namespace (ssh_host/ssh_netns).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# The first line of a guest kernel's report that it hit a bug or died (x86 and arm64 wordings).
KERNEL_TROUBLE = re.compile(r"\[\s*\d+\.\d+\] .*(Oops:|BUG:|kernel BUG at|PANIC:|WARNING: CPU:|Kernel panic"
                            r"|Internal error:|Unable to handle kernel|general protection fault|stack guard page)")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def boot_file(image: Path, offset: int, name: str, dest: Path) -> Path:
    """Copy one file out of the image's FAT boot partition (mtools, no mount)."""
    subprocess.run(["mcopy", "-n", "-i", f"{image}@@{offset}", f"::/{name}", str(dest)],
                   check=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    return dest


@dataclass
class Vm:
    image: Path
    arch: str  # amd64 | arm64
    workdir: Path
    key: Path
    boot_offset: int = 1 << 20
    memory: int = 1024
    ssh_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    console: bool = False  # serial port on a TCP socket QEMU waits on (console_url) instead of a file
    monitor: bool = False  # the human monitor on a unix socket (monitor_command)
    reboot: bool = False  # a reset (guest or monitor) reboots; by default QEMU exits (-no-reboot)
    nics: list[str] | None = None  # QEMU -netdev/-device arguments replacing the user-mode NIC
    netns: str | None = None  # start QEMU inside this network namespace (its tap devices live there)
    ssh_host: str = "127.0.0.1"
    ssh_netns: str | None = None  # run ssh inside this namespace (ssh_host is an address there)

    def __post_init__(self):
        self.console_port = free_port() if self.console else None

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    @property
    def console_url(self) -> str:
        return f"socket://127.0.0.1:{self.console_port}"

    @property
    def monitor_socket(self) -> Path:
        return self.workdir / "monitor.sock"

    def command(self) -> list[str]:
        net = self.nics if self.nics is not None else [
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22", "-device", "virtio-net-pci,netdev=n0"]
        if self.console:
            serial = ["-chardev", f"socket,id=s0,host=127.0.0.1,port={self.console_port},server=on,wait=on,"
                      f"logfile={self.serial_log},logappend=on",
                      "-serial", "chardev:s0"]
        else:
            serial = ["-serial", f"file:{self.serial_log}"]
        monitor = f"unix:{self.monitor_socket},server=on,wait=off" if self.monitor else "none"
        common = ["-m", str(self.memory), "-smp", "2", "-nographic", "-monitor", monitor, *serial,
                  *([] if self.reboot else ["-no-reboot"]), *net]
        if self.arch == "amd64":
            vars_fd = self.workdir / "OVMF_VARS.fd"
            if not vars_fd.exists():  # a machine started again (power_cut) keeps its firmware variables
                shutil.copy(OVMF_VARS, vars_fd)
            return ["qemu-system-x86_64", "-machine", "q35", *common,
                    "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,file={vars_fd}",
                    "-drive", f"if=virtio,format=raw,file={self.image}"]
        # The Pi firmware's config.txt names the kernel and initrd it loads: boot those.
        config = boot_file(self.image, self.boot_offset, "config.txt", self.workdir / "config.txt")
        names = dict(line.replace("=", " ", 1).split(None, 1) for line in config.read_text().splitlines()
                     if line.strip() and not line.startswith("#") and " " in line.replace("=", " ", 1))
        kernel = boot_file(self.image, self.boot_offset, names["kernel"].strip(), self.workdir / "vmlinuz")
        initrd = boot_file(self.image, self.boot_offset, names["initramfs"].split()[0], self.workdir / "initrd.img")
        cmdline = boot_file(self.image, self.boot_offset, "cmdline.txt", self.workdir / "cmdline.txt")
        args = [a for a in cmdline.read_text().split() if not a.startswith("console=")]
        return ["qemu-system-aarch64", "-machine", "virt", "-cpu", "cortex-a72", *common,
                "-kernel", str(kernel), "-initrd", str(initrd),
                "-append", " ".join([*args, "console=ttyAMA0"]),
                "-drive", f"if=none,format=raw,file={self.image},id=d0",
                "-device", "virtio-blk-pci,drive=d0"]

    def start(self) -> Vm:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        (self.workdir / "qemu.cmd").write_text(" ".join(cmd) + "\n")
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(self.workdir / "qemu.err").open("w"),
                                     stdin=subprocess.DEVNULL)
        return self

    def ssh_argv(self, user: str = "idlewire") -> list[str]:
        netns = ["ip", "netns", "exec", self.ssh_netns] if self.ssh_netns else []
        port = str(self.ssh_port if self.nics is None else 22)
        return [*netns, "ssh", "-i", str(self.key), "-p", port, "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", f"{user}@{self.ssh_host}"]

    def monitor_command(self, command: str, timeout: float = 10) -> str:
        """One human-monitor command (e.g. `system_reset`: a power cut); returns what it printed."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.monitor_socket))
            out = b""
            while not out.rstrip().endswith(b"(qemu)"):
                out += s.recv(4096)
            s.sendall(command.encode() + b"\n")
            time.sleep(0.5)
            s.settimeout(1)
            try:
                out = s.recv(65536)
            except TimeoutError:
                out = b""
        return out.decode(errors="replace")

    def ssh(self, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.ssh_argv(), command], capture_output=True, text=True,
                              check=check, timeout=timeout)

    def wait_ssh(self, timeout: float) -> float:
        """Wait until SSH logs in with the key; returns seconds since start."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited {self.proc.returncode}; serial log {self.serial_log}:\n"
                                   + self.tail())
            if self.panicked():  # it hangs (no panic= on the cmdline): no need to wait out the timeout
                raise RuntimeError(f"the guest kernel panicked; serial log {self.serial_log}:\n"
                                   + self.kernel_trouble())
            try:
                if self.ssh("true", check=False, timeout=30).returncode == 0:
                    return time.monotonic() - t0
            except subprocess.TimeoutExpired:
                pass
            time.sleep(3)
        raise TimeoutError(f"no SSH login within {timeout:.0f}s; serial log {self.serial_log}:\n" + self.tail())

    def kernel_trouble(self, n: int = 60) -> str:
        """The guest kernel's own report of its death or a bug (oops, BUG, double fault, panic,
        WARNING) from the serial console, up to n lines from where it starts; '' when there is none.
        A panic prints there even with `quiet` (the kernel turns the console verbose first)."""
        try:
            lines = self.serial_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        for i, line in enumerate(lines):
            if KERNEL_TROUBLE.search(line):
                return "\n".join(lines[i:i + n])
        return ""

    def panicked(self) -> bool:
        try:
            return "Kernel panic - not syncing" in self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return False

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.serial_log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no serial output)"

    def power_cut(self) -> None:
        """Pull the plug and plug it back in: QEMU is killed (the guest's RAM, caches and in-flight
        writes are gone; what reached the disk image stays, as on a real disk) and started again on
        the same disk and firmware variables. A cold start rather than `system_reset`: under TCG
        the firmware crawled for minutes after a warm reset (OVMF's SEC moving memory at a few
        hundred bytes a second), a cold start reaches the boot loader in ~20 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Vm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def copy_image(src: Path, dest: Path, grow_to: int | None = None) -> Path:
    """A private, sparse copy of an image, optionally enlarged (as a bigger card would be)."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dest)], check=True)
    if grow_to:
        os.truncate(dest, grow_to)
    return dest


_golden: dict[str, Path] = {}


def golden_image(out: Path) -> Path:
    """The x86_64 image with no login key, as `make image TARGET=x86_64` builds it (its stages are
    cached, so this is seconds once any test built it): IDLEWIRE_TEST_GOLDEN when set, else built
    into `out` once per test session."""
    if given := os.environ.get("IDLEWIRE_TEST_GOLDEN"):
        return Path(given)
    if "x86_64" not in _golden:
        root = Path(__file__).resolve().parents[1]
        res = subprocess.run([sys.executable, "-m", "idlewire", "build", "--target", "x86_64", "--allow-no-login",
                              "--out", str(out), "--no-xz", "--json"], capture_output=True, text=True, cwd=root)
        assert res.returncode == 0, f"golden build failed:\n{res.stderr[-3000:]}"
        _golden["x86_64"] = Path(json.loads(res.stdout)["image"])
    return _golden["x86_64"]


def why_no_qemu() -> str | None:
    if os.geteuid() != 0:
        return "building images needs root"
    for tool in ("mmdebstrap", "qemu-system-x86_64"):
        if not shutil.which(tool):
            return f"{tool} is missing (make deps-test installs it)"
    return None
