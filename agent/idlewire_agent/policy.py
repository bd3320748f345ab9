"""What the owner sells: caps, schedules, quota, session limits and buyer isolation settings.

Parsed from node.toml sections [shaping], [schedule], [quota] and [firewall]. config.load()
calls parse_sections(); it returns the parsed policy and a list of problems, each naming its key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SECTIONS = ("shaping", "schedule", "quota", "firewall")


@dataclass
class Policy:
    """Filled in by the shaping/isolation work (issue 4)."""


def parse_sections(data: dict[str, Any]) -> tuple[Policy, list[str]]:
    """Validate the policy sections of a node.toml mapping: (policy, problems naming each key)."""
    return Policy(), []
