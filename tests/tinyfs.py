"""A small tmpfs mount that a test fills up and frees: a full disk for real (needs root)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


class TinyFs:
    def __init__(self, path: Path):
        self.path = path

    def fill(self) -> None:
        """Write zeros until the file system refuses (ENOSPC)."""
        with open(self.path / "filler", "ab") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()

    def free(self) -> None:
        (self.path / "filler").unlink()


@contextlib.contextmanager
def tiny_fs(where: Path, size: str = "2m") -> Iterator[TinyFs]:
    mnt = where / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield TinyFs(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
