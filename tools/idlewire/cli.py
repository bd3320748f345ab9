"""The `idlewire` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

from . import __version__
from .clikit import App, LazyConsole, Opt
from .errors import UserError

app = App(
    help="Build, stamp, flash and verify idlewire bandwidth-sharing nodes.\n\n"
    "Typical first run:  idlewire build --target rpi4-arm64 --config site.yml\n"
    "Every command explains itself:  idlewire COMMAND --help",
    version=__version__,
)
err = LazyConsole(stderr=True, soft_wrap=True)  # an error stays one line, however long its paths


@app.command()
def targets(as_json: Annotated[bool, Opt("--json", help="Print JSON for scripts.")] = False):
    """List the image targets (image/targets/*.yml)."""
    from .config import available_targets, load_target

    rows = [load_target(name) for name in available_targets()]
    if as_json:
        print(json.dumps([{"name": t.name, "architecture": t.architecture, "suite": t.suite,
                           "description": t.description} for t in rows], indent=1))
        return
    for t in rows:
        print(f"{t.name:14} {t.architecture:6} {t.suite:8} {t.description}")


@app.command()
def build(
    target: Annotated[str, Opt("--target", "-t", help="Target name (see `idlewire targets`) "
                               "or path of a target .yml.")] = "rpi4-arm64",
    config: Annotated[Path | None, Opt("--config", "-c", help="Site file: SSH keys, "
                                       "hostname, role variables (see site.example.yml).")] = None,
    out: Annotated[Path, Opt("--out", "-o", help="Directory for the artifacts.")] = Path("out"),
    allow_no_login: Annotated[bool, Opt(
        "--allow-no-login", help="Build without an SSH key (a golden image: `idlewire stamp` adds "
        "keys per unit).")] = False,
    compress: Annotated[str, Opt("--compress", metavar="zstd|xz|none", help="Compressor of the "
                                 "downloadable image: zstd (the default: multi-threaded, seconds), xz "
                                 "(smallest, minutes), none.")] = "zstd",
    release: Annotated[bool, Opt("--release", help="A release: xz at --xz-level (the smallest "
                                 "download) instead of zstd.")] = False,
    no_xz: Annotated[bool, Opt("--no-compress", "--no-xz", help="Write no compressed image "
                               "(faster, for tests).")] = False,
    xz_level: Annotated[int, Opt("--xz-level", min=0, max=9, help="xz preset with --compress xz "
                                 "or --release: 9 is the smallest.")] = 9,
    from_manifest: Annotated[Path | None, Opt("--from", metavar="MANIFEST", help="Rebuild with "
                                              "exactly the Debian package versions a previous build's "
                                              ".manifest.json records (from the kept .debs, else the "
                                              "mirror).")] = None,
    sign: Annotated[Path | None, Opt("--sign", metavar="KEY", help="Sign every artifact with this "
                                     "SSH private key (FILE.sig beside each, ssh-keygen -Y sign, "
                                     "namespace idlewire-image).")] = None,
    verbose: Annotated[bool, Opt("--verbose", "-v", help="Stream every tool's output.")] = False,
    as_json: Annotated[bool, Opt("--json", help="Print a JSON summary on stdout.")] = False,
):
    """Build a bootable node image: rootfs → bake → assemble → artifacts.

    Each stage is cached under ~/.cache/idlewire by a hash of its inputs: a rebuild after a role
    or site change reuses the Debian rootfs and only re-bakes. Artifacts in OUT:
    idlewire-TARGET-VERSION.img, .img.zst (or .img.xz), .bmap, .sha256, .manifest.json and
    .cdx.json (the SBOM, CycloneDX); with --sign KEY a .sig beside each; the log in OUT/logs/.

    Reproducible: the same checkout, site file, SOURCE_DATE_EPOCH and package versions give the
    same image bytes. Rebuild a shipped image with `--from OUT/idlewire-…manifest.json`.
    """
    from .build.pipeline import build as run_build
    from .build.pipeline import load_pins
    from .config import load_site, load_target

    if compress not in ("zstd", "xz", "none"):
        raise UserError(f"--compress {compress!r}: choose zstd, xz or none")
    kind = "xz" if release else compress
    chosen = None if no_xz or kind == "none" else (kind, xz_level if kind == "xz" else 3)
    t = load_target(target)
    site = load_site(config)
    pinned = load_pins(from_manifest, t) if from_manifest else None
    result = run_build(t, site, out, verbose=verbose, allow_no_login=allow_no_login,
                       compress=chosen, pinned=pinned, sign_key=sign, console=err.rich())
    if as_json:
        print(json.dumps({"target": t.name, "image": str(result.image),
                          "artifacts": [str(p) for p in result.artifacts],
                          "seconds": {k: round(v, 1) for k, v in result.timings.items()},
                          "cached": result.cached}, indent=1))
    else:
        total = sum(result.timings.values())
        err.print(f"[green]built[/green] {result.image} in {total:.0f}s")
        for p in result.artifacts[1:]:
            err.print(f"  {p}")


# Command groups live in their own modules (tools/idlewire/cmd_*.py), each with
# `register(app: App) -> None`, so that every part of the CLI is owned in one place.
COMMAND_MODULES = ("receipts", "client", "stamp", "flash", "console", "verify", "hub", "economy")


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        modname = f"{__package__}.cmd_{name}"
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue  # that part is not in this tree yet
            raise
        module.register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    try:
        app(argv)
    except UserError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        sys.exit(130)


if __name__ == "__main__":
    main()
