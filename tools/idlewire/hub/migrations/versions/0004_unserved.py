"""Unserved demand: a buyer's request for a region that the hub could not place (no node there with
free capacity online), one row per buyer, region and minute; settlement counts it in the region's
demand for the multiplier (hub/economy.py).

Revision ID: 0004 (after 0003, the reachability of nodes)
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "unserved",
        sa.Column("region", sa.String(length=2), nullable=False),
        sa.Column("buyer_key", sa.String(length=64), nullable=False),
        sa.Column("minute", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("region", "buyer_key", "minute"),
    )
    op.create_index("unserved_at", "unserved", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index("unserved_at", table_name="unserved")
    op.drop_table("unserved")
