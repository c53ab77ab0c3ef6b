"""retention walks the events by age from where it stopped (a cursor, and the events it passed
while a delivery of theirs was unfinished) instead of through a partial index of the events not
emptied yet, so that emptying an event changes no indexed column; events' pages keep room for
the emptied version of their rows (fillfactor), so that PostgreSQL rewrites them in place

Revision ID: 0018
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0015"
branch_labels = None
depends_on = None

_UNPURGED = sa.text("purged_at_ms IS NULL")


def upgrade() -> None:
    op.create_table(
        "retention_cursor",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("received_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("event_pk", sa.BigInteger(), nullable=False))
    op.create_table(
        "retention_kept",
        sa.Column("event_pk", sa.BigInteger(), primary_key=True, autoincrement=False))
    # Everything received before the oldest event not emptied yet was emptied: the walk starts
    # there (found through the partial index, before it goes), or after the newest event when
    # every one was emptied.
    op.execute("INSERT INTO retention_cursor (id, received_at_ms, event_pk) "
               "SELECT 1, COALESCE((SELECT MIN(received_at_ms) - 1 FROM events "
               "WHERE purged_at_ms IS NULL), MAX(received_at_ms)), 0 FROM events "
               "HAVING COUNT(*) > 0")
    with op.get_context().autocommit_block():
        # Concurrently on PostgreSQL: built beside live ingest (see 0011).
        op.create_index("ix_events_received", "events", ["received_at_ms", "pk"],
                        postgresql_concurrently=True)
    op.drop_index("ix_events_unpurged_received", table_name="events")
    if op.get_bind().dialect.name == "postgresql":
        # For the pages written from now on (a rewrite of the table would lock it).
        op.execute("ALTER TABLE events SET (fillfactor = 80)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE events RESET (fillfactor)")
    op.create_index("ix_events_unpurged_received", "events", ["received_at_ms"],
                    postgresql_where=_UNPURGED, sqlite_where=_UNPURGED)
    op.drop_index("ix_events_received", table_name="events")
    op.drop_table("retention_kept")
    op.drop_table("retention_cursor")
