"""`idlewire build`: the stages in order, with a progress line per stage and one log file."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .. import __version__
from ..config import Site, Target
from ..errors import UserError
from ..paths import cache_dir
from .artifacts import make_artifacts
from .assemble import assemble
from .bake import build_bake
from .rootfs import build_rootfs, check_mirror, rootfs_path
from .runner import Runner, require_tools

MIN_FREE = 6 << 30  # a rootfs, a bake and an image of the larger target


@dataclass
class BuildResult:
    image: Path
    artifacts: list[Path]
    timings: dict[str, float]
    cached: dict[str, bool]


def artifact_stem(target: Target) -> str:
    return f"idlewire-{target.name}-{__version__}"


def preflight(target: Target, cache: Path) -> None:
    """Everything that can be checked before any work starts: tools, and the mirror if needed."""
    require_tools("tar", "unshare", "mount", "dpkg-query", "sfdisk", "mkfs.vfat", "mcopy",
                  "mkfs.ext4", "faketime", "xz", "du")
    if not rootfs_path(target, cache).exists():
        require_tools("mmdebstrap")
        check_mirror(target)


def build(target: Target, site: Site, out: Path, *, verbose: bool = False,
          allow_no_login: bool = False, xz_level: int | None = 1,
          console: Console | None = None) -> BuildResult:
    console = console or Console(stderr=True)
    if not site.ssh_authorized_keys and not allow_no_login:
        where = f"{site.path}" if site.path else "no --config given"
        raise UserError(
            f"no SSH key to log in with ({where}): add 'ssh_authorized_keys:' to the site file, "
            "or pass --allow-no-login for a golden image that units get keys for at stamping"
        )
    if os.geteuid() != 0:
        raise UserError("building an image needs root (mmdebstrap, chroot); run it with sudo")
    cache = cache_dir()
    for place in (cache, out):
        place.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(cache)
    if st.f_bavail * st.f_frsize < MIN_FREE:
        raise UserError(f"{cache}: {st.f_bavail * st.f_frsize >> 20} MiB free; a build needs "
                        f"{MIN_FREE >> 30} GiB (set IDLEWIRE_CACHE to a larger disk)")
    preflight(target, cache)
    stem = artifact_stem(target)
    log = out / "logs" / f"{stem}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"# idlewire {__version__} build of {target.name}\n")
    run = Runner(log, verbose=verbose, console=console)
    run.open()
    staging = out / f".{stem}.partial"
    timings: dict[str, float] = {}
    cached: dict[str, bool] = {}
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console, transient=False, disable=verbose) as progress:

            def stage(name: str, label: str, fn, *args, caches: bool = False):
                run.stage = name
                task = progress.add_task(f"{name:9} {label}", total=1)
                t0 = time.monotonic()
                result = fn(*args)
                if caches:
                    result, cached[name] = result
                timings[name] = time.monotonic() - t0
                note = " (cached)" if cached.get(name) else ""
                progress.update(task, completed=1, description=f"{name:9} {label}{note}")
                if verbose:
                    console.print(f"{name}: done in {timings[name]:.1f}s{note}")
                return result

            rootfs_tar = stage("rootfs", f"Debian {target.suite} {target.architecture}",
                               build_rootfs, target, cache, run, caches=True)
            bake_dir = stage("bake", "Ansible roles over chroot", build_bake, target, site,
                             rootfs_tar, cache, run, caches=True)
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
            image = staging / f"{stem}.img"
            layout = stage("assemble", "partitions and filesystems", assemble, target, bake_dir,
                           image, run)
            made = stage("artifacts", "bmap, xz, sha256, manifest", make_artifacts, target, site,
                         image, bake_dir, layout, rootfs_tar, run, xz_level)
        final = []
        for path in made:  # publish: final names appear only now, each by an atomic rename
            dest = out / path.name
            path.rename(dest)
            final.append(dest)
        return BuildResult(out / f"{stem}.img", final, timings, cached)
    except OSError as exc:
        raise UserError(f"stage '{run.stage}' failed: {exc.strerror or exc}"
                        f"{' on ' + str(exc.filename) if exc.filename else ''}; full log: {log}") from None
    finally:
        run.close()
        shutil.rmtree(staging, ignore_errors=True)
