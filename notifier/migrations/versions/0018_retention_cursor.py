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
# The oldest event not emptied whose deliveries have all ended (any status but delivered,
# failed and dead keeps an event whole); and the events not emptied before where the walk
# starts: left whole for an unfinished delivery, each, when the first was read (one that ended
# since is kept aside all the same, and emptied by the next run).
_FIRST_FINISHED = sa.text(
    "SELECT received_at_ms, pk FROM events WHERE purged_at_ms IS NULL AND NOT EXISTS "
    "(SELECT 1 FROM deliveries WHERE deliveries.event_pk = events.pk "
    "AND deliveries.status NOT IN ('delivered', 'failed', 'dead')) "
    "ORDER BY received_at_ms, pk LIMIT 1")
_KEEP_BEFORE = sa.text(
    "INSERT INTO retention_kept (event_pk) SELECT pk FROM events "
    "WHERE purged_at_ms IS NULL AND (received_at_ms < :received_at_ms "
    "OR (received_at_ms = :received_at_ms AND pk <= :event_pk))")


def upgrade() -> None:
    op.create_table(
        "retention_cursor",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("received_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("event_pk", sa.BigInteger(), nullable=False))
    op.create_table(
        "retention_kept",
        sa.Column("event_pk", sa.BigInteger(), primary_key=True, autoincrement=False))
    with op.get_context().autocommit_block():
        # Concurrently on PostgreSQL: built beside live ingest (see 0011).
        op.create_index("ix_events_received", "events", ["received_at_ms", "pk"],
                        postgresql_concurrently=True)
    _seed()
    with op.get_context().autocommit_block():
        # Concurrently too: a plain DROP INDEX waits for every reader of events, and each
        # ingest waits behind it meanwhile.
        op.drop_index("ix_events_unpurged_received", table_name="events",
                      postgresql_concurrently=True)
    if op.get_bind().dialect.name == "postgresql":
        # For the pages written from now on (a rewrite of the table would lock it).
        op.execute("ALTER TABLE events SET (fillfactor = 80)")


def _seed() -> None:
    """Start the walk at the oldest event not emptied yet whose deliveries have all ended (found
    through the partial index, before it goes): every event before it was emptied, or kept
    whole for a delivery not finished, and those are kept aside, as the walk would have. The
    walk then reads none of the events emptied before, however many followed one kept whole
    (the oldest event not emptied can be days older than the next). With none such, it starts
    after the newest event."""
    bind = op.get_bind()
    first = bind.execute(_FIRST_FINISHED).first()
    if first is not None:
        cursor = {"received_at_ms": first.received_at_ms, "event_pk": first.pk - 1}
    else:
        last = bind.execute(sa.text("SELECT received_at_ms, pk FROM events "
                                    "ORDER BY received_at_ms DESC, pk DESC LIMIT 1")).first()
        if last is None:
            return  # no events: the first run starts the walk
        cursor = {"received_at_ms": last.received_at_ms, "event_pk": last.pk}
    bind.execute(sa.text("INSERT INTO retention_cursor (id, received_at_ms, event_pk) "
                         "VALUES (1, :received_at_ms, :event_pk)"), cursor)
    bind.execute(_KEEP_BEFORE, cursor)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE events RESET (fillfactor)")
    op.create_index("ix_events_unpurged_received", "events", ["received_at_ms"],
                    postgresql_where=_UNPURGED, sqlite_where=_UNPURGED)
    op.drop_index("ix_events_received", table_name="events")
    op.drop_table("retention_kept")
    op.drop_table("retention_cursor")
