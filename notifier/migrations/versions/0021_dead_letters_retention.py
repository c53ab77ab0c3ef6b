"""retention empties the dead letters past NOTIFIER_RETENTION_DAYS as it empties events: each
says when (dead_letters.purged_at_ms), and those not emptied yet are found by age through a
partial index of them

Revision ID: 0021
Revises: 0020
"""

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

_UNPURGED = sa.text("purged_at_ms IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("dead_letters") as batch:
        batch.add_column(sa.Column("purged_at_ms", sa.BigInteger(), nullable=True))
    with op.get_context().autocommit_block():
        op.create_index("ix_dead_letters_unpurged", "dead_letters", ["received_at_ms"],
                        postgresql_where=_UNPURGED, sqlite_where=_UNPURGED,
                        postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index("ix_dead_letters_unpurged", table_name="dead_letters")
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_column("purged_at_ms")
