"""Stage 3, assemble: a partitioned disk image from directories, with no mounts and no loops.

The filesystems are written straight into the image file at their partition offsets
(`mkfs.vfat --offset` + mtools for the boot partition, `mkfs.ext4 -E offset= -d` for the root),
then the partition table. Every identifier and timestamp comes from the inputs, so the same
bake assembled twice gives the same bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from ..config import Target
from ..errors import StageError, UserError
from .ids import DiskIds
from .runner import Runner, require_tools

MiB = 1 << 20
SECTOR = 512


def _align(n: int, to: int = 64 * MiB) -> int:
    return (n + to - 1) // to * to


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", "-x", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[0])


def epoch() -> int:
    """SOURCE_DATE_EPOCH when set (reproducible builds), else a fixed point derived per bake."""
    return int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)


def _pin_ctimes(image: Path, offset: int, root: Path, when: int, env: dict, run: Runner) -> None:
    """Every inode's change time := `when`.

    `mkfs.ext4 -d` copies each file's ctime, which is when the bake (or tar) last touched it on
    this machine, and no system call sets a ctime; so debugfs sets them in the new filesystem,
    by path (one command per path, a second or two for a whole root). E2FSPROGS_FAKE_TIME in
    `env` keeps the superblock's write time at `when` too.
    """
    lines = [f"sif / ctime @{when}"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted((*dirnames, *filenames)):
            rel = "/" + os.path.relpath(os.path.join(dirpath, name), root)
            if "\n" in rel:
                raise UserError(f"{root}{rel!r}: a path with a newline cannot go into the image")
            lines.append('sif "' + rel.replace('"', '""') + f'" ctime @{when}')
    script = image.with_name(image.name + ".debugfs")
    script.write_text("\n".join(lines) + "\n")
    run.note(f"debugfs: ctime of {len(lines)} paths set to {when}")
    try:
        out = subprocess.run(["debugfs", "-w", "-f", str(script), f"{image}?offset={offset}"],
                             env={**os.environ, **env}, capture_output=True, text=True)
    finally:
        script.unlink(missing_ok=True)
    # debugfs echoes each command ("debugfs: sif ...") and prints a line of its own on a failure
    failures = [ln for ln in out.stdout.splitlines() + out.stderr.splitlines()
                if ln.strip() and not ln.startswith("debugfs")]
    if out.returncode != 0 or failures:
        raise StageError("assemble", f"debugfs could not set change times: {failures[:1] or out.returncode}",
                         run.log_path, (failures or [""])[0][:200])


def assemble(target: Target, bake_dir: Path, image: Path, run: Runner) -> dict:
    require_tools("sfdisk", "mkfs.vfat", "mcopy", "mkfs.ext4", "debugfs", "faketime")
    meta = json.loads((bake_dir / "bake.json").read_text())
    ids = DiskIds(**meta["ids"])
    root, boot = bake_dir / "rootfs", bake_dir / "bootfs"
    when = meta.get("epoch") or epoch() or int((bake_dir / "bake.json").stat().st_mtime)
    env = {"SOURCE_DATE_EPOCH": str(when), "E2FSPROGS_FAKE_TIME": str(when),
           "MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}

    boot_off, boot_size = 1 * MiB, target.boot.size
    assert boot_size is not None
    root_off = boot_off + boot_size
    root_size = target.root.size or _align(int(du_bytes(root) * 1.2) + 256 * MiB)
    total = root_off + root_size + (1 * MiB if target.table == "gpt" else 0)
    free = os.statvfs(image.parent)
    if free.f_bavail * free.f_frsize < total:
        raise UserError(f"{image.parent}: not enough free space for a {total // MiB} MiB image "
                        f"({free.f_bavail * free.f_frsize // MiB} MiB free)")

    image.unlink(missing_ok=True)
    with image.open("wb") as f:
        f.truncate(total)

    # Boot partition: FAT32 at its offset, files copied in sorted order with their mtimes.
    # mkfs.fat and mtools stamp directory entries with the clock: freeze it (libfaketime).
    frozen = ["faketime", "-f", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))]
    run.run([*frozen, "mkfs.vfat", "-F", "32", "-s", "2",  # ≥65525 clusters: a real FAT32
             "-n", target.boot.label, "-i", ids.boot_fs_serial,
             "--offset", str(boot_off // SECTOR), "-h", str(boot_off // SECTOR),
             image, str(boot_size // 1024)], env=env)
    items = sorted(boot.iterdir())
    if items:
        run.run([*frozen, "mcopy", "-s", "-p", "-m", "-Q", "-i", f"{image}@@{boot_off}", *items, "::/"],
                env=env)

    # Root partition: ext4 filled from the directory, ids and hash seed fixed.
    run.run(["mkfs.ext4", "-q", "-F", "-L", target.root.label, "-U", ids.root_fs_uuid, "-m", "1",
             "-E", f"offset={root_off},hash_seed={ids.root_hash_seed},root_owner=0:0",
             "-d", root, image, f"{root_size // 1024}k"], env=env)

    _pin_ctimes(image, root_off, root, when, env, run)

    # Partition table last, so an interrupted assemble never looks like a bootable disk.
    if target.table == "gpt":
        script = ["label: gpt", f"label-id: {ids.disk_id}",
                  f"start={boot_off // SECTOR}, size={boot_size // SECTOR}, "
                  f"type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid={ids.boot_partuuid}, name={target.boot.name}",
                  f"start={root_off // SECTOR}, size={root_size // SECTOR}, "
                  f"type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid={ids.root_partuuid}, name={target.root.name}"]
    else:
        script = ["label: dos", f"label-id: 0x{ids.disk_id}",
                  f"start={boot_off // SECTOR}, size={boot_size // SECTOR}, type=c, bootable",
                  f"start={root_off // SECTOR}, size={root_size // SECTOR}, type=83"]
    run.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe", "never",
             "--wipe-partitions", "never", "-q", image],
            stdin=("\n".join(script) + "\n").encode(), env=env)
    return {"image_size": total, "boot_size": boot_size, "root_size": root_size,
            "boot_offset": boot_off, "root_offset": root_off, "epoch": when}
