"""Write the variables part of roles/*/README.md from meta/argument_specs.yml (the one source).

Text a person wrote above the marker line stays; everything below it is generated.

    python tools/scripts/role_docs.py          # rewrite the READMEs
    python tools/scripts/role_docs.py --check  # exit 1 if any README is out of date (make lint)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _cell(value: object) -> str:
    text = " ".join(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


MARKER = ("<!-- Generated below from meta/argument_specs.yml by tools/scripts/role_docs.py: "
          "edit the specs, not this part. -->")


def render(role: Path) -> str:
    specs = yaml.safe_load((role / "meta/argument_specs.yml").read_text())["argument_specs"]
    readme = role / "README.md"
    head = readme.read_text().split(MARKER)[0].rstrip() if readme.exists() else ""
    if not head or head.startswith("<!--"):
        head = f"# Role `{role.name}`"
    lines = [head, "", MARKER, ""]
    for entry, spec in specs.items():
        title = spec.get("short_description", "")
        lines += [f"## Variables of entry point `{entry}`: {title}", ""]
        desc = spec.get("description", [])
        for para in desc if isinstance(desc, list) else [desc]:
            lines += [para, ""]
        lines += ["| variable | type | default | description |", "|---|---|---|---|"]
        for name, opt in sorted(spec.get("options", {}).items()):
            kind = opt.get("type", "str")
            if kind == "list" and "elements" in opt:
                kind = f"list of {opt['elements']}"
            if "choices" in opt:
                kind += f" ({', '.join(map(str, opt['choices']))})"
            shown = opt.get("default")
            shown = shown if isinstance(shown, str) else json.dumps(shown)
            default = f"`{_cell(shown)}`" if "default" in opt else ("**required**" if opt.get(
                "required") else "")
            lines.append(f"| `{name}` | {kind} | {default} | {_cell(opt.get('description', ''))} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    stale = []
    for role in sorted(p for p in (ROOT / "roles").iterdir() if (p / "meta/argument_specs.yml").exists()):
        text = render(role)
        readme = role / "README.md"
        if readme.exists() and readme.read_text() == text:
            continue
        if "--check" in argv:
            stale.append(str(readme.relative_to(ROOT)))
        else:
            readme.write_text(text)
    if stale:
        print(f"error: out of date: {', '.join(stale)}; run `python tools/scripts/role_docs.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
