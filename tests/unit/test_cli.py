"""The `idlewire` command line itself: help for every command, one-line usage errors (exit 2),
arguments converted as declared, and a start that imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path
from typing import Annotated

import pytest
from idlewire.cli import app
from idlewire.clikit import App, Arg, Opt


def idlewire(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "idlewire", *argv], capture_output=True, text=True, check=False)


def _commands(group: App, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, what in group.commands.items():
        out += _commands(what, (*prefix, name)) if isinstance(what, App) else [(*prefix, name)]
    return out


COMMANDS = _commands(app)


def test_every_command_is_listed():
    assert set(COMMANDS) >= {("targets",), ("build",), ("stamp",), ("flash",), ("console",), ("verify",),
                             ("client", "connect"), ("receipts", "verify")}


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_command_explains_itself(argv):
    r = idlewire(*argv, "--help")
    assert r.returncode == 0, r.stderr
    fn = app
    for name in argv:
        fn = fn.commands[name]
    summary = fn.__doc__.strip().splitlines()[0]
    assert summary in r.stdout, r.stdout
    assert r.stdout.startswith(f"usage: idlewire {' '.join(argv)} ")
    assert "--json" in r.stdout  # every command has a JSON form for scripts
    hints = typing.get_type_hints(fn, include_extras=True)
    for name, hint in hints.items():
        for spec in getattr(hint, "__metadata__", ()):
            assert spec.help, f"{' '.join(argv)}: {name} has no help"
            for flag in getattr(spec, "flags", ()):
                assert flag in r.stdout, flag


def test_top_level_help_lists_the_commands_and_no_args_shows_it():
    r = idlewire("--help")
    assert r.returncode == 0
    for name in app.commands:
        assert f"\n    {name} " in r.stdout, name
    assert "COMMAND\n" not in r.stdout  # argparse's bare metavar line is left out
    bare = idlewire()
    assert bare.returncode == 2 and "flash" in bare.stderr and bare.stdout == ""
    group = idlewire("client")
    assert group.returncode == 2 and "connect" in group.stderr


def test_version():
    from idlewire import __version__

    r = idlewire("--version")
    assert (r.returncode, r.stdout.strip()) == (0, f"idlewire {__version__}")


@pytest.mark.parametrize("argv, words", [
    (["flash", "x.img"], "error: idlewire flash: the following arguments are required: TARGET "
                         "(see: idlewire flash --help)"),
    (["flash", "x.img", "/dev/null", "--start", "0"], "idlewire flash: argument --start: expected a whole "
                                                       "number ≥ 1, got 0"),
    (["flash", "x.img", "/dev/null", "--start", "two"], "argument --start: expected a whole number, got 'two'"),
    (["build", "--xz-level", "10"], "idlewire build: argument --xz-level: expected a whole number from 0 to 9"),
    (["flash", "x.img", "/dev/null", "--bogus"], "error: idlewire flash: unrecognized arguments: --bogus"),
    (["flsh"], "error: idlewire: no command 'flsh'; did you mean 'flash'?"),
    (["client", "conect"], "error: idlewire client: no command 'conect'; did you mean 'connect'?"),
    (["verify"], "idlewire verify: the following arguments are required: --inventory/-i"),
    (["flash", "x.img", "/dev/null", "--verify"], "unrecognized arguments: --verify"),  # no abbreviations
])
def test_a_usage_error_is_one_line_and_exit_2(argv, words):
    r = idlewire(*argv)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert words in r.stderr, r.stderr


def test_a_user_error_from_a_command_is_one_line_and_exit_2(tmp_path):
    r = idlewire("flash", str(tmp_path / "missing.img"), str(tmp_path / "card.img"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"error: {tmp_path / 'missing.img'}: no such image; nothing written"


def test_the_start_imports_no_validation_framework_nor_rich():
    """typer 0.2x converted every argument through pydantic: ~0.1 s on each start (see clikit).
    rich is imported when something is printed through it, not by a `--json` run that succeeds."""
    code = ("import sys, idlewire.cli, idlewire.flash; idlewire.cli.app.parser();"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'pydantic', 'typer', 'click', 'yaml', 'rich'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _toy() -> App:
    toy = App(help="toy")

    @toy.command()
    def run(
        files: Annotated[list[Path], Arg(help="files")],
        name: Annotated[str, Opt("--name", "-n", help="a name")],
        route: Annotated[list[str] | None, Opt("--route", help="repeatable")] = None,
        out: Annotated[Path | None, Opt("--out", help="optional")] = None,
        rate: Annotated[float, Opt("--rate", min=0.5, help="a rate")] = 1.0,
        dry_run: Annotated[bool, Opt("--dry-run", help="a flag")] = False,
    ):
        """Run the toy."""
        return files, name, route, out, rate, dry_run

    return toy


def test_arguments_arrive_as_declared():
    toy = _toy()
    assert toy(["run", "a", "b", "-n", "x"]) == ([Path("a"), Path("b")], "x", None, None, 1.0, False)
    assert toy(["run", "a", "-n", "x", "b", "--dry-run", "c"])[0] == [Path("a"), Path("b"), Path("c")]  # interspersed
    assert toy(["run", "a", "--name=y", "--route", "10.0.0.0/8", "--route", "192.0.2.0/24", "--out", "o",
                "--rate", "2.5", "--dry-run"]) == ([Path("a")], "y", ["10.0.0.0/8", "192.0.2.0/24"], Path("o"),
                                                   2.5, True)


def test_a_command_declared_wrongly_fails_at_once():
    bad = App()

    @bad.command()
    def nohint(x: str = ""):
        """No Arg/Opt."""

    with pytest.raises(TypeError, match="annotate it with Arg"):
        bad.parser()
    worse = App()

    @worse.command()
    def flag(on: Annotated[bool, Opt("--on")] = True):
        """A flag on by default cannot be turned off."""

    with pytest.raises(TypeError, match="defaults to False"):
        worse.parser()
