"""The command line's parsing: commands are plain functions, argparse (standard library) parses.

A command's parameters say what they are with `Annotated[T, Arg(help=…)]` (positional) or
`Annotated[T, Opt("--flag", "-f", help=…)]`; its docstring is its --help (the first paragraph:
its line in the command list). T is str, int, float, Path, bool (a flag), `X | None` (optional) or
`list[X]` (a positional taking one or more; an option that repeats). A usage error is one line on
stderr naming the command and where to look, exit 2 — never a traceback or a boxed banner.

Why not typer: from 0.2x it converts every argument through pydantic, ~0.1 s on every start of
every command (`idlewire flash` that only finds its image missing: 0.18 s with typer 0.29,
see CHANGELOG), and bmaptool, the peer `idlewire flash` is measured against, starts in 0.05 s.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import shutil
import sys
import types
import typing
from collections.abc import Callable
from typing import Any


class LazyConsole:
    """A rich Console made when first used. rich's import is most of a command's start (~35 ms
    of ~60): a run that prints nothing through it (`idlewire flash --json` that succeeds) does not
    pay it. Takes rich.console.Console's arguments; `.rich()` is the Console itself (for rich
    objects that want a real one, e.g. a Progress)."""

    def __init__(self, **options: Any):
        self._options, self._console = options, None

    def rich(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.rich(), name)


class Arg:
    """A positional argument (METAVAR defaults to the parameter's name in capitals)."""

    def __init__(self, help: str = "", metavar: str | None = None):
        self.help, self.metavar = help, metavar


class Opt:
    """An option: its flags, help, and for numbers an inclusive range."""

    def __init__(self, *flags: str, help: str = "", min: float | None = None,
                 max: float | None = None, metavar: str | None = None):
        self.flags, self.help, self.min, self.max, self.metavar = flags, help, min, max, metavar


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            near = difflib.get_close_matches(m.group(1), choices, n=1)
            message = (f"no command {m.group(1)!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                       + f" (commands: {', '.join(choices)})")
        print(f"error: {self.prog}: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _Help(argparse.RawDescriptionHelpFormatter):
    """Docstrings as written (they are wrapped already); option help wrapped to the terminal."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=30, width=min(shutil.get_terminal_size().columns, 110))

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        # "-i, --inventory INVENTORY" rather than "--inventory INVENTORY, -i INVENTORY"
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(sorted(action.option_strings, key=len))} {metavar}"

    def _format_action(self, action: argparse.Action) -> str:
        text = super()._format_action(action)
        if action.nargs == argparse.PARSER:  # the commands, without argparse's "COMMAND" line above them
            text = text.split("\n", 1)[1]
        return text


def _number(kind: type, lo: float | None, hi: float | None) -> Callable[[str], Any]:
    word = "whole number" if kind is int else "number"

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {word}, got {text!r}") from None
        if value != value:  # nan: every comparison below is False, so it would pass any bound
            raise argparse.ArgumentTypeError(f"expected a {word}, got {text!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            span = (f"from {lo} to {hi}" if lo is not None and hi is not None
                    else f"≥ {lo}" if lo is not None else f"≤ {hi}")
            raise argparse.ArgumentTypeError(f"expected a {word} {span}, got {text}")
        return value

    convert.__name__ = word  # argparse names the type in some messages
    return convert


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(inner type, is a list) of `X`, `X | None`, `list[X]`, `list[X] | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _add_params(parser: argparse.ArgumentParser, fn: Callable) -> list[str]:
    hints = typing.get_type_hints(fn, include_extras=True)
    names = []
    for name, p in inspect.signature(fn).parameters.items():
        hint = hints[name]
        spec = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Arg | Opt)), None)
        if spec is None:
            raise TypeError(f"{fn.__qualname__}({name}): annotate it with Arg(...) or Opt(...)")
        kind, many = _unwrap(hint.__origin__)
        has_default = p.default is not inspect.Parameter.empty
        names.append(name)
        if isinstance(spec, Arg):
            kw: dict[str, Any] = {"metavar": spec.metavar or name.upper(), "help": spec.help, "type": kind}
            if many:
                kw["nargs"] = "+"
                parser.set_defaults(_many=(name, kind))
            elif has_default:
                kw.update(nargs="?", default=p.default)
            parser.add_argument(name, **kw)
            continue
        flags = spec.flags or (f"--{name.replace('_', '-')}",)
        if kind is bool:
            if p.default is not False:
                raise TypeError(f"{fn.__qualname__}({name}): a flag defaults to False")
            parser.add_argument(*flags, dest=name, action="store_true", help=spec.help)
            continue
        conv = _number(kind, spec.min, spec.max) if kind in (int, float) else kind
        kw = {"dest": name, "type": conv, "help": spec.help,
              "metavar": spec.metavar or (flags[0].lstrip("-").upper().replace("-", "_"))}
        if many:
            kw.update(action="append", default=None)
        elif has_default:
            kw["default"] = p.default
            if p.default is not None and spec.help:
                kw["help"] = f"{spec.help} [default: {p.default}]"
        else:
            kw["required"] = True
        parser.add_argument(*flags, **kw)
    return names


class App:
    """A command, or a group of commands (`idlewire client connect`)."""

    def __init__(self, help: str = "", version: str | None = None):
        self.help, self.version = help, version
        self.commands: dict[str, Callable | App] = {}

    def command(self, name: str | None = None) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            self.commands[name or fn.__name__.replace("_", "-")] = fn
            return fn

        return add

    def add_group(self, group: App, name: str) -> None:
        self.commands[name] = group

    def _build(self, parser: argparse.ArgumentParser) -> None:
        parser.set_defaults(_fn=None, _parser=parser)
        subs = parser.add_subparsers(title="commands", metavar="COMMAND")
        for name, what in self.commands.items():
            doc = what.help if isinstance(what, App) else inspect.cleandoc(what.__doc__ or "")
            summary = doc.split("\n\n")[0].replace("\n", " ")
            sub = subs.add_parser(name, help=summary, description=doc, formatter_class=_Help,
                                  allow_abbrev=False)
            if isinstance(what, App):
                what._build(sub)
            else:
                sub.set_defaults(_fn=what, _names=_add_params(sub, what), _parser=sub)

    def parser(self, prog: str = "idlewire") -> argparse.ArgumentParser:
        parser = _Parser(prog=prog, description=self.help, formatter_class=_Help, allow_abbrev=False)
        if self.version:
            parser.add_argument("--version", action="version", version=f"{prog} {self.version}",
                                help="Print the version and exit.")
        self._build(parser)  # sub-parsers are _Parser too: argparse makes them of the parent's class
        return parser

    def __call__(self, argv: list[str] | None = None, prog: str = "idlewire") -> Any:
        parser = self.parser(prog)
        ns, extra = parser.parse_known_args(argv)
        name, kind = getattr(ns, "_many", (None, None))
        if extra and name and getattr(ns, name) and not any(e.startswith("-") for e in extra):
            getattr(ns, name).extend(map(kind, extra))  # `flash IMG /dev/sdb --json /dev/sdc`: options between targets
            extra = []
        if extra:  # named by the command they were given to, not by `idlewire`
            ns._parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if ns._fn is None:  # a group without its command: show what there is
            ns._parser.print_help(sys.stderr)
            sys.exit(2)
        return ns._fn(**{n: getattr(ns, n) for n in ns._names})
