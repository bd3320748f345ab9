"""`idlewire build`: the stages in order, with a progress line per stage and one log file."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .. import __version__, signing
from ..config import Site, Target
from ..errors import UserError
from ..paths import cache_dir
from .artifacts import make_artifacts
from .assemble import assemble
from .bake import build_bake
from .rootfs import build_rootfs, check_mirror, missing_debs, rootfs_path
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


def load_pins(manifest: Path, target: Target) -> dict[str, str]:
    """The package versions a previous build's manifest records, for `idlewire build --from`."""
    try:
        data = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise UserError(f"--from {manifest}: no such file (give an OUT/idlewire-….manifest.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--from {manifest}: not a readable build manifest ({exc})") from None
    packages = data.get("packages") if isinstance(data, dict) else None
    if not isinstance(packages, dict) or not packages or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in packages.items()):
        raise UserError(f"--from {manifest}: no 'packages' (name → version) in it; is it an idlewire manifest?")
    if data.get("target") != target.name:
        raise UserError(f"--from {manifest}: built for target {data.get('target')!r}; "
                        f"add --target {data.get('target')}")
    return dict(sorted(packages.items()))


def preflight(target: Target, cache: Path, pinned: dict[str, str] | None = None) -> None:
    """Everything that can be checked before any work starts: tools, and the mirror if needed."""
    require_tools("tar", "unshare", "mount", "dpkg-query", "sfdisk", "mkfs.vfat", "mcopy",
                  "mkfs.ext4", "debugfs", "faketime", "xz", "zstd", "du", "ssh-keygen")
    if not rootfs_path(target, cache, pinned).exists():
        require_tools("mmdebstrap")
        if not pinned or missing_debs(target, cache, pinned):
            check_mirror(target)


def build(target: Target, site: Site, out: Path, *, verbose: bool = False,
          allow_no_login: bool = False, compress: tuple[str, int] | None = ("zstd", 3),
          pinned: dict[str, str] | None = None, sign_key: Path | None = None,
          console: Console | None = None) -> BuildResult:
    """Run the stages. `pinned` (from `--from MANIFEST`): the exact package versions to install;
    `sign_key`: an SSH private key that signs every artifact (FILE.sig beside it)."""
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
    if sign_key is not None:
        signing.check_private_key(sign_key)  # before minutes of work, not after
    preflight(target, cache, pinned)
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
                               build_rootfs, target, cache, run, pinned, caches=True)
            bake_dir = stage("bake", "Ansible roles over chroot", build_bake, target, site,
                             rootfs_tar, cache, run, caches=True)
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
            image = staging / f"{stem}.img"
            layout = stage("assemble", "partitions and filesystems", assemble, target, bake_dir,
                           image, run)
            made = stage("artifacts", f"bmap, {compress[0] if compress else 'no compression'}, sha256, "
                         "manifest, SBOM", make_artifacts, target, site, image, bake_dir, layout,
                         rootfs_tar, run, compress)
            if sign_key is not None:
                made += stage("sign", "ssh-keygen -Y sign", signing.sign_files, sign_key, made, run)
        # Companions of an earlier build that this one does not replace would pass for its own
        # (an .img.xz beside a new .img.zst, the signature of an earlier image).
        names = {p.name for p in made}
        for stale in (*out.glob(f"{stem}.img.*"), *out.glob(f"{stem}.*.sig")):
            if stale.name not in names:
                stale.unlink()
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
