"""Read OpenWrt UCI configuration text (/etc/config/* files, `uci export` output) without `uci`.

The grammar follows libuci's file parser: statements `package NAME`, `config TYPE ['NAME']`,
`option NAME 'VALUE'`, `list NAME 'VALUE'`; tokens are bare words, 'single-quoted' (no escapes),
"double-quoted" (backslash escapes) or a mix glued together ('it'\\''s'); `#` starts a comment where
a token could start; `;` separates statements on one line. A bad line raises UciError naming the
source and the line number. Used by the role template tests and by the testinfra suite's OpenWrt
helpers (iwnode.py beside it: it ships with the suite) to read `uci export PACKAGE` from a node.

    cfg = parse(Path("/etc/config/idlewire").read_text(), "/etc/config/idlewire")
    cfg.get("agent.enabled")            # named section
    cfg.get("@dropbear[0].PasswordAuth")  # anonymous section, by type and index
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_TYPE = re.compile(r"^[A-Za-z0-9_-]+$")
_REF = re.compile(r"^@([A-Za-z0-9_-]+)\[(-?\d+)\]$")


class UciError(ValueError):
    """A line that libuci would refuse; the message names the source and the line."""


@dataclass
class Section:
    type: str
    name: str | None
    lineno: int
    options: dict[str, str | list[str]] = field(default_factory=dict)

    def get(self, option: str, default: str | list[str] | None = None) -> str | list[str] | None:
        return self.options.get(option, default)


@dataclass
class Config:
    package: str | None
    sections: list[Section] = field(default_factory=list)

    def of_type(self, type_: str) -> list[Section]:
        return [s for s in self.sections if s.type == type_]

    def section(self, ref: str) -> Section | None:
        """A section by name, or `@TYPE[INDEX]` (negative counts from the end) as `uci get` takes it."""
        m = _REF.match(ref)
        if m:
            found = self.of_type(m[1])
            i = int(m[2])
            return found[i] if -len(found) <= i < len(found) else None
        return next((s for s in self.sections if s.name == ref), None)

    def get(self, path: str, default: str | list[str] | None = None) -> str | list[str] | None:
        """`SECTION.OPTION` (a value or a list), or `SECTION` (its type), like `uci get`."""
        ref, _, option = path.partition(".")
        s = self.section(ref)
        if s is None:
            return default
        return s.type if not option else s.options.get(option, default)


def quote(value: str) -> str:
    """A value as uci writes it: single quotes, an embedded ' as '\\''."""
    return "'" + value.replace("'", "'\\''") + "'"


def _statements(line: str, where: str) -> list[list[str]]:
    """Split one line into statements of tokens (quotes removed, escapes applied)."""
    out: list[list[str]] = []
    tokens: list[str] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in " \t\r":
            i += 1
            continue
        if c == "#":
            break
        if c == ";":
            if tokens:
                out.append(tokens)
            tokens = []
            i += 1
            continue
        buf: list[str] = []
        while i < n and line[i] not in " \t\r;":
            c = line[i]
            if c == "'":
                j = line.find("'", i + 1)
                if j < 0:
                    raise UciError(f"{where}: unterminated single quote")
                buf.append(line[i + 1:j])
                i = j + 1
            elif c == '"':
                i += 1
                while True:
                    if i >= n:
                        raise UciError(f"{where}: unterminated double quote")
                    if line[i] == "\\" and i + 1 < n:
                        buf.append(line[i + 1])
                        i += 2
                    elif line[i] == '"':
                        i += 1
                        break
                    else:
                        buf.append(line[i])
                        i += 1
            elif c == "\\":
                if i + 1 >= n:
                    raise UciError(f"{where}: backslash at the end of the line")
                buf.append(line[i + 1])
                i += 2
            else:
                buf.append(c)
                i += 1
        tokens.append("".join(buf))
    if tokens:
        out.append(tokens)
    return out


def parse(text: str, source: str = "<uci>") -> Config:
    """Parse UCI text; raises UciError("SOURCE:LINE: what is wrong") on the first bad line."""
    cfg = Config(package=None)
    current: Section | None = None
    by_name: dict[str, Section] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{source}:{lineno}"
        for st in _statements(line, where):
            kw, args = st[0], st[1:]
            if kw == "package":
                if len(args) != 1 or not _NAME.match(args[0]):
                    raise UciError(f"{where}: 'package' takes one name of letters, digits and '_'")
                cfg.package = args[0]
            elif kw == "config":
                if not 1 <= len(args) <= 2:
                    raise UciError(f"{where}: 'config' takes a type and an optional name, got {len(args)} words")
                type_, name = args[0], (args[1] if len(args) == 2 else None)
                if not _TYPE.match(type_):
                    raise UciError(f"{where}: bad section type {type_!r} (letters, digits, '_', '-')")
                if name is not None and not _NAME.match(name):
                    raise UciError(f"{where}: bad section name {name!r} (letters, digits and '_' only)")
                if name is not None and name in by_name:
                    current = by_name[name]  # libuci merges a repeated named section
                    if current.type != type_:
                        raise UciError(f"{where}: section {name!r} is a {current.type!r} (line "
                                       f"{current.lineno}), not a {type_!r}")
                    continue
                current = Section(type_, name, lineno)
                cfg.sections.append(current)
                if name is not None:
                    by_name[name] = current
            elif kw in ("option", "list"):
                if current is None:
                    raise UciError(f"{where}: {kw!r} before any 'config' section")
                if len(args) != 2:
                    raise UciError(f"{where}: {kw!r} takes a name and one value, got {len(args)} words "
                                   "(quote a value that has spaces)")
                name, value = args
                if not _NAME.match(name):
                    raise UciError(f"{where}: bad option name {name!r} (letters, digits and '_' only)")
                if kw == "option":
                    current.options[name] = value
                else:
                    old = current.options.get(name)
                    current.options[name] = ([] if old is None else [old] if isinstance(old, str) else old) + [value]
            else:
                raise UciError(f"{where}: unknown statement {kw!r} (package, config, option or list)")
    return cfg
