"""Small synthetic idlewire-like images (table + FAT boot + ext4 root) for stamp/flash tests.

Built in about a second from a sparse file, like `idlewire build` assembles (no mounts):
sfdisk, mkfs.vfat --offset + mtools, mkfs.ext4 -E offset -d. Artifacts next to it: .bmap
(ours, unless bmaptool=True), .sha256. Loop devices are attached with `losetup` and always detached.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from idlewire import bmap

MiB = 1 << 20


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)


def make_image(path: Path, *, size: int = 128 * MiB, table: str = "gpt", boot_size: int = 64 * MiB,
               data_mib: int = 16, seed: int = 1) -> Path:
    """An image with a FAT boot partition (a few files) and ext4 root holding `data_mib` of data."""
    work = path.parent / f".{path.name}.d"
    (work / "root/data").mkdir(parents=True, exist_ok=True)
    (work / "boot").mkdir(exist_ok=True)
    rnd = hashlib.sha256(str(seed).encode()).digest()
    block = (rnd * (MiB // len(rnd)))
    for i in range(data_mib):
        # distinct content per MiB (so a misplaced block is noticed), cheap to make
        piece = hashlib.sha256(block + bytes([i % 256, i // 256])).digest()
        (work / "root/data" / f"f{i}").write_bytes(piece * (MiB // 32))
    (work / "root/etc").mkdir(exist_ok=True)
    (work / "root/etc/hostname").write_text("golden\n")
    (work / "boot/config.txt").write_text("# boot config\n")
    (work / "boot/kernel.img").write_bytes(os.urandom(256 * 1024))
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    boot_off = MiB
    root_off = boot_off + boot_size
    root_size = size - root_off - MiB
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    run("mkfs.vfat", "-F", "32", "-s", "1", "-n", "IW-BOOT", "--offset", boot_off // 512, "-h",
        boot_off // 512, path, boot_size // 1024)
    run("mcopy", "-s", "-p", "-m", "-Q", "-i", f"{path}@@{boot_off}", *sorted((work / "boot").iterdir()), "::/",
        env=env)
    run("mkfs.ext4", "-q", "-F", "-L", "root", "-E", f"offset={root_off},root_owner=0:0", "-d", work / "root",
        path, f"{root_size // 1024}k")
    if table == "gpt":
        script = (f"label: gpt\nstart={boot_off // 512}, size={boot_size // 512}, "
                  "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"
                  f"start={root_off // 512}, size={root_size // 512}, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709\n")
    else:
        script = (f"label: dos\nstart={boot_off // 512}, size={boot_size // 512}, type=c, bootable\n"
                  f"start={root_off // 512}, size={root_size // 512}, type=83\n")
    run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", path, input=script.encode())
    run("rm", "-rf", work)
    stem = path.name.removesuffix(".img")
    (path.parent / f"{stem}.bmap").write_text(bmap.to_xml(bmap.create(path)))
    write_sha256(path)
    return path


def write_sha256(*files: Path) -> Path:
    first = files[0]
    stem = first.name.split(".img")[0]
    out = first.parent / f"{stem}.sha256"
    lines = []
    for f in files:
        h = hashlib.sha256()
        with f.open("rb") as fh:
            while chunk := fh.read(8 * MiB):
                h.update(chunk)
        lines.append(f"{h.hexdigest()}  {f.name}\n")
    out.write_text("".join(lines))
    return out


@contextlib.contextmanager
def loop_device(backing: Path):
    """`losetup` a file; detached however the test ends."""
    dev = run("losetup", "-f", "--show", backing, text=True).stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def can_loop() -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup)"
    try:
        subprocess.run(["losetup", "-f"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "no free loop device"
    return None


def idlewire(*args, check=True) -> subprocess.CompletedProcess:
    """Run the idlewire CLI from this checkout; with check, a non-zero exit fails the test."""
    res = subprocess.run([sys.executable, "-m", "idlewire", *map(str, args)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    if check:
        assert res.returncode == 0, res.stderr
    return res
