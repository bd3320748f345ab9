"""Stage 1, rootfs: a Debian root filesystem from the mirror with mmdebstrap, cached by inputs."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from ..config import Target, digest
from ..errors import UserError
from .runner import Runner, require_tools

ROOTFS_FORMAT = 4  # bump when the way we call mmdebstrap changes the result

#: What a package postinst leaves that differs from one run or host to the next: SSH host keys
#: (random; every unit makes its own at first boot), systemd-resolved's copy of the build host's
#: resolv.conf, and the host name mmdebstrap copies from the build host.
HOST_LEFTOVERS = ('rm -f "$1"/etc/ssh/ssh_host_*_key "$1"/etc/ssh/ssh_host_*_key.pub'
                  ' "$1"/etc/.resolv.conf.systemd-resolved.bak'
                  ' && { [ -L "$1/etc/resolv.conf" ] || rm -f "$1/etc/resolv.conf"; }'
                  ' && rm -f "$1/etc/hostname" && printf "localhost\\n" > "$1/etc/hostname"'
                  ' && chmod 644 "$1/etc/hostname"')



def rootfs_key(target: Target, pinned: dict[str, str] | None = None) -> str:
    inputs = {"format": ROOTFS_FORMAT, **target.rootfs_inputs()}
    if sde := os.environ.get("SOURCE_DATE_EPOCH"):
        inputs["source_date_epoch"] = sde
    if pinned:
        inputs["pinned"] = sorted(pinned.items())
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


def rootfs_path(target: Target, cache: Path, pinned: dict[str, str] | None = None) -> Path:
    return cache / "rootfs" / f"{target.name}-{rootfs_key(target, pinned)}.tar"


def debs_dir(target: Target, cache: Path) -> Path:
    """The .debs every build of this suite and architecture downloaded, kept for the next one."""
    return cache / "debs" / f"{target.suite}-{target.architecture}"


def deb_file(debs: Path, name: str, version: str, arch: str) -> Path:
    """apt's name for a downloaded package (an epoch's ':' is spelled %3a)."""
    return debs / f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


def _kept_deb(debs: Path, target: Target, name: str, version: str) -> Path | None:
    for arch in (target.architecture, "all"):
        if (path := deb_file(debs, name, version, arch)).is_file():
            return path
    return None


def missing_debs(target: Target, cache: Path, pinned: dict[str, str]) -> list[str]:
    """The pinned packages (NAME=VERSION) that no kept .deb provides."""
    debs = debs_dir(target, cache)
    return [f"{n}={v}" for n, v in sorted(pinned.items()) if _kept_deb(debs, target, n, v) is None]


def _replay_repo(target: Target, cache: Path, pinned: dict[str, str], repo: Path) -> None:
    """A flat apt repository holding exactly the pinned packages that are kept in the cache."""
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    debs = debs_dir(target, cache)
    stanzas = []
    for name, version in sorted(pinned.items()):
        src = _kept_deb(debs, target, name, version)
        if src is None:
            continue
        os.link(src, repo / src.name)
        control = subprocess.run(["dpkg-deb", "--field", str(src)], capture_output=True, text=True,
                                 check=True).stdout.rstrip("\n")
        data = src.read_bytes()
        stanzas.append(f"{control}\nFilename: ./{src.name}\nSize: {len(data)}\n"
                       f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
    (repo / "Packages").write_text("\n".join(stanzas))


def _pinning_hooks(target: Target, cache: Path, pinned: dict[str, str], work: Path) -> tuple[list[str], list[str]]:
    """mmdebstrap arguments (options, mirrors) that install exactly the pinned versions.

    The kept .debs become a local repository; the mirror is added only for what the cache lacks, and
    apt preferences hold every package at its pinned version. The image's own sources.list and
    the package set that was installed are checked after the run (see build_rootfs).
    """
    q = shlex.quote
    repo = work / "repo"
    _replay_repo(target, cache, pinned, repo)
    prefs = "".join(f"Package: {n}\nPin: version {v}\nPin-Priority: 1001\n\n" for n, v in sorted(pinned.items()))
    (work / "preferences").write_text(prefs)
    sources = f"deb {target.mirror} {target.suite} {' '.join(target.components)}\n"
    (work / "sources.list").write_text(sources)
    options = [
        f"--setup-hook=mkdir -p \"$1/etc/apt/preferences.d\" && cp {q(str(work / 'preferences'))}"
        " \"$1/etc/apt/preferences.d/idlewire-replay\"",
        # what this image's apt uses on the node: the mirror, as in any other build
        "--customize-hook=rm -f \"$1/etc/apt/preferences.d/idlewire-replay\""
        f" && cp {q(str(work / 'sources.list'))} \"$1/etc/apt/sources.list\"",
        f"--customize-hook=dpkg-query --admindir=\"$1/var/lib/dpkg\" -W -f '${{db:Status-Abbrev}}\\t${{Package}}"
        f"\\t${{Version}}\\n' > {q(str(work / 'installed.tsv'))}",
    ]
    mirrors = [f"deb [trusted=yes] copy://{repo} ./"]
    if missing_debs(target, cache, pinned):
        mirrors.append(sources.strip())
    return options, mirrors


def _check_installed(work: Path, pinned: dict[str, str]) -> None:
    got = {}
    for line in (work / "installed.tsv").read_text().splitlines():
        status, name, version = line.split("\t")
        if status.startswith("ii"):
            got[name] = version
    wrong = [f"{n}={got.get(n, 'absent')} (wanted {v})" for n, v in sorted(pinned.items()) if got.get(n) != v]
    extra = sorted(set(got) - set(pinned))
    if wrong or extra:
        what = wrong[:5] + [f"{n}={got[n]} (not in the manifest)" for n in extra[:5]]
        raise UserError(f"the replayed rootfs differs from the manifest in {len(wrong) + len(extra)} "
                        f"package(s): {', '.join(what)}; the target's package list changed since")


def build_rootfs(target: Target, cache: Path, run: Runner,
                 pinned: dict[str, str] | None = None) -> tuple[Path, bool]:
    """Return (the cached rootfs tarball, whether it was already cached), building it if needed.

    `pinned` (NAME → VERSION, from a manifest): install exactly those versions, from the kept .debs
    and, for what the cache lacks, the mirror.
    """
    out = rootfs_path(target, cache, pinned)
    if out.exists():
        run.note(f"cached: {out}")
        return out, True
    require_tools("mmdebstrap")
    if not pinned or missing_debs(target, cache, pinned):
        check_mirror(target)
    debs = debs_dir(target, cache)
    debs.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tar.partial")
    work = out.with_suffix(".replay")
    pin_options, mirrors = [], [target.mirror]
    if pinned:
        work.mkdir(exist_ok=True)
        pin_options, mirrors = _pinning_hooks(target, cache, pinned, work)
    modules = "\\n".join(target.initramfs_modules)
    q = shlex.quote
    cmd = [
        "mmdebstrap", "--variant=apt", "--format=tar", f"--architectures={target.architecture}",
        "--skip=essential/unlink",  # keep the essential set's .debs too: replays need every one
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
        f"--customize-hook={HOST_LEFTOVERS}",
        *pin_options,
        target.suite, str(tmp), *mirrors,
    ]
    try:
        run.run(cmd)
        if pinned:
            _check_installed(work, pinned)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return out, False
