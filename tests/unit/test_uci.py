"""tests/infra/uci.py reads UCI text the way libuci does: quoting, lists, comments, bad lines."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra"))  # the UCI reader ships with the node suite

from uci import UciError, parse, quote

FIREWALL = """\
package firewall

config defaults
	option input 'REJECT'
	option forward 'REJECT'

# the WAN zone
config zone 'wan'
	option name wan
	list network 'wan'
	list network "wan6"   # trailing comment
	option masq '1'

config rule
	option name 'Allow-DHCP-Renew'
	option src 'wan'

config rule
	option name 'Allow-Ping'; option icmp_type 'echo-request'
"""


def test_sections_options_lists_and_addressing():
    cfg = parse(FIREWALL, "firewall")
    assert cfg.package == "firewall"
    assert [(s.type, s.name) for s in cfg.sections] == [("defaults", None), ("zone", "wan"), ("rule", None),
                                                        ("rule", None)]
    assert cfg.get("wan.network") == ["wan", "wan6"]
    assert cfg.get("wan.masq") == "1"
    assert cfg.get("wan.name") == "wan"
    assert cfg.get("wan") == "zone"
    assert cfg.get("@rule[0].name") == "Allow-DHCP-Renew"
    assert cfg.get("@rule[-1].icmp_type") == "echo-request"
    assert cfg.get("@rule[2].name") is None
    assert cfg.get("@defaults[0].input") == "REJECT"
    assert cfg.get("nosuch.option", "x") == "x"
    assert cfg.section("wan").lineno == 8


@pytest.mark.parametrize(("token", "value"), [
    ("'a b'", "a b"),
    ('"a b"', "a b"),
    ("'it'\\''s'", "it's"),
    ('"say \\"hi\\""', 'say "hi"'),
    ("a\\ b", "a b"),
    ("'#not a comment'", "#not a comment"),
    ("''", ""),
    ("'x;y'", "x;y"),
    ("abc#def", "abc#def"),
])
def test_quoting(token, value):
    assert parse(f"config t 's'\n\toption v {token}\n").get("s.v") == value


@pytest.mark.parametrize("value", ["plain", "two words", "it's", "'", "a'b'c", "", "#x", "back\\slash"])
def test_quote_round_trips(value):
    assert parse(f"config t 's'\n\toption v {quote(value)}\n").get("s.v") == value


def test_option_then_list_becomes_a_list_and_named_sections_merge():
    cfg = parse("config t 's'\n\toption a '1'\n\tlist a '2'\nconfig t 's'\n\toption b '3'\n")
    assert len(cfg.sections) == 1
    assert cfg.get("s.a") == ["1", "2"]
    assert cfg.get("s.b") == "3"


def test_comments_and_blank_lines_only():
    assert parse("# nothing\n\n   # here\n").sections == []


@pytest.mark.parametrize(("text", "message"), [
    ("option a 'b'\n", "cfg:1: 'option' before any 'config' section"),
    ("config t\n\toption a 'b\n", "cfg:2: unterminated single quote"),
    ('config t\n\n\toption a "b\n', "cfg:3: unterminated double quote"),
    ("config t\n\toption a b c\n", "cfg:2: 'option' takes a name and one value, got 3 words (quote a value that has "
                                   "spaces)"),
    ("config t\n\toption a\n", "cfg:2: 'option' takes a name and one value, got 1 words (quote a value that has "
                               "spaces)"),
    ("config t 'bad-name'\n", "cfg:1: bad section name 'bad-name' (letters, digits and '_' only)"),
    ("config t\n\toption 'a.b' c\n", "cfg:2: bad option name 'a.b' (letters, digits and '_' only)"),
    ("config\n", "cfg:1: 'config' takes a type and an optional name, got 0 words"),
    ("config t\n\tsetting a b\n", "cfg:2: unknown statement 'setting' (package, config, option or list)"),
    ("config t\n\toption a b\\\n", "cfg:2: backslash at the end of the line"),
    ("config a 's'\nconfig b 's'\n", "cfg:2: section 's' is a 'a' (line 1), not a 'b'"),
    ("package 'x y'\n", "cfg:1: 'package' takes one name of letters, digits and '_'"),
])
def test_bad_lines_name_the_line(text, message):
    with pytest.raises(UciError) as exc:
        parse(text, "cfg")
    assert str(exc.value) == message


def test_testinfra_helper_reads_uci_export(monkeypatch):
    """tests/infra/iwnode.py's Node.uci_export parses what `uci export` prints on a router."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "infra"))
    sys.modules.pop("iwnode", None)
    from iwnode import Node

    export = ("package idlewire\n\nconfig agent 'agent'\n\toption enabled '1'\n"
              "\toption config '/etc/idlewire/node.toml'\n\n")
    calls = []

    def run(cmd):
        calls.append(cmd)
        return SimpleNamespace(rc=0 if cmd.endswith(" idlewire") else 1, stdout=export if cmd.endswith(" idlewire")
                               else "")

    node = Node(SimpleNamespace(run=run), "router-7", {})
    cfg = node.uci_export("idlewire")
    assert calls == ["uci -q export idlewire"]
    assert (cfg.package, cfg.get("agent.enabled"), cfg.get("agent.config")) == ("idlewire", "1",
                                                                                "/etc/idlewire/node.toml")
    assert node.uci_export("nosuch") is None
