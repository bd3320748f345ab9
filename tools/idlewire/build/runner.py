"""Running external tools for a stage: output to the stage log (and the terminal with --verbose)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import StageError, UserError

# Debian package that ships each tool the build calls, for the "missing tool" message.
TOOL_PACKAGES = {
    "mmdebstrap": "mmdebstrap", "sfdisk": "fdisk", "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs",
    "mkfs.vfat": "dosfstools", "mcopy": "mtools", "mmd": "mtools", "xz": "xz-utils",
    "tar": "tar", "faketime": "faketime", "zstd": "zstd", "ssh-keygen": "openssh-client",
    "dpkg-deb": "dpkg",
    "unshare": "util-linux", "du": "coreutils", "dpkg-query": "dpkg", "mount": "mount", "umount": "mount",
}


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = sorted({TOOL_PACKAGES.get(t, t) for t in missing})
        raise UserError(
            f"missing tool{'s' if len(missing) > 1 else ''}: {', '.join(missing)}; "
            f"run `make deps` as root, or apt-get install {' '.join(pkgs)}"
        )


@dataclass
class Runner:
    """Runs commands for one build, appending everything to one log file."""

    log_path: Path
    verbose: bool = False
    console: object | None = None  # rich Console when verbose
    stage: str = ""
    _log: TextIO | None = None

    def open(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("a", buffering=1)

    def close(self) -> None:
        if self._log:
            self._log.close()
            self._log = None

    def note(self, line: str) -> None:
        if self._log:
            self._log.write(f"## [{self.stage}] {line}\n")
        if self.verbose and self.console is not None:
            self.console.print(f"[dim]{self.stage}: {line}[/dim]", highlight=False)

    def run(self, cmd: Sequence[str | os.PathLike[str]], *, env: dict[str, str] | None = None,
            cwd: Path | None = None, stdin: bytes | None = None) -> None:
        """Run cmd; on failure raise StageError naming the stage, the log and the last line."""
        argv = [str(c) for c in cmd]
        self.note("$ " + " ".join(argv))
        full_env = {**os.environ, **(env or {})}
        tail: deque[str] = deque(maxlen=1)
        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            )
        except FileNotFoundError:
            require_tools(argv[0])
            raise
        if stdin is not None:
            assert proc.stdin
            proc.stdin.write(stdin)
            proc.stdin.close()
        assert proc.stdout
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if self._log:
                self._log.write(line + "\n")
            if self.verbose and self.console is not None:
                self.console.print(line, markup=False, highlight=False)
            if line.strip():
                tail.append(line.strip())
        rc = proc.wait()
        if rc != 0:
            raise StageError(self.stage, f"{Path(argv[0]).name} exited {rc}", self.log_path,
                             tail[0][:200] if tail else "")
