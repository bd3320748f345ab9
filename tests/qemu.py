"""Boot idlewire images under QEMU (TCG: this machine's /dev/kvm cannot run ordinary guests).

x86_64 images boot through OVMF exactly as a mini-PC would (GPT, ESP, systemd-boot). arm64
images are booted with `qemu-system-aarch64 -M virt` using the kernel and initrd the image
carries on its boot partition (the Pi firmware cannot be emulated), and the image's own root
filesystem. The serial console goes to a log file; SSH is forwarded to a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

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

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    def command(self) -> list[str]:
        net = ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
               "-device", "virtio-net-pci,netdev=n0"]
        common = ["-m", str(self.memory), "-smp", "2", "-nographic", "-monitor", "none",
                  "-serial", f"file:{self.serial_log}", "-no-reboot", *net]
        if self.arch == "amd64":
            vars_fd = self.workdir / "OVMF_VARS.fd"
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
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(self.workdir / "qemu.err").open("w"),
                                     stdin=subprocess.DEVNULL)
        return self

    def ssh_argv(self, user: str = "idlewire") -> list[str]:
        return ["ssh", "-i", str(self.key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", f"{user}@127.0.0.1"]

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
            try:
                if self.ssh("true", check=False, timeout=30).returncode == 0:
                    return time.monotonic() - t0
            except subprocess.TimeoutExpired:
                pass
            time.sleep(3)
        raise TimeoutError(f"no SSH login within {timeout:.0f}s; serial log {self.serial_log}:\n" + self.tail())

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.serial_log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no serial output)"

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
