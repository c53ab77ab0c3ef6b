"""sla due: each delivery keeps when it breaches its SLA while that is undecided, indexed, so
that beat's SLA check reads only the deliveries due and stamps a bounded batch a run

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_UNDECIDED = sa.text("sla_due_at_ms IS NOT NULL")


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("sla_due_at_ms", sa.BigInteger(), nullable=True))
    # What the old check would still stamp: not delivered and not stamped yet (found by the
    # old index, dropped below). The SLA in BIGINT: its product with 1000 overflows an INTEGER.
    op.execute(
        "UPDATE deliveries SET sla_due_at_ms = ingested_at_ms + (SELECT CAST(sla_in_seconds AS "
        "BIGINT) * 1000 FROM webhooks WHERE webhooks.id = deliveries.webhook_id) "
        "WHERE sla_breach_at_ms IS NULL AND status <> 'delivered'")
    # Concurrently on PostgreSQL: built beside live traffic, which a plain CREATE INDEX would
    # hold for as long as it reads the whole deliveries table.
    with op.get_context().autocommit_block():
        op.create_index("ix_deliveries_sla_due", "deliveries", ["sla_due_at_ms"],
                        postgresql_where=_UNDECIDED, sqlite_where=_UNDECIDED,
                        postgresql_concurrently=True)
        op.drop_index("ix_deliveries_sla_open", table_name="deliveries",
                      postgresql_concurrently=True)


def downgrade() -> None:
    op.create_index("ix_deliveries_sla_open", "deliveries",
                    ["sla_breach_at_ms", "status", "ingested_at_ms"])
    op.drop_index("ix_deliveries_sla_due", table_name="deliveries")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("sla_due_at_ms")
