"""Alembic environment: the hub passes its open connection in config.attributes["connection"]."""

from alembic import context

from idlewire.hub.db import metadata

conn = context.config.attributes["connection"]
context.configure(connection=conn, target_metadata=metadata, render_as_batch=conn.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
