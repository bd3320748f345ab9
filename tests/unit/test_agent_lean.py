"""The agent's memory budget (<= 30 MB RSS with 1,000 sessions) rests on what it does NOT import:
the service's command line, the API and the metering core stay clear of argparse, http.server (and
the email/html/mimetypes it brings), dataclasses (inspect, ast, dis), shutil, tempfile and the
shaping code (imported only when [shaping] is enabled). bench/meter.py measures the RSS; this
keeps the imports from creeping back."""

import subprocess
import sys

import pytest
from idlewire_agent.__main__ import DEFAULT_CONFIG, _run_config

HEAVY = ("argparse", "http.server", "http.client", "email", "html", "mimetypes", "shutil", "tempfile", "dataclasses",
         "idlewire_agent.shaping", "idlewire_agent.schedule", "idlewire.cli", "rich")


def test_run_path_imports_nothing_heavy():
    code = ("import sys; sys.argv = ['idlewire-agent', 'run', '--config', '/nonexistent/node.toml'];"
            "import idlewire_agent.__main__ as m; rc = m.main();"
            "import idlewire_agent.api, idlewire_agent.agent, idlewire_agent.quota, idlewire_agent.isolation;"
            f"print(rc, sorted(n for n in sys.modules if n.startswith({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr
    assert "/nonexistent/node.toml: no such file" in out.stderr


@pytest.mark.parametrize("argv, path", [
    ([], DEFAULT_CONFIG), (["run"], DEFAULT_CONFIG), (["run", "--config", "/x.toml"], "/x.toml"),
    (["run", "--config=/x.toml"], "/x.toml"), (["--config", "/x.toml"], None),
    (["run", "--config"], None), (["run", "--help"], None), (["check-config", "/x.toml"], None),
    (["run", "--config", "/x.toml", "extra"], None), (["--version"], None), (["shaping", "show"], None),
])
def test_service_command_line_parses_without_argparse(argv, path):
    assert _run_config(argv) == path


def test_other_command_lines_still_get_argparse(capsys):
    from idlewire_agent.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_records_behave_like_the_dataclasses_they_replace():
    from idlewire_agent.policy import Firewall, Policy, Quota, Rule

    assert Quota() == Quota(0, 1, 8) == Quota(max_sessions=8)
    assert Quota(monthly_bytes=5) != Quota()
    assert repr(Quota()) == "Quota(monthly_bytes=0, reset_day=1, max_sessions=8)"
    a, b = Policy(), Policy()
    assert a.schedule is not b.schedule  # a fresh default list per instance
    assert a.replace(quota=Quota(1)).quota.monthly_bytes == 1 and a.quota.monthly_bytes == 0
    assert Firewall(nat_port_low=61440).nat_port_mask == 0xF000
    with pytest.raises(TypeError, match="missing argument 'start'"):
        Rule((0,))
    with pytest.raises(TypeError, match="unexpected"):
        Quota(nope=1)
    with pytest.raises(TypeError, match="multiple values"):
        Quota(1, monthly_bytes=2)
    with pytest.raises(TypeError):
        hash(Quota())
