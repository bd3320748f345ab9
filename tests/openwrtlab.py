"""A stand-in for OpenWrt's split Python: this machine's CPython run with only the standard-library
modules that a given set of OpenWrt python3-* packages would install.

OpenWrt's python3-light is the whole standard library minus the modules moved into their own
packages; the map below is taken from openwrt/packages lang/python/python3/files/python3-package-*.mk
(each package's file list). `light_python(tmp, packages)` writes an interpreter wrapper whose import
system refuses every module of a package not in `packages`, and logs each refusal, so tests can run
the agent or Ansible's modules as they would run on a router with exactly those packages. It does
not emulate musl, MIPS/ARM or OpenWrt's build options: what it checks is which packages are needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

# OpenWrt package -> top-level modules (and C extensions) it takes out of python3-light.
PY3_SPLIT: dict[str, tuple[str, ...]] = {
    "python3-asyncio": ("asyncio",),
    "python3-cgi": ("cgi",),
    "python3-cgitb": ("cgitb",),
    "python3-codecs": ("_codecs_cn", "_codecs_hk", "_codecs_iso2022", "_codecs_jp", "_codecs_kr", "_codecs_tw",
                       "unicodedata"),
    "python3-ctypes": ("ctypes", "_ctypes"),
    "python3-dbm": ("dbm", "_dbm", "_gdbm"),
    "python3-decimal": ("decimal", "_decimal"),
    "python3-distutils": ("distutils",),
    "python3-email": ("email",),
    "python3-lib2to3": ("lib2to3",),
    "python3-logging": ("logging",),
    "python3-lzma": ("lzma", "_lzma"),
    "python3-multiprocessing": ("multiprocessing", "_multiprocessing"),
    "python3-ncurses": ("curses", "_curses", "_curses_panel"),
    "python3-openssl": ("_hashlib", "_ssl"),
    "python3-pydoc": ("doctest", "pydoc", "pydoc_data"),
    "python3-readline": ("readline",),
    "python3-sqlite3": ("sqlite3", "_sqlite3"),
    "python3-unittest": ("unittest",),
    "python3-urllib": ("urllib",),
    "python3-uuid": ("uuid", "_uuid"),
    "python3-venv": ("venv", "ensurepip"),
    "python3-webbrowser": ("webbrowser",),
    "python3-xml": ("xml", "xmlrpc", "_elementtree", "pyexpat"),
}

# Split packages another package DEPENDS on (python3-urllib.mk). python3-cryptography's list changed
# between versions (3.4.8 named python3-openssl, -email, -urllib): not counted, so the tests see
# whether the agent needs them itself.
DEPENDS = {"python3-urllib": {"python3-email"}}

RUNNER = r'''
import importlib.abc, os, sys
BLOCKED = set(os.environ.pop("IW_LIGHT_BLOCKED", "").split(","))
LOG = os.environ.pop("IW_LIGHT_LOG", "")
for p in reversed(os.environ.pop("IW_LIGHT_PATH", "").split(":")):
    if p:
        sys.path.insert(0, p)

class Light(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.partition(".")[0]
        if top in BLOCKED:
            if LOG:
                with open(LOG, "a") as f:
                    f.write(top + "\n")
            raise ModuleNotFoundError(f"No module named {name!r} (not in the OpenWrt packages)", name=name)
        return None

sys.meta_path.insert(0, Light())
args = sys.argv[1:]
if not args:
    sys.argv = [""]
    exec(compile(sys.stdin.read(), "<stdin>", "exec"), {"__name__": "__main__"})
elif args[0] == "-c":
    sys.argv = ["-c", *args[2:]]
    exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
elif args[0] == "-m":
    import runpy
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    import runpy
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
'''


def installed_with(packages: set[str]) -> set[str]:
    out = set(packages)
    for p in packages:
        out |= DEPENDS.get(p, set())
    return out


def blocked_modules(packages: set[str]) -> set[str]:
    have = installed_with(packages)
    return {m for pkg, mods in PY3_SPLIT.items() if pkg not in have for m in mods}


def package_of(module: str) -> str | None:
    return next((pkg for pkg, mods in PY3_SPLIT.items() if module in mods), None)


def light_python(tmp: Path, packages: set[str], paths: list[str] | None = None) -> tuple[Path, Path]:
    """(wrapper interpreter, log of refused modules) for a router with these OpenWrt packages.

    paths: directories put first on sys.path (site-packages are off: -I -S), e.g. the agent's
    sources or a directory holding only what python3-cryptography installs.
    """
    runner = tmp / "light_runner.py"
    runner.write_text(RUNNER)
    log = tmp / "light-refused.log"
    log.write_text("")
    wrapper = tmp / "python3-light"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"IW_LIGHT_BLOCKED={','.join(sorted(blocked_modules(packages)))} IW_LIGHT_LOG={log} "
        f"IW_LIGHT_PATH={':'.join(paths or [])} exec {sys.executable} -I -S {runner} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper, log


def cryptography_only(tmp: Path) -> Path:
    """A directory with only the cryptography and cffi packages of this interpreter (what
    python3-cryptography and python3-cffi put on a router), for light_python's paths."""
    import cryptography

    site = Path(cryptography.__file__).parent.parent
    out = tmp / "site-cryptography"
    out.mkdir(exist_ok=True)
    for entry in site.iterdir():
        if entry.name in ("cryptography", "cffi") or entry.name.startswith("_cffi_backend"):
            (out / entry.name).symlink_to(entry)
    return out
