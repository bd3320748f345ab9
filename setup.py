"""Build hook (the project itself is described in pyproject.toml).

A wheel carries the non-Python parts idlewire runs (roles, playbooks, image targets, the agent's
sources, the node suite) as package data in idlewire/data/, laid out as at the top of the
repository, where they stay for Ansible, ansible-lint and galaxy.yml. The list is
idlewire.paths.SHIPPED; MANIFEST.in puts the same files into the sdist.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


def shipped() -> tuple[str, ...]:
    """paths.SHIPPED, read without importing the package (its dependencies are not installed yet)."""
    tree = ast.parse((HERE / "tools/idlewire/paths.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["SHIPPED"]:
            return ast.literal_eval(node.value)
    raise SystemExit("tools/idlewire/paths.py: no SHIPPED tuple")


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install finds the checkout itself (paths.data_dir)
            return
        data = Path(self.build_lib) / "idlewire" / "data"
        shutil.rmtree(data, ignore_errors=True)  # nothing stale from an earlier build
        for rel in shipped():
            src, dst = HERE / rel, data / rel
            if not src.exists():
                raise SystemExit(f"{rel}: listed in idlewire.paths.SHIPPED but missing from the source tree")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=SKIP)
            else:
                shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildWithData})
