"""retention finds the held deliveries past the retention through a partial index of the held
ones by age, instead of reading every held delivery (a sequential scan of deliveries in each run
once a webhook inactive for a while holds many)

Revision ID: 0019
Revises: 0018
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

_HELD = sa.text("status = 'held'")


def upgrade() -> None:
    # Concurrently on PostgreSQL: built beside live traffic, which a plain CREATE INDEX would
    # hold for as long as it reads the whole deliveries table.
    with op.get_context().autocommit_block():
        op.create_index("ix_deliveries_held_ingested", "deliveries", ["ingested_at_ms"],
                        postgresql_where=_HELD, sqlite_where=_HELD,
                        postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index("ix_deliveries_held_ingested", table_name="deliveries")
