"""Where idlewire keeps its files: the source tree it ships with and the build cache."""

import os
from pathlib import Path

#: The checkout (or installed source tree) holding roles/, playbooks/, image/ and agent/.
ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """Build cache: $IDLEWIRE_CACHE, else $XDG_CACHE_HOME/idlewire, else ~/.cache/idlewire."""
    if env := os.environ.get("IDLEWIRE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "idlewire"
