"""The Alembic revisions arrive at the model in db.py, on SQLite and on PostgreSQL, and starting
a hub on a migrated database (or two at once) changes nothing."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from idlewire.hub import db


def test_revisions_build_the_model(db_url):
    engine = db.make_engine(db_url)
    db.migrate(engine)
    db.migrate(engine)  # a second start: nothing to do, no error
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), db.metadata)
        version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    assert diff == []
    assert version == "0003"
    engine.dispose()
