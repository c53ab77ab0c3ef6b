"""retention: events say when their payload was emptied (NOTIFIER_RETENTION_DAYS), and an index
of the events not emptied yet by age, so that each purge run reads only what it empties

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_UNPURGED = sa.text("purged_at_ms IS NULL")


def upgrade() -> None:
    op.add_column("events", sa.Column("purged_at_ms", sa.BigInteger(), nullable=True))
    # Concurrently on PostgreSQL: built beside live ingest, which a plain CREATE INDEX would
    # hold for as long as it reads the whole events table.
    with op.get_context().autocommit_block():
        op.create_index("ix_events_unpurged_received", "events", ["received_at_ms"],
                        postgresql_where=_UNPURGED, sqlite_where=_UNPURGED,
                        postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index("ix_events_unpurged_received", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("purged_at_ms")
