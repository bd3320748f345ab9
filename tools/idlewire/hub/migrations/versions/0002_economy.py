"""The economy: token ledger (accounts, journal), epochs with signed statements, rewards, regional
multipliers, slashes with evidence, reputation, unbonding stake, heartbeats counted, probes; and an
index on receipts.stored_at (settlement reads an epoch's receipts by the hub's clock).

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_index("receipts_stored_at", "receipts", ["stored_at"], unique=False)
    op.create_table(
        "econ_meta",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("network", sa.String(length=128), nullable=False),
        sa.Column("rules_digest", sa.String(length=64), nullable=False),
        sa.Column("hub_key", sa.String(length=64), nullable=False),
        sa.Column("genesis_at", sa.Float(), nullable=False),
        sa.Column("epoch_seconds", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "econ_accounts",
        sa.Column("account", sa.String(length=200), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("account"),
    )
    op.create_table(
        "econ_entries",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("src", sa.String(length=200), nullable=False),
        sa.Column("dst", sa.String(length=200), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("ref", sa.Text(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("econ_entries_epoch", "econ_entries", ["epoch"], unique=False)
    op.create_table(
        "econ_epochs",
        sa.Column("epoch", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("prev", sa.String(length=64), nullable=False),
        sa.Column("statement", sa.Text(), nullable=False),
        sa.Column("start", sa.Float(), nullable=False),
        sa.Column("end", sa.Float(), nullable=False),
        sa.Column("settled_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("epoch"),
        sa.UniqueConstraint("hash"),
    )
    op.create_table(
        "econ_rewards",
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=20), nullable=False),
        sa.Column("region", sa.String(length=2), nullable=False),
        sa.Column("payout", sa.String(length=128), nullable=False),
        sa.Column("reward", sa.BigInteger(), nullable=False),
        sa.Column("verified_bytes", sa.BigInteger(), nullable=False),
        sa.Column("uptime_ppm", sa.Integer(), nullable=False),
        sa.Column("reputation_ppm", sa.Integer(), nullable=False),
        sa.Column("multiplier_ppm", sa.Integer(), nullable=False),
        sa.Column("stake", sa.BigInteger(), nullable=False),
        sa.Column("why_not", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("epoch", "node_id", name="econ_rewards_pk"),
    )
    op.create_index("econ_rewards_node", "econ_rewards", ["node_id", "epoch"], unique=False)
    op.create_table(
        "econ_multipliers",
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("region", sa.String(length=2), nullable=False),
        sa.Column("multiplier_ppm", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("epoch", "region", name="econ_multipliers_pk"),
    )
    op.create_table(
        "econ_slashes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=20), nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("evidence", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("econ_slashes_node", "econ_slashes", ["node_id"], unique=False)
    op.create_table(
        "econ_reputation",
        sa.Column("node_id", sa.String(length=20), nullable=False),
        sa.Column("reputation_ppm", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("node_id"),
    )
    op.create_table(
        "econ_unbonding",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("node_id", sa.String(length=20), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("release_epoch", sa.Integer(), nullable=False),
        sa.Column("to_account", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "econ_heartbeats",
        sa.Column("node_id", sa.String(length=20), nullable=False),
        sa.Column("counted", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("node_id"),
    )
    op.create_table(
        "probes",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("node_id", sa.String(length=20), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("reached", sa.Boolean(), nullable=False),
        sa.Column("mbit", sa.Integer(), nullable=False),
        sa.Column("advertised_mbit", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("probes_at", "probes", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index("probes_at", table_name="probes")
    op.drop_table("probes")
    for t in ("econ_heartbeats", "econ_unbonding", "econ_reputation"):
        op.drop_table(t)
    op.drop_index("econ_slashes_node", table_name="econ_slashes")
    op.drop_table("econ_slashes")
    op.drop_table("econ_multipliers")
    op.drop_index("econ_rewards_node", table_name="econ_rewards")
    op.drop_table("econ_rewards")
    op.drop_table("econ_epochs")
    op.drop_index("econ_entries_epoch", table_name="econ_entries")
    op.drop_table("econ_entries")
    op.drop_table("econ_accounts")
    op.drop_table("econ_meta")
    op.drop_index("receipts_stored_at", table_name="receipts")
