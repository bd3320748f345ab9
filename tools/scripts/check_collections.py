"""Check that the Ansible collections pinned in requirements.yml are the ones installed.

Galaxy is not always reachable (CI here is not); the pinned `ansible` package bundles the
collections, so the pins are checked against what it installed rather than downloaded again.
"""

import json
import subprocess
import sys
from pathlib import Path

import yaml


def main(path: str) -> int:
    try:
        wanted = yaml.safe_load(Path(path).read_text())["collections"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        print(f"error: {path}: cannot read the 'collections' list: {exc}", file=sys.stderr)
        return 2
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-galaxy"), "collection", "list", "--format", "json"],
        capture_output=True, text=True, check=False,
    )
    installed: dict[str, str] = {}
    for colls in json.loads(out.stdout or "{}").values():
        for name, info in colls.items():
            installed.setdefault(name, info.get("version", "?"))
    bad = []
    for item in wanted:
        have = installed.get(item["name"])
        if have != str(item["version"]):
            bad.append(f"{item['name']} {item['version']} (installed: {have or 'none'})")
    if bad:
        print(f"error: {path}: pinned collections not installed: {', '.join(bad)}; "
              "run `ansible-galaxy collection install -r requirements.yml` or fix the pins",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "requirements.yml"))
