"""replay cursor: a replay records how far it has queued (the last delivery id of its last
batch) and when it finished, so that a worker can carry a large replay on, and carry it on again
after a crash, from where it stopped

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("replays") as batch:
        batch.add_column(sa.Column("queued_after", sa.String(40), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("finished_at_ms", sa.BigInteger(), nullable=True))
    # The replays made before this revision queued everything in the request that made them.
    op.execute("UPDATE replays SET finished_at_ms = created_at_ms")


def downgrade() -> None:
    with op.batch_alter_table("replays") as batch:
        batch.drop_column("finished_at_ms")
        batch.drop_column("queued_after")
