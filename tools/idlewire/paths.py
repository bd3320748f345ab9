"""Where idlewire keeps its files: the tree of non-Python parts it runs, and the build cache.

The roles, playbooks, image definitions, the agent's sources (which the agent role copies onto a
node) and the node suite live at the top of the repository, where Ansible, ansible-lint and
galaxy.yml expect them. A wheel carries a copy of the same tree, laid out the same way, as package
data in idlewire/data/ (setup.py copies SHIPPED there at build time). `data_dir()` is the one
answer to "where are they", so the same code runs from a checkout and from a `pip install`.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

from .errors import UserError

#: The files and directories of the repository that idlewire runs, relative to its top; a wheel
#: ships exactly these under idlewire/data/ (setup.py), an sdist carries them (MANIFEST.in).
SHIPPED = (
    "ansible.cfg",  # roles_path, the default inventory: `idlewire build` points ANSIBLE_CONFIG here
    "requirements.yml",  # the pinned collections, beside ansible.cfg as for a checkout
    "inventory",  # ansible.cfg's default inventory, and the example inventory's group_vars
    "playbooks",
    "roles",
    "image",  # targets/*.yml and boot/ files
    "agent/idlewire_agent",  # roles/agent copies ROLE/../../agent/idlewire_agent onto the node
    "tests/infra",  # the node suite `idlewire verify` runs
)

_CHECKOUT = Path(__file__).resolve().parents[2]


@functools.cache
def data_dir() -> Path:
    """The tree holding SHIPPED: the checkout when idlewire runs from one (`pip install -e .`,
    `python -m idlewire` in tools/), else the copy installed inside the idlewire package."""
    if (_CHECKOUT / "roles").is_dir() and (_CHECKOUT / "tools" / "idlewire" / "paths.py").is_file():
        return _CHECKOUT
    data = resources.files(__package__) / "data"
    if not isinstance(data, Path) or not data.is_dir():  # a zipped or half-copied install
        raise UserError(f"idlewire's data files are missing ({data}): reinstall idlewire from its wheel")
    return data


def cache_dir() -> Path:
    """Build cache: $IDLEWIRE_CACHE, else $XDG_CACHE_HOME/idlewire, else ~/.cache/idlewire."""
    if env := os.environ.get("IDLEWIRE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "idlewire"
