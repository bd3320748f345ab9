"""The end-to-end walk's figures, printed at the end of the run (and kept as JSON in the base temp)."""

from __future__ import annotations

import json


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    figures = {k: v for k, v in getattr(config, "e2e_figures", {}).items() if k != "_path"}
    if not figures:
        return
    terminalreporter.section("e2e figures (From a box to a paid gigabyte)")
    for step, values in figures.items():
        terminalreporter.write_line(f"{step}: {json.dumps(values)}")
