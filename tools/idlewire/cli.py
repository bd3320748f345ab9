"""The `idlewire` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

from rich.console import Console

from . import __version__
from .clikit import App, Opt
from .errors import UserError

app = App(
    help="Build, stamp, flash and verify idlewire bandwidth-sharing nodes.\n\n"
    "Typical first run:  idlewire build --target rpi4-arm64 --config site.yml\n"
    "Every command explains itself:  idlewire COMMAND --help",
    version=__version__,
)
err = Console(stderr=True)


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
    no_xz: Annotated[bool, Opt("--no-xz", help="Skip the .img.xz (faster, for tests).")] = False,
    xz_level: Annotated[int, Opt("--xz-level", min=0, max=9, help="xz preset: 1 is fast "
                                 "(the default, for the edit-build loop), 9 smallest (releases).")] = 1,
    verbose: Annotated[bool, Opt("--verbose", "-v", help="Stream every tool's output.")] = False,
    as_json: Annotated[bool, Opt("--json", help="Print a JSON summary on stdout.")] = False,
):
    """Build a bootable node image: rootfs → bake → assemble → artifacts.

    Each stage is cached under ~/.cache/idlewire by a hash of its inputs: a rebuild after a role
    or site change reuses the Debian rootfs and only re-bakes. Artifacts in OUT:
    idlewire-TARGET-VERSION.img, .img.xz, .bmap, .sha256, .manifest.json; the log in OUT/logs/.
    """
    from .build.pipeline import build as run_build
    from .config import load_site, load_target

    t = load_target(target)
    site = load_site(config)
    result = run_build(t, site, out, verbose=verbose, allow_no_login=allow_no_login,
                       xz_level=None if no_xz else xz_level, console=err)
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
COMMAND_MODULES = ("receipts", "client", "stamp", "flash", "console", "verify")
COMMAND_MODULES += ("economy",)  # becomes part of `hub` once the hub is merged


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
