"""Shared pytest set-up: the repository on sys.path for tests/netlab.py, markers, skips."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from netlab import Lab, have_netns


@pytest.fixture
def lab():
    """A fresh network lab (namespaces + veth + wireguard-go), removed after the test."""
    why = have_netns()
    if why:
        pytest.skip(why)
    with Lab() as lab:
        yield lab


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """tests/e2e's step figures (also kept as e2e-figures.json in the base temp directory)."""
    import json

    figures = {k: v for k, v in getattr(config, "e2e_figures", {}).items() if k != "_path"}
    if figures:
        terminalreporter.section("e2e figures (From a box to a paid gigabyte)")
        for step, values in figures.items():
            terminalreporter.write_line(f"{step}: {json.dumps(values)}")
