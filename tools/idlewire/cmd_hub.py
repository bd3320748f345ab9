"""`idlewire hub ...`: the commands live with the hub (tools/idlewire/hub/cli.py)."""

from .hub.cli import register

__all__ = ["register"]
