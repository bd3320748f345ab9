"""The node verification suite (pytest-testinfra), run against real nodes only.

    pytest --hosts=ssh://idlewire@192.0.2.11 tests/infra            # one node, role defaults
    pytest --hosts=ansible://all --ansible-inventory=inv.yml tests/infra
    idlewire verify -i inventory.yml [--limit PATTERN]              # many nodes in parallel

A plain `pytest` (no --hosts/--ansible-inventory) does not collect this directory: the suite
would otherwise run against the machine pytest runs on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from iwnode import Node, expected_vars, load_vars_file

HERE = Path(__file__).parent


def _targeted(config: pytest.Config) -> bool:
    return bool(config.getoption("hosts", None) or config.getoption("ansible_inventory", None))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("idlewire").addoption(
        "--iw-vars", dest="iw_vars", default=None,
        help="YAML/JSON file of role variables the nodes were provisioned with (or {vars: {...}, "
             "hosts: {NAME: {...}}}); defaults come from roles/*/defaults.")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config):
    if _targeted(config):
        return None
    if collection_path.is_file() and collection_path.name.startswith("test_"):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # One xdist group per host: with --dist loadgroup each worker keeps one connection per node.
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if Path(str(item.fspath)).parent == HERE and hasattr(item, "callspec"):
            h = item.callspec.params.get("_testinfra_host")
            if h is not None:
                item.add_marker(pytest.mark.xdist_group(h.backend.get_pytest_id()))


@pytest.fixture(scope="module")
def node(host, request) -> Node:
    """The node under test with its expected variables."""
    backend = host.backend
    name = backend.get_hostname()
    inventory_vars = None
    if getattr(backend, "NAME", "") == "ansible":
        inventory_vars = host.ansible.get_variables()
        name = inventory_vars.get("inventory_hostname", name)
    vars_file = load_vars_file(request.config.getoption("iw_vars"))
    try:  # one connection attempt per node: a module fixture's error is reused by every check
        host.run("true")
    except Exception as exc:
        pytest.fail(f"cannot reach {name}: {type(exc).__name__}: {exc}", pytrace=False)
    return Node(host, name, expected_vars(name, vars_file, inventory_vars))
