"""Write the key tables of README.md and agent/README.md from the one schema (idlewire_agent.schema).

Each table sits between `<!-- schema:NAME -->` and `<!-- /schema:NAME -->`; the text around it is
a person's. NAME is node.toml, unit.toml or unit.yml.

    python tools/scripts/schema_docs.py          # rewrite the tables
    python tools/scripts/schema_docs.py --check  # exit 1 if a table is out of date (make lint)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "agent"))

from idlewire_agent import schema  # noqa: E402  (the agent's package, from the checkout)

DOCS = {"node.toml": ROOT / "agent" / "README.md", "unit.toml": ROOT / "agent" / "README.md",
        "unit.yml": ROOT / "README.md"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(name: str, key: schema.Key, default: bool = True) -> str:
    accepted = key.expect or {schema.BOOL: "true or false"}.get(key.kind, key.kind)
    cells = [f"`{name}`", key.kind]
    if default:
        cells.append(_cell(key.shown_default()))
    cells += [_cell(accepted), _cell(key.doc)]
    return "| " + " | ".join(cells) + " |"


def node_table() -> str:
    lines = ["| key | type | default | accepted | what |", "|---|---|---|---|---|"]
    for section, keys in schema.NODE.items():
        lines += [_row(f"{section}.{name}", key) for name, key in keys.items()]
    lines += [_row(f"schedule.rule[].{name}", key) for name, key in schema.RULE.items()]
    moved = ", ".join(f"`{s}.{k}` → `{ns}.{nk}`" for (s, k), (ns, nk) in schema.MOVED.items())
    lines += ["", f"Old keys still read, with a deprecation line (a different value under both names is an "
              f"error naming both): {moved}. An old `node.region` name (\"unset\", \"eu-west\") reads as \"\" (no "
              "region), with a deprecation line; a node with a marketplace and no region does not start."]
    return "\n".join(lines)


def unit_table() -> str:
    lines = ["| key | type | accepted | what |", "|---|---|---|---|"]
    for name, key in schema.UNIT.items():
        if key.kind == schema.TABLE:
            lines += [_row(f"{name}.{sub}", k, default=False) for sub, k in (key.keys or {}).items()]
        else:
            lines.append(_row(name, key, default=False))
    return "\n".join(lines)


def unit_yml_table() -> str:
    cols = {path: col for col, path in schema.csv_columns().items()}
    lines = ["| unit.yml | units.csv column | type | accepted | what |", "|---|---|---|---|---|"]
    for name, key in schema.UNIT_INPUT.items():
        items = ([((name, sub), k) for sub, k in (key.keys or {}).items()] if key.kind == schema.TABLE
                 else [((name,), key)])
        for path, k in items:
            accepted = k.expect or {schema.BOOL: "true or false"}.get(k.kind, k.kind)
            if k.kind == schema.STRS:
                accepted += " (in a cell: separated by ';')"
            lines.append(f"| `{'.'.join(path)}` | `{cols[path]}` | {k.kind} | {_cell(accepted)} | {_cell(k.doc)} |")
    return "\n".join(lines)


TABLES = {"node.toml": node_table, "unit.toml": unit_table, "unit.yml": unit_yml_table}


def render(text: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- schema:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /schema:{re.escape(name)} -->)",
                             re.S)
        text = pattern.sub(lambda m, make=make: m[1] + make() + "\n" + m[2], text)
    return text


def main(argv: list[str]) -> int:
    stale = []
    for doc in sorted(set(DOCS.values())):
        old = doc.read_text()
        missing = [n for n, d in DOCS.items() if d == doc and f"<!-- schema:{n} -->" not in old]
        if missing:
            print(f"{doc.relative_to(ROOT)}: no <!-- schema:{missing[0]} --> table", file=sys.stderr)
            return 1
        new = render(old)
        if new != old:
            stale.append(doc)
            if "--check" not in argv:
                doc.write_text(new)
    if "--check" in argv and stale:
        print("out of date (run python tools/scripts/schema_docs.py): "
              + ", ".join(str(d.relative_to(ROOT)) for d in stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
