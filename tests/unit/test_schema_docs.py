"""The key tables in README.md and agent/README.md are the schema's (tools/scripts/schema_docs.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_key_tables_are_generated_from_the_schema():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "scripts" / "schema_docs.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_schema_key_is_in_a_table():
    from idlewire_agent import schema

    agent_doc, readme = (ROOT / "agent" / "README.md").read_text(), (ROOT / "README.md").read_text()
    for section, keys in schema.NODE.items():
        for name in keys:
            assert f"| `{section}.{name}` |" in agent_doc, (section, name)
    for col in schema.csv_columns():
        assert f"| `{col}` |" in readme, col
