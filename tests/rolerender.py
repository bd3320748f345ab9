"""Render role templates the way Ansible's template module does, with StrictUndefined.

Used by render tests (exact lines) and by the network tests that load the rendered nftables table
into a lab namespace. ``ansible_managed`` and the ``comment`` filter are stood in for.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import yaml

ROOT = Path(__file__).resolve().parent.parent
ROLES = ROOT / "roles"


def _comment(text: str, decoration: str = "# ") -> str:
    return "\n".join(decoration + line if line else decoration.rstrip() for line in text.splitlines())


def role_defaults(role: str) -> dict:
    """defaults/main.yml (or defaults/main/*.yml) of a role, minus values that are Jinja expressions."""
    d = ROLES / role / "defaults"
    files = [d / "main.yml"] if (d / "main.yml").exists() else sorted((d / "main").glob("*.yml"))
    out: dict = {}
    for f in files:
        out.update(yaml.safe_load(f.read_text()) or {})
    return {k: v for k, v in out.items() if not (isinstance(v, str) and "{{" in v)}


def render(role: str, template: str, overrides: dict | None = None) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader([ROLES / role / "templates"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, keep_trailing_newline=True,
                             autoescape=False)  # noqa: S701 (config files, not HTML; as Ansible renders them)
    env.filters["comment"] = _comment
    env.filters["bool"] = lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
    variables = {"ansible_managed": "Ansible managed", **role_defaults(role), **(overrides or {})}
    return env.get_template(template).render(**variables)
