"""an alert kept is sent at least once: each says when its events were stored (or why sending
it was given up), so that beat's sweep sends again those kept but not sent (the process that
kept one failing, or killed, before its events were stored)

Revision ID: 0020
Revises: 0019
"""

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

_UNSENT = sa.text("sent_at_ms IS NULL AND send_error IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("sent_at_ms", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("send_error", sa.Text(), nullable=True))
    # Those kept before were sent then or lost for good; which, nothing recorded. Sending them
    # now, hours or days late, would tell of a webhook disabled or late as if it were now. One
    # kept meanwhile by a process of before is sent again, and stores nothing twice (its
    # events' ids are the same).
    op.execute("UPDATE alerts SET sent_at_ms = created_at_ms")
    with op.get_context().autocommit_block():
        op.create_index("ix_alerts_unsent", "alerts", ["id"], postgresql_where=_UNSENT,
                        sqlite_where=_UNSENT, postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index("ix_alerts_unsent", table_name="alerts")
    with op.batch_alter_table("alerts") as batch:
        batch.drop_column("send_error")
        batch.drop_column("sent_at_ms")
