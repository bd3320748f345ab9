"""Every hub test runs on SQLite and on a real PostgreSQL started here (initdb + pg_ctl)."""

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hublab import Postgres, postgres_missing

_n = itertools.count()


@pytest.fixture(scope="session")
def postgres():
    why = postgres_missing()
    if why:
        pytest.skip(why)
    pg = Postgres().start()
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.sqlite'}"
    pg = request.getfixturevalue("postgres")
    return pg.new_database(f"hubtest{next(_n)}")
