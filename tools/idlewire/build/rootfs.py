"""Stage 1, rootfs: a Debian root filesystem from the mirror with mmdebstrap, cached by inputs."""

from __future__ import annotations

import os
import shlex
import urllib.error
import urllib.request
from pathlib import Path

from ..config import Target, digest
from ..errors import UserError
from .runner import Runner, require_tools

ROOTFS_FORMAT = 2  # bump when the way we call mmdebstrap changes the result


def rootfs_key(target: Target) -> str:
    inputs = {"format": ROOTFS_FORMAT, **target.rootfs_inputs()}
    if sde := os.environ.get("SOURCE_DATE_EPOCH"):
        inputs["source_date_epoch"] = sde
    return digest(inputs)[:16]


def check_mirror(target: Target) -> None:
    url = f"{target.mirror.rstrip('/')}/dists/{target.suite}/InRelease"
    try:
        with urllib.request.urlopen(url, timeout=20) as resp:  # noqa: S310 (http(s) mirror URL)
            resp.read(1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"cannot reach the Debian mirror {target.mirror} ({url}: {reason}); check the network, "
            f"or set 'mirror:' in {target.path}"
        ) from None


def rootfs_path(target: Target, cache: Path) -> Path:
    return cache / "rootfs" / f"{target.name}-{rootfs_key(target)}.tar"


def build_rootfs(target: Target, cache: Path, run: Runner) -> tuple[Path, bool]:
    """Return (the cached rootfs tarball, whether it was already cached), building it if needed."""
    out = rootfs_path(target, cache)
    if out.exists():
        run.note(f"cached: {out}")
        return out, True
    require_tools("mmdebstrap")
    check_mirror(target)
    debs = cache / "debs" / f"{target.suite}-{target.architecture}"
    debs.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tar.partial")
    modules = "\\n".join(target.initramfs_modules)
    q = shlex.quote
    cmd = [
        "mmdebstrap", "--variant=apt", "--format=tar", f"--architectures={target.architecture}",
        f"--components={','.join(target.components)}",
        f"--include={','.join(target.packages)}",
        # Directories hooks of packages expect (raspi-firmware writes the Pi boot files there).
        "--setup-hook=mkdir -p \"$1/boot/firmware\" \"$1/boot/efi\" \"$1/var/cache/apt/archives\""
        " \"$1/etc/initramfs-tools/conf.d\" \"$1/usr/share/initramfs-tools/modules.d\"",
        # Package cache shared between builds: a rebuild downloads only what changed.
        f"--setup-hook=sync-in {q(str(debs))} /var/cache/apt/archives/",
        # initramfs: only the listed modules (MODULES=most under qemu-user takes >15 minutes).
        "--setup-hook=printf 'MODULES=list\\nCOMPRESS=zstd\\n' >"
        " \"$1/etc/initramfs-tools/conf.d/idlewire.conf\"",
        f"--setup-hook=printf '{modules}\\n' > \"$1/usr/share/initramfs-tools/modules.d/idlewire\"",
        # An appliance needs no manuals, translations or package docs (copyright notices stay).
        *(f"--dpkgopt=path-exclude={p}" for p in ("/usr/share/man/*", "/usr/share/info/*",
                                                   "/usr/share/doc/*", "/usr/share/locale/*",
                                                   "/usr/share/lintian/*")),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=force-unsafe-io",  # no fsync per file: the tarball is written once at the end
        "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        f"--customize-hook=sync-out /var/cache/apt/archives {q(str(debs))}",
        target.suite, str(tmp), target.mirror,
    ]
    try:
        run.run(cmd)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, False
