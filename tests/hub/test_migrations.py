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
    assert version == "0004"
    engine.dispose()


def test_0003_keeps_the_reachability_of_nodes_registered_before_it(db_url):
    """Nodes stored by revision 0002 (an empty endpoint was the only trace of "unreachable") come out
    of 0003 reachable exactly when they had an endpoint, the others with a reason saying so."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import select, text

    engine = db.make_engine(db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(db.MIGRATIONS))
    row = {"key": "k", "wg": "w", "payout": "{}", "addr": "a", "unit": "", "region": "DE", "location": "",
           "caps": "{}", "max": 4, "price": 0.5, "version": "1", "at": 1.0}
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
        for nid, endpoint in (("open", "203.0.113.7:51820"), ("closed", "")):
            conn.execute(text("INSERT INTO nodes (id, node_key, wg_key, payout, payout_address, unit, region, "
                              "location, caps, max_sessions, price_per_gb, endpoint, version, registered_at, "
                              "last_seen, channel_seen, uptime, open_sessions, heartbeats) VALUES (:id, :key, :wg, "
                              ":payout, :addr, :unit, :region, :location, :caps, :max, :price, :endpoint, "
                              ":version, :at, :at, 0, 0, 0, 0)"),
                         {**row, "id": nid, "key": nid, "endpoint": endpoint})
        conn.commit()
    db.migrate(engine)
    with engine.connect() as conn:
        n = db.nodes.c
        got = {r.id: (r.reachable, r.unreachable) for r in conn.execute(select(n.id, n.reachable, n.unreachable))}
    assert got["open"] == (True, "")
    assert got["closed"][0] is False and got["closed"][1].startswith("no public endpoint")
    engine.dispose()
