"""The node's reachability stored as such: `reachable` and, when not, `unreachable` (why not and the
fix, as the node reports it: "not reachable from the internet: forward UDP PORT on your router to
ADDR"). Before, an empty endpoint was the only trace. Nodes registered before this revision get
reachable = (endpoint != "") and a reason saying the node has not told one yet (its next
registration does).

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BEFORE = "no public endpoint (registered before the hub kept the node's reason; it tells it when it registers again)"


def upgrade() -> None:
    op.add_column("nodes", sa.Column("reachable", sa.Boolean(), nullable=False, server_default=sa.false()))
    # 300: agent market.REACHABILITY_MAX when this revision was written (a revision does not change)
    op.add_column("nodes", sa.Column("unreachable", sa.String(length=300), nullable=False, server_default=""))
    nodes = sa.table("nodes", sa.column("endpoint", sa.String), sa.column("reachable", sa.Boolean),
                     sa.column("unreachable", sa.String))
    op.execute(nodes.update().where(nodes.c.endpoint != "").values(reachable=True))
    op.execute(nodes.update().where(nodes.c.endpoint == "").values(unreachable=BEFORE))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("unreachable")
        batch.drop_column("reachable")
