"""Render role templates the way Ansible's template module does, with StrictUndefined.

Used by render tests (exact lines) and by the network tests that load the rendered nftables table
into a lab namespace. ``ansible_managed`` and the ``comment`` filter are stood in for.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import yaml

ROOT = Path(__file__).resolve().parent.parent
ROLES = ROOT / "roles"


def _comment(text: str, decoration: str = "# ") -> str:
    return "\n".join(decoration + line if line else decoration.rstrip() for line in text.splitlines())


def _environment(loader: jinja2.BaseLoader | None = None) -> jinja2.Environment:
    env = jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             keep_trailing_newline=True,
                             autoescape=False)  # noqa: S701 (config files, not HTML; as Ansible renders them)
    env.filters["comment"] = _comment
    env.filters["bool"] = lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
    env.filters["to_json"] = json.dumps
    env.filters["basename"] = lambda p: Path(p).name
    return env


def role_defaults(role: str, overrides: dict | None = None) -> dict:
    """defaults/main.yml (or defaults/main/*.yml) of a role with overrides, expressions resolved."""
    d = ROLES / role / "defaults"
    files = [d / "main.yml"] if (d / "main.yml").exists() else sorted((d / "main").glob("*.yml"))
    raw: dict = {}
    for f in files:
        raw.update(yaml.safe_load(f.read_text()) or {})
    raw.update(overrides or {})
    env = _environment()
    # Facts as a Debian host gives them; override ROLE_platform to render the OpenWrt side.
    ctx = {"role_path": str(ROLES / role), "idlewire_baking": True, "ansible_facts": {"os_family": "Debian"}}
    for _ in range(4):  # defaults may refer to each other
        for k, v in raw.items():
            ctx[k] = env.from_string(v).render(ctx) if isinstance(v, str) and "{{" in v else v
    return ctx


def render(role: str, template: str, overrides: dict | None = None) -> str:
    env = _environment(jinja2.FileSystemLoader([ROLES / role / "templates"]))
    variables = {"ansible_managed": "Ansible managed", **role_defaults(role, overrides)}
    return env.get_template(template).render(**variables)
