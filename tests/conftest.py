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
