"""The hub's first schema: nonces, nodes, requests, sessions, receipts, flags.

Frozen as it stood at this revision (later revisions change it with op.* calls; db.py holds the
current model and tests/hub/test_migrations.py checks that the revisions arrive at it).

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('flags',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('node_id', sa.String(length=20), nullable=False),
    sa.Column('session', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=24), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('evidence', sa.Text(), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('node_id', 'session', 'seq', 'kind', name='flags_once')
    )
    op.create_table('nodes',
    sa.Column('id', sa.String(length=20), nullable=False),
    sa.Column('node_key', sa.String(length=64), nullable=False),
    sa.Column('wg_key', sa.String(length=64), nullable=False),
    sa.Column('payout', sa.Text(), nullable=False),
    sa.Column('payout_address', sa.String(length=128), nullable=False),
    sa.Column('unit', sa.String(length=64), nullable=False),
    sa.Column('region', sa.String(length=2), nullable=False),
    sa.Column('location', sa.String(length=64), nullable=False),
    sa.Column('caps', sa.Text(), nullable=False),
    sa.Column('max_sessions', sa.Integer(), nullable=False),
    sa.Column('price_per_gb', sa.Float(), nullable=False),
    sa.Column('endpoint', sa.String(length=300), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('registered_at', sa.Float(), nullable=False),
    sa.Column('last_seen', sa.Float(), nullable=False),
    sa.Column('channel_seen', sa.Float(), nullable=False),
    sa.Column('uptime', sa.Float(), nullable=False),
    sa.Column('open_sessions', sa.Integer(), nullable=False),
    sa.Column('heartbeats', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('node_key')
    )
    op.create_index('nodes_region', 'nodes', ['region', 'last_seen'], unique=False)
    op.create_table('nonces',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('nonce', sa.String(length=64), nullable=False),
    sa.Column('expires', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('key', 'nonce', name='nonces_pk')
    )
    op.create_index('nonces_expires', 'nonces', ['expires'], unique=False)
    op.create_table('receipts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('node_id', sa.String(length=20), nullable=False),
    sa.Column('session', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=12), nullable=False),
    sa.Column('up', sa.BigInteger(), nullable=False),
    sa.Column('down', sa.BigInteger(), nullable=False),
    sa.Column('time', sa.BigInteger(), nullable=False),
    sa.Column('cosigned', sa.Boolean(), nullable=False),
    sa.Column('buyer_up', sa.BigInteger(), nullable=True),
    sa.Column('buyer_down', sa.BigInteger(), nullable=True),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('stored_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('node_id', 'session', 'seq', name='receipts_session_seq')
    )
    op.create_table('requests',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('node_id', sa.String(length=20), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('buyer_key', sa.String(length=64), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=12), nullable=False),
    sa.Column('created', sa.Float(), nullable=False),
    sa.Column('delivered_at', sa.Float(), nullable=True),
    sa.Column('answered_at', sa.Float(), nullable=True),
    sa.Column('result', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('requests_node_state', 'requests', ['node_id', 'state'], unique=False)
    op.create_index('requests_state', 'requests', ['state'], unique=False)
    op.create_table('sessions',
    sa.Column('node_id', sa.String(length=20), nullable=False),
    sa.Column('session', sa.String(length=64), nullable=False),
    sa.Column('buyer_key', sa.String(length=64), nullable=False),
    sa.Column('request_id', sa.String(length=32), nullable=True),
    sa.Column('state', sa.String(length=12), nullable=False),
    sa.Column('opened_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.Column('head', sa.String(length=64), nullable=False),
    sa.Column('stored_seq', sa.Integer(), nullable=False),
    sa.Column('up', sa.BigInteger(), nullable=False),
    sa.Column('down', sa.BigInteger(), nullable=False),
    sa.Column('paid_up', sa.BigInteger(), nullable=False),
    sa.Column('paid_down', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('node_id', 'session', name='sessions_pk')
    )


def downgrade() -> None:
    op.drop_table('sessions')
    op.drop_index('requests_state', table_name='requests')
    op.drop_index('requests_node_state', table_name='requests')
    op.drop_table('requests')
    op.drop_table('receipts')
    op.drop_index('nonces_expires', table_name='nonces')
    op.drop_table('nonces')
    op.drop_index('nodes_region', table_name='nodes')
    op.drop_table('nodes')
    op.drop_table('flags')
